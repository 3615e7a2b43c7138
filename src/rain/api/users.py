"""`/v1/users`, `/v1/groups`, `/v1/tokens`: who one is, and administration. Token secrets
appear only in the answer that creates them."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request

from rain.api.deps import repo, viewer
from rain.model import ApiToken, InvalidRequest, User
from rain.repo import Repository
from rain.repo.access import require_user
from rain.repo.credentials import TokenAdmin
from rain.repo.users import UserAdmin


def users(request: Request) -> UserAdmin:
    return repo(request).users


def tokens(request: Request) -> TokenAdmin:
    return repo(request).tokens


router = APIRouter(prefix="/v1")
Repo = Annotated[Repository, Depends(repo)]
Users = Annotated[UserAdmin, Depends(users)]
Tokens = Annotated[TokenAdmin, Depends(tokens)]
Viewer = Annotated[User | None, Depends(viewer)]
Object = Annotated[dict[str, Any], Body()]


def _fields(body: dict[str, Any], known: set[str]) -> dict[str, Any]:
    unknown = set(body) - known
    if unknown:
        raise InvalidRequest(f"unknown fields: {', '.join(sorted(map(str, unknown)))} "
                             f"(known: {', '.join(sorted(known))})")
    return body


# -- users ---------------------------------------------------------------------------
@router.get("/users/me", tags=["users"])
def whoami(user: Viewer) -> dict[str, Any]:
    me = require_user(user)
    return {"name": me.name, "admin": me.is_admin, "groups": me.groups,
            "quota_bytes": me.quota_bytes, "quota_images": me.quota_images}


@router.post("/users", status_code=201, tags=["users"])
def create_user(r: Repo, user: Viewer, body: Object) -> dict[str, Any]:
    """Admin only. Returns the new user's token, the only time it is shown."""
    created, token = r.create_user(
        user, str(body.get("name", "")), admin=bool(body.get("admin", False)),
        groups=[str(g) for g in body.get("groups", [])],
        quota_bytes=body.get("quota_bytes"), quota_images=body.get("quota_images"))
    return {"name": created.name, "admin": created.is_admin, "groups": created.groups,
            "token": token}


@router.get("/users", tags=["users"])
def list_users(r: Users, user: Viewer,
               include_deleted: Annotated[bool, Query(alias="all")] = False) -> dict[str, Any]:
    """Admin: every user by name; `all=true` adds deleted ones (tombstones)."""
    return {"users": [u.to_dict() for u in r.list_users(user, include_deleted=include_deleted)]}


@router.get("/users/{name}", tags=["users"])
def show_user(name: str, r: Users, user: Viewer) -> dict[str, Any]:
    """Admin (or the user themselves)."""
    return r.show_user(user, name).to_dict()


@router.patch("/users/{name}", tags=["users"])
def update_user(name: str, r: Users, user: Viewer, body: Object) -> dict[str, Any]:
    """Admin: `{"disabled": true}` makes every token of the user answer 401 at once;
    `false` enables the user again."""
    disabled = _fields(body, {"disabled"}).get("disabled")
    if not isinstance(disabled, bool):
        raise InvalidRequest("give {\"disabled\": true} or {\"disabled\": false}")
    return r.set_user_disabled(user, name, disabled).to_dict()


@router.delete("/users/{name}", tags=["users"])
def delete_user(name: str, r: Users, user: Viewer,
                transfer_to: str | None = None) -> dict[str, Any]:
    """Admin: delete a user (409 while they own images that are not deleted, unless
    `transfer_to=USER` gives those to another user). The name stays taken."""
    gone, moved = r.delete_user(user, name, transfer_to=transfer_to)
    return {**gone.to_dict(), "deleted": True, "images_transferred": moved,
            "transferred_to": transfer_to if moved else None}


# -- groups --------------------------------------------------------------------------
@router.get("/groups", tags=["users"])
def list_groups(r: Users, user: Viewer) -> dict[str, Any]:
    """Admin: every group with its members."""
    return {"groups": [g.to_dict() for g in r.list_groups(user)]}


@router.post("/groups", tags=["users"], status_code=201)
def create_group(r: Users, user: Viewer, body: Object) -> dict[str, Any]:
    """Admin: `{"name": NAME}` (409 if it exists)."""
    name = _fields(body, {"name"}).get("name")
    return r.create_group(user, str(name or "")).to_dict()


@router.get("/groups/{name}", tags=["users"])
def show_group(name: str, r: Users, user: Viewer) -> dict[str, Any]:
    return r.show_group(user, name).to_dict()


@router.delete("/groups/{name}", tags=["users"])
def delete_group(name: str, r: Users, user: Viewer) -> dict[str, Any]:
    """Admin: delete the group; images shared with it are no longer shared with its
    members."""
    return r.delete_group(user, name).to_dict()


@router.post("/groups/{name}/members", tags=["users"])
def add_members(name: str, r: Users, user: Viewer, body: Object) -> dict[str, Any]:
    """Admin: `{"users": [NAME, ...]}` join the group (all or none)."""
    return r.add_group_members(user, name, _names(_fields(body, {"users"}).get("users"))
                               ).to_dict()


@router.delete("/groups/{name}/members", tags=["users"])
def remove_members(name: str, r: Users, user: Viewer,
                   users: Annotated[list[str] | None, Query(alias="user")] = None,
                   ) -> dict[str, Any]:
    """Admin: `?user=A&user=B` leave the group (all or none; each must be in it)."""
    return r.remove_group_members(user, name, list(users or [])).to_dict()


def _names(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest("users must be a list of user names")
    return value


# -- tokens --------------------------------------------------------------------------
@router.get("/tokens", tags=["users"])
def list_tokens(r: Tokens, user: Viewer, of_user: Annotated[str | None, Query(alias="user")]
                = None, node: str | None = None,
                everyone: Annotated[bool, Query(alias="all")] = False) -> dict[str, Any]:
    """Your tokens (id, label, created, last used; never the secret). Admins: `user=NAME`,
    `node=NAME` (node tokens) or `all=true`."""
    found = r.list_tokens(user, user=of_user, node=node, everyone=everyone)
    return {"tokens": [t.to_dict() for t in found]}


@router.post("/tokens", tags=["users"], status_code=201)
def create_token(r: Tokens, user: Viewer, body: Object) -> dict[str, Any]:
    """A new token for you: `{"label"}`. Admins: `{"user": NAME}` for another user, or
    `{"node": NAME}` for a node token. The answer's `token` is shown this once."""
    fields = _fields(body, {"label", "user", "node"})
    if fields.get("user") is not None and fields.get("node") is not None:
        raise InvalidRequest("a token is for a user or for a node, not both")
    token, secret = r.create_token(user, label=str(fields.get("label") or ""),
                                   user=_opt_str(fields.get("user")),
                                   node=_opt_str(fields.get("node")))
    return _with_secret(token, secret)


@router.delete("/tokens/{token_id}", tags=["users"])
def revoke_token(token_id: int, r: Tokens, user: Viewer) -> dict[str, Any]:
    """Revoke one of your tokens (admins: any): requests with it answer 401 from now on."""
    return r.revoke_token(user, token_id).to_dict()


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _with_secret(token: ApiToken, secret: str) -> dict[str, Any]:
    return {**token.to_dict(), "token": secret}
