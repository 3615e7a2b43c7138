"""Users, usage, matchmaking, gc and health."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends

from rain import __version__
from rain.api.deps import repo, viewer
from rain.api.images import parse_size
from rain.catalog import Preference, Requirements
from rain.model import InvalidRequest, User
from rain.repo import Repository
from rain.repo.access import require_user

router = APIRouter(prefix="/v1")
Repo = Annotated[Repository, Depends(repo)]
Viewer = Annotated[User | None, Depends(viewer)]


@router.get("/health", tags=["service"])
def health() -> dict[str, str]:
    return {"status": "ok", "version": __version__}


@router.get("/users/me", tags=["users"])
def whoami(user: Viewer) -> dict[str, Any]:
    me = require_user(user)
    return {"name": me.name, "admin": me.is_admin, "groups": me.groups,
            "quota_bytes": me.quota_bytes, "quota_images": me.quota_images}


@router.post("/users", status_code=201, tags=["users"])
def create_user(r: Repo, user: Viewer, body: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
    """Admin only. Returns the new user's token, the only time it is shown."""
    created, token = r.create_user(
        user, str(body.get("name", "")), admin=bool(body.get("admin", False)),
        groups=[str(g) for g in body.get("groups", [])],
        quota_bytes=body.get("quota_bytes"), quota_images=body.get("quota_images"))
    return {"name": created.name, "admin": created.is_admin, "groups": created.groups,
            "token": token}


@router.get("/usage", tags=["usage"])
def usage(r: Repo, user: Viewer, image: str | None = None, by: str | None = None,
          since: datetime | None = None) -> dict[str, Any]:
    records = r.usage(user, image, by, since)
    return {"usage": [u.to_dict() for u in records],
            "pulls": sum(1 for u in records if u.action == "pull"),
            "bytes": sum(u.bytes for u in records)}


@router.post("/match", tags=["images"])
def match(r: Repo, user: Viewer, body: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
    """Hard `requirements` filter, weighted `preferences` rank; reasons for every score;
    `eliminated`: how many candidates each requirement removed, in order."""
    req_in = body.get("requirements") or {}
    unknown = set(req_in) - {"os_distro", "release", "arch", "packages", "min_disk", "tags"}
    if unknown:
        raise InvalidRequest(f"unknown requirements: {', '.join(sorted(unknown))}")
    min_disk = req_in.get("min_disk")
    req = Requirements(
        os_distro=req_in.get("os_distro"), release=req_in.get("release"),
        arch=req_in.get("arch"), packages=list(req_in.get("packages") or []),
        tags=list(req_in.get("tags") or []),
        min_disk=parse_size(str(min_disk)) if min_disk is not None else None)
    prefs = [Preference.parse(str(p)) for p in body.get("preferences") or []]
    return r.match(user, req, prefs, int(body.get("limit", 20))).to_dict()


@router.post("/gc", tags=["service"])
def gc(r: Repo, user: Viewer) -> dict[str, Any]:
    """Admin only: delete chunks and manifests nothing references (after the grace period)."""
    return r.gc(user).to_dict()
