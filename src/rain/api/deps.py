"""Request-scoped dependencies: the repository and the authenticated user."""

from __future__ import annotations

from fastapi import Request

from rain.api.files import bearer_token
from rain.model import User
from rain.repo import Repository
from rain.repo.access import refuse_node


def repo(request: Request) -> Repository:
    r: Repository = request.app.state.repo
    return r


def principal(request: Request) -> User | None:
    """Whoever the token is: a user or a node agent (no token = anonymous). Only the
    routes an agent calls take this; they check node tokens themselves."""
    token = bearer_token(request.headers.get("authorization"),
                         request.headers.get("x-auth-token"))
    return repo(request).authenticate(token)


def viewer(request: Request) -> User | None:
    """Bearer token (or OpenStack's X-Auth-Token); no token = anonymous. A node token
    is refused (403): every route but the agent's takes this."""
    user = principal(request)
    refuse_node(user)
    return user
