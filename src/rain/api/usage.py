"""`/v1/usage`: who pulled what, when, and how many bytes."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends

from rain.api.deps import repo, viewer
from rain.model import User
from rain.repo import Repository

router = APIRouter(prefix="/v1")
Repo = Annotated[Repository, Depends(repo)]
Viewer = Annotated[User | None, Depends(viewer)]


@router.get("/usage", tags=["usage"])
def usage(r: Repo, user: Viewer, image: str | None = None, by: str | None = None,
          since: datetime | None = None) -> dict[str, Any]:
    records = r.usage(user, image, by, since)
    return {"usage": [u.to_dict() for u in records],
            "pulls": sum(1 for u in records if u.action == "pull"),
            "bytes": sum(u.bytes for u in records)}
