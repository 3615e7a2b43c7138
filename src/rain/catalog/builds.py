"""Build jobs in the catalog: the queue lives in the database.

Every state change is a compare-and-set on `status`, so several server
processes can share one queue: a worker *claims* the oldest queued build
(queued → running, naming itself in `worker`), cancelling is queued →
cancelled or running → cancelling (its worker, wherever it runs, sees that,
stops, and sets cancelling → cancelled), finishing is running →
succeeded/failed. The log is appended in
SQL (`log || text`) and read back in slices, never loaded whole by lists.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from rain.catalog.db import Database, as_utc
from rain.catalog.references import ids_with_prefix
from rain.catalog.schema import BuildRow, UserRow
from rain.model import Build, BuildStatus, NotFound, User
from rain.model.clock import utcnow

ACTIVE = [str(BuildStatus.QUEUED), str(BuildStatus.RUNNING)]


def build_model(row: BuildRow, owner: str, *, log: str = "", log_offset: int = 0) -> Build:
    return Build(
        id=row.id, owner=owner, template_digest=row.template_digest,
        template=row.template_text, template_parents=list(row.template_parents or []),
        status=BuildStatus(row.status), phase=row.phase, progress=row.progress,
        log=log, log_offset=log_offset, log_size=row.log_size, error=row.error,
        image_id=row.image_id, rebuild_of=row.rebuild_of,
        timings={str(k): float(v) for k, v in (row.timings or {}).items()}, cached=row.cached,
        created=as_utc(row.created), started=as_utc(row.started),
        finished=as_utc(row.finished),
    )


class BuildCatalog:
    db: Database

    def create_build(self, owner: User, *, template_digest: str, template: str,
                     template_parents: Iterable[str] = (),
                     status: BuildStatus = BuildStatus.QUEUED, cached: bool = False,
                     image_id: str | None = None, rebuild_of: str | None = None) -> Build:
        now = utcnow()
        done = status.finished
        with self.db.session() as s:
            row = BuildRow(
                id=str(uuid.uuid4()), owner_id=owner.id, template_digest=template_digest,
                template_text=template, template_parents=list(template_parents) or None,
                status=str(status), phase="", progress=1.0 if done else 0.0, log="",
                log_size=0, image_id=image_id, rebuild_of=rebuild_of, timings=None,
                cached=cached, created=now, started=now if done else None,
                finished=now if done else None)
            s.add(row)
            s.flush()
            return build_model(row, owner.name)

    def get_build(self, build_id: str, *, log_offset: int | None = None) -> Build:
        """The build; with `log_offset`, also the log from that character on."""
        with self.db.session() as s:
            row = self._build_row(s, build_id)
            if log_offset is None:
                return build_model(row, row.owner.name)
            offset = max(0, min(log_offset, row.log_size))
            text = s.scalar(select(func.substr(BuildRow.log, offset + 1))
                            .where(BuildRow.id == build_id)) or ""
            return build_model(row, row.owner.name, log=text, log_offset=offset)

    def build_ids_with_prefix(self, prefix: str) -> list[str]:
        """Every build id starting with `prefix` (callers filter what the viewer may see)."""
        with self.db.session() as s:
            return ids_with_prefix(s, BuildRow.id, prefix)

    def find_active_build(self, *, owner_id: int | None = None,
                          template_digest: str | None = None,
                          rebuild_of: str | None = None) -> Build | None:
        """The oldest queued or running build matching all the given fields."""
        stmt = select(BuildRow).where(BuildRow.status.in_(ACTIVE))
        if owner_id is not None:
            stmt = stmt.where(BuildRow.owner_id == owner_id)
        if template_digest is not None:
            stmt = stmt.where(BuildRow.template_digest == template_digest)
        stmt = stmt.where(BuildRow.rebuild_of.is_(None) if rebuild_of is None
                          else BuildRow.rebuild_of == rebuild_of)
        with self.db.session() as s:
            row = s.scalars(stmt.order_by(BuildRow.created, BuildRow.id).limit(1)).first()
            return build_model(row, row.owner.name) if row else None

    def list_builds(self, *, owner: str | None = None, image_id: str | None = None,
                    statuses: Iterable[str] = (), limit: int = 50,
                    offset: int = 0) -> tuple[list[Build], int]:
        """Newest first, without logs; `image_id` matches what built or rebuilds the image."""
        stmt = select(BuildRow)
        if owner is not None:
            stmt = stmt.where(BuildRow.owner.has(UserRow.name == owner))
        if image_id is not None:
            stmt = stmt.where(or_(BuildRow.image_id == image_id, BuildRow.rebuild_of == image_id))
        wanted = [str(BuildStatus(x)) for x in statuses]
        if wanted:
            stmt = stmt.where(BuildRow.status.in_(wanted))
        with self.db.session() as s:
            total = s.scalar(select(func.count()).select_from(stmt.subquery())) or 0
            rows = s.scalars(stmt.order_by(BuildRow.created.desc(), BuildRow.id)
                             .limit(limit).offset(offset)).all()
            return [build_model(r, r.owner.name) for r in rows], total

    def claim_build(self, worker: str) -> Build | None:
        """Take the oldest queued build for `worker` (queued → running), or None."""
        while True:
            with self.db.session() as s:
                build_id = s.scalar(select(BuildRow.id).where(
                    BuildRow.status == str(BuildStatus.QUEUED))
                    .order_by(BuildRow.created, BuildRow.id).limit(1))
            if build_id is None:
                return None
            now = utcnow()
            if self._cas(build_id, [BuildStatus.QUEUED], BuildStatus.RUNNING, started=now,
                         heartbeat=now, worker=worker):
                return self.get_build(build_id)
            # Another worker won that one: look again.

    def update_build(self, build_id: str, *, append_log: str = "", **fields: Any) -> None:
        """Progress of a running build: phase, progress, timings, heartbeat; more log."""
        values: dict[str, Any] = dict(fields)
        if append_log:
            values["log"] = BuildRow.log + append_log
            values["log_size"] = BuildRow.log_size + len(append_log)
        if not values:
            return
        with self.db.session() as s:
            s.execute(update(BuildRow).where(BuildRow.id == build_id).values(**values))

    def finish_build(self, build_id: str, status: BuildStatus, *,
                     expect: Iterable[BuildStatus] = (BuildStatus.RUNNING,),
                     **fields: Any) -> bool:
        """running (or `expect`) → a final status; False if the build was not in `expect`."""
        return self._cas(build_id, expect, status, finished=utcnow(), **fields)

    def request_cancel(self, build_id: str, error: str) -> BuildStatus | None:
        """queued → cancelled, or running → cancelling (with `error` saying who asked);
        the status it has now, or None if it was already over."""
        if self.finish_build(build_id, BuildStatus.CANCELLED, expect=[BuildStatus.QUEUED],
                             error=error):
            return BuildStatus.CANCELLED
        if self._cas(build_id, [BuildStatus.RUNNING], BuildStatus.CANCELLING, error=error):
            return BuildStatus.CANCELLING
        status = self.get_build(build_id).status
        return status if status is BuildStatus.CANCELLING else None

    def cancelling_builds(self, build_ids: Iterable[str]) -> set[str]:
        """Which of these builds were asked to stop (by this server or another)."""
        ids = list(build_ids)
        if not ids:
            return set()
        with self.db.session() as s:
            return set(s.scalars(select(BuildRow.id).where(
                BuildRow.id.in_(ids), BuildRow.status == str(BuildStatus.CANCELLING))))

    def fail_dead_builds(self, is_dead: Callable[[str, str | None, datetime | None], bool],
                         message: str) -> list[str]:
        """Mark running builds whose worker is gone as failed (those being cancelled as
        cancelled); returns their ids."""
        with self.db.session() as s:
            running = s.execute(select(BuildRow.id, BuildRow.worker, BuildRow.heartbeat,
                                       BuildRow.status)
                                .where(BuildRow.status.in_([str(BuildStatus.RUNNING),
                                                            str(BuildStatus.CANCELLING)]))).all()
        failed = []
        for build_id, worker, heartbeat, status in running:
            if not is_dead(build_id, worker, as_utc(heartbeat)):
                continue
            if status == str(BuildStatus.CANCELLING):
                ended = self.finish_build(build_id, BuildStatus.CANCELLED,
                                          expect=[BuildStatus.CANCELLING])
            else:
                ended = self.finish_build(build_id, BuildStatus.FAILED, error=message)
            if ended:
                failed.append(build_id)
        return failed

    def _cas(self, build_id: str, expect: Iterable[BuildStatus], to: BuildStatus,
             **fields: Any) -> bool:
        with self.db.session() as s:
            res = s.execute(
                update(BuildRow)
                .where(BuildRow.id == build_id, BuildRow.status.in_([str(e) for e in expect]))
                .values(status=str(to), **fields))
            return bool(res.rowcount)  # type: ignore[attr-defined]

    @staticmethod
    def _build_row(s: Session, build_id: str) -> BuildRow:
        row = s.get(BuildRow, build_id)
        if row is None:
            raise NotFound(f"no build {build_id!r}")
        return row
