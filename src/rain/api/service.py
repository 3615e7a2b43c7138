"""The service itself: `/v1/health` (is it up, which version) and `/v1/gc` (admin:
free what no image uses)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from rain import __version__
from rain.api.deps import repo, viewer
from rain.model import User
from rain.repo import Repository

router = APIRouter(prefix="/v1")
Repo = Annotated[Repository, Depends(repo)]
Viewer = Annotated[User | None, Depends(viewer)]


@router.get("/health", tags=["service"])
def health() -> dict[str, str]:
    return {"status": "ok", "version": __version__}


@router.post("/gc", tags=["service"])
def gc(r: Repo, user: Viewer) -> dict[str, Any]:
    """Admin only: delete chunks and manifests nothing references (after the grace period)."""
    return r.gc(user).to_dict()
