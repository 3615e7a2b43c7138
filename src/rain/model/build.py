"""Build jobs as plain data: what was asked, where it stands, what it produced."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class BuildStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    # Running, and asked to stop: the worker (on whichever server runs it) sees this in
    # the catalog, stops between steps and ends it `cancelled`.
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (BuildStatus.SUCCEEDED, BuildStatus.FAILED, BuildStatus.CANCELLED)


ACTIVE_BUILD_STATUSES = (BuildStatus.QUEUED, BuildStatus.RUNNING)


@dataclass
class Build:
    id: str
    owner: str
    template_digest: str
    template: str  # the template text as submitted
    # Texts of the templates it extends (`from: template:...`), nearest first.
    template_parents: list[str] = field(default_factory=list)
    status: BuildStatus = BuildStatus.QUEUED
    phase: str = ""
    progress: float = 0.0
    # The log from `log_offset` on (a follower asks only for what is new);
    # `log_size` is the length of the whole log, the next offset to ask for.
    log: str = ""
    log_offset: int = 0
    log_size: int = 0
    error: str | None = None
    image_id: str | None = None
    rebuild_of: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    cached: bool = False  # a template hit: an existing image, no work done
    created: datetime | None = None
    started: datetime | None = None
    finished: datetime | None = None

    def to_dict(self, *, with_log: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "owner": self.owner,
            "template_digest": self.template_digest,
            "template": self.template,
            "template_parents": list(self.template_parents),
            "status": str(self.status),
            "phase": self.phase,
            "progress": self.progress,
            "error": self.error,
            "image_id": self.image_id,
            "rebuild_of": self.rebuild_of,
            "timings": dict(self.timings),
            "cached": self.cached,
            "created": _iso(self.created),
            "started": _iso(self.started),
            "finished": _iso(self.finished),
            "log_size": self.log_size,
        }
        if with_log:
            data["log"] = self.log
            data["log_offset"] = self.log_offset
        return data


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
