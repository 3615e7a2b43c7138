"""Request-scoped dependencies: the repository and the authenticated user."""

from __future__ import annotations

from fastapi import Request

from rain.api.files import bearer_token
from rain.model import User
from rain.repo import Repository


def repo(request: Request) -> Repository:
    r: Repository = request.app.state.repo
    return r


def viewer(request: Request) -> User | None:
    """Bearer token (or OpenStack's X-Auth-Token); no token = anonymous."""
    token = bearer_token(request.headers.get("authorization"),
                         request.headers.get("x-auth-token"))
    return repo(request).authenticate(token)
