"""`/v1/match`: matchmaking, the images that meet hard requirements ranked by
preferences."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends

from rain.api.deps import repo, viewer
from rain.catalog import Preference, Requirements
from rain.model import InvalidRequest, User
from rain.model.units import parse_size
from rain.repo import Repository

router = APIRouter(prefix="/v1")
Repo = Annotated[Repository, Depends(repo)]
Viewer = Annotated[User | None, Depends(viewer)]


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
