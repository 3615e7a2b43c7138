"""Request-scoped dependencies: the repository and the authenticated user."""

from __future__ import annotations

from fastapi import Request

from rain.model import User
from rain.repo import Repository


def repo(request: Request) -> Repository:
    r: Repository = request.app.state.repo
    return r


def viewer(request: Request) -> User | None:
    """Bearer token (or OpenStack's X-Auth-Token); no token = anonymous."""
    auth = request.headers.get("authorization", "")
    token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
    token = token or request.headers.get("x-auth-token")
    return repo(request).authenticate(token)
