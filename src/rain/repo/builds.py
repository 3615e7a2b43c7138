"""Build records: what the build queue (rain.build.jobs) keeps in the repository, and who
may see and cancel a build.

The queue never touches the catalog itself: it files jobs, claims them, reports
their progress and ends them through `BuildRecords` (`Repository.build_records`).
The methods that take a `viewer` are the permission-checked ones a route calls
through the queue; the others are the server's own bookkeeping for jobs whose
submitter was checked when they asked.

A build is visible to its owner, to admins, and to anyone who may see the image
it made or remakes; to everyone else it does not exist (NotFound, never
Forbidden). Only its owner or an admin may cancel it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rain.catalog import Catalog, is_id_prefix, unique_prefix
from rain.model import (
    Build,
    BuildStatus,
    Conflict,
    DiskFormat,
    Forbidden,
    Image,
    ImageStatus,
    InvalidRequest,
    NotFound,
    RainError,
    User,
)
from rain.model.clock import utcnow
from rain.repo.access import require_user

if TYPE_CHECKING:
    from rain.repo.service import Download, Repository


class BuilderRepository(Protocol):
    """The part of `Repository` an image builder (rain.build.builder) uses: every call
    as the user the build runs as, so it can read and make only what that user may."""

    def get(self, viewer: User | None, ref: str) -> Image: ...

    def image_with_template(self, viewer: User | None, digest: str,
                            status: ImageStatus = ImageStatus.ACTIVE) -> Image | None: ...

    def open_download(self, viewer: User | None, ref: str,
                      fmt: DiskFormat | None = None) -> Download: ...

    def create(self, viewer: User | None, meta: dict[str, Any], *,
               internal: bool = False) -> Image: ...

    def upload_file(self, viewer: User | None, ref: str, path: Path,
                    declared: DiskFormat | None = None) -> Image: ...

    def record_template(self, viewer: User | None, ref: str, digest: str, *,
                        text: str | None = None, parents: list[str] | None = None) -> Image: ...

    def rebuild_base(self, viewer: User | None, ref: str) -> Image: ...

    def restore_file(self, viewer: User | None, ref: str, path: Path,
                     declared: DiskFormat | None = None,
                     properties: dict[str, str] | None = None,
                     drop: tuple[str, ...] = ()) -> Image: ...


class BuildRecords:
    """The build queue's interface to the repository."""

    def __init__(self, repo: Repository) -> None:
        self._repo = repo
        self._catalog: Catalog = repo.catalog

    # -- what users see (permission-checked) -------------------------------------
    def get(self, viewer: User | None, build_id: str, *, log_offset: int | None = 0) -> Build:
        """A build the viewer may see, by id or unique id prefix; anything else is 404."""
        if viewer is None and not self._repo.config.anonymous_read:
            require_user(viewer)
        try:
            build = self._catalog.get_build(build_id, log_offset=log_offset)
        except NotFound:
            if not is_id_prefix(build_id):
                raise
            seen = [b for b in map(self._catalog.get_build,
                                   self._catalog.build_ids_with_prefix(build_id))
                    if self.may_see(viewer, b)]
            found = unique_prefix("build", build_id, seen,
                                  lambda b: f"{b.id} ({b.owner}, {b.status})")
            return self._catalog.get_build(found.id, log_offset=log_offset)
        if not self.may_see(viewer, build):
            raise NotFound(f"no build {build_id!r}")
        return build

    def list_builds(self, viewer: User | None, *, image: str | None = None,
                    statuses: Sequence[str] = (), limit: int = 50,
                    offset: int = 0) -> tuple[list[Build], int]:
        """Own builds (admins: all), newest first; with `image`, the builds of that image
        (which the viewer must be able to see)."""
        me = require_user(viewer)
        if not 1 <= limit <= 1000 or offset < 0:
            raise InvalidRequest("limit must be 1..1000 and offset >= 0")
        if image is not None:
            image_id = self._repo.get(me, image).id
            return self._catalog.list_builds(image_id=image_id, statuses=statuses,
                                             limit=limit, offset=offset)
        return self._catalog.list_builds(owner=None if me.is_admin else me.name,
                                         statuses=statuses, limit=limit, offset=offset)

    def request_cancel(self, viewer: User | None, build_id: str) -> Build:
        """Ask a build to stop (its owner or an admin): a queued one is `cancelled` now, a
        running one `cancelling`; a build that is over is a 409. Returns it as it is now."""
        build = self.get(viewer, build_id, log_offset=None)
        me = require_user(viewer)
        if not (me.is_admin or me.name == build.owner):
            raise Forbidden(f"only the owner or an admin may cancel build {build.id}")
        if self._catalog.request_cancel(build.id, f"cancelled by {me.name}") is None:
            raise Conflict(f"build {build.id} has already {_ended(self.status(build.id))}; "
                           "there is nothing to cancel")
        return self._catalog.get_build(build.id)

    def may_see(self, viewer: User | None, build: Build) -> bool:
        if viewer is not None and (viewer.is_admin or viewer.name == build.owner):
            return True
        for image_id in {build.image_id, build.rebuild_of} - {None}:
            with contextlib.suppress(RainError):
                self._repo.get(viewer, str(image_id))
                return True
        return False

    # -- filing jobs (the submitter was checked by the queue) ---------------------
    def record_template_hit(self, user: User, digest: str, text: str,
                            parents: Iterable[str], image: Image) -> Build:
        """A build that succeeded at once: `image` already has the template's digest."""
        build = self._catalog.create_build(
            user, template_digest=digest, template=text, template_parents=parents,
            status=BuildStatus.SUCCEEDED, cached=True, image_id=image.id)
        self._catalog.update_build(build.id, append_log=(
            f"template hit: image {image.id} ({image.name}) already has template digest "
            f"{digest}; nothing to build\n"))
        return self._catalog.get_build(build.id)

    def running_build_of(self, user: User, digest: str) -> Build | None:
        """The user's queued or running build of this template digest, to join."""
        return self._catalog.find_active_build(owner_id=user.id, template_digest=digest)

    def queue_build(self, user: User, digest: str, text: str,
                    parents: Iterable[str]) -> Build:
        return self._catalog.create_build(user, template_digest=digest, template=text,
                                          template_parents=parents)

    def queue_rebuild(self, image: Image) -> str:
        """The build id of the purged image's rebuild: the one going, or a new one."""
        same = self._catalog.find_active_build(rebuild_of=image.id)
        if same is not None:
            return same.id
        if not image.template or not image.template_digest:
            raise Conflict(f"image {image.id} has no template and cannot be rebuilt")
        # The image's owner rebuilds it, whoever asked: it resolves and is stored as theirs.
        owner = self._catalog.get_user(image.owner)
        return self._catalog.create_build(
            owner, template_digest=image.template_digest, template=image.template,
            template_parents=image.template_parents, rebuild_of=image.id).id

    def load(self, build_id: str) -> Build:
        """The build, without its log (as the queue answers a request it just served)."""
        return self._catalog.get_build(build_id)

    # -- running jobs --------------------------------------------------------------
    def claim(self, worker: str) -> Build | None:
        """The oldest queued build, now running for `worker`, or None."""
        return self._catalog.claim_build(worker)

    def owner(self, build: Build) -> User:
        """Who a build runs as."""
        return self._catalog.get_user(build.owner)

    def image_before_rebuild(self, build: Build) -> Image | None:
        """The purged image a rebuild remakes, as it was before (None for a new build)."""
        return self._catalog.get_image(build.rebuild_of) if build.rebuild_of else None

    def report(self, build_id: str, log_text: str, **fields: Any) -> None:
        """Progress of a running build (phase, progress, timings), more log, and "alive"."""
        self._catalog.update_build(build_id, append_log=log_text, heartbeat=utcnow(),
                                   **fields)

    def status(self, build_id: str) -> BuildStatus:
        return self._catalog.get_build(build_id).status

    def asked_to_stop(self, build_ids: Iterable[str]) -> set[str]:
        """Which of these builds were asked to stop (by this server or another)."""
        return self._catalog.cancelling_builds(build_ids)

    def record_image(self, image_id: str, build: Build) -> Image:
        """Once a build produced `image_id`: keep its template and timings on the image.

        Refuses an image whose template digest is already a different one.
        """
        image = self._catalog.get_image(image_id)
        if image.template_digest not in (None, build.template_digest):
            raise Conflict(f"image {image_id} has template digest {image.template_digest}, "
                           f"not {build.template_digest}")
        return self._catalog.update_image(
            image_id, template_digest=build.template_digest, template_text=build.template,
            template_parents=list(build.template_parents) or None, build_id=build.id,
            build_timings=dict(build.timings))

    def take_back_image(self, build: Build, image_id: str) -> None:
        """A cancelled build made its image anyway: purge it again (a rebuild) or delete it."""
        if build.rebuild_of:
            self._catalog.transition(image_id, [ImageStatus.ACTIVE], ImageStatus.PURGED,
                                     manifest_id=None, stored_bytes=0)
        else:
            self._catalog.transition(image_id, [s for s in ImageStatus
                                                if s != ImageStatus.DELETED],
                                     ImageStatus.DELETED)
            self._catalog.drop_variants(image_id)

    def finish(self, build_id: str, status: BuildStatus, *,
               expect: Sequence[BuildStatus] = (BuildStatus.RUNNING,), **fields: Any) -> bool:
        """running (or `expect`) → a final status; False if the build was not in `expect`."""
        return self._catalog.finish_build(build_id, status, expect=expect, **fields)

    def abandon(self, build_id: str, reason: str) -> None:
        """This server stops while the build runs: failed, or cancelled if it was asked to."""
        self._catalog.finish_build(build_id, BuildStatus.FAILED, error=reason)
        self._catalog.finish_build(build_id, BuildStatus.CANCELLED,
                                   expect=[BuildStatus.CANCELLING])

    def fail_dead(self, stale_after: timedelta, worker_gone: Callable[[str, str | None], bool],
                  reason: str) -> list[str]:
        """End the running builds whose server is gone: those whose heartbeat is older than
        `stale_after`, and those `worker_gone(build_id, worker)` says died. Their ids."""
        def dead(build_id: str, worker: str | None, heartbeat: datetime | None) -> bool:
            if heartbeat is None or heartbeat < utcnow() - stale_after:
                return True
            return worker_gone(build_id, worker)
        return self._catalog.fail_dead_builds(dead, reason)


def _ended(status: str) -> str:
    """`succeeded`, `failed`, `been cancelled`: what "build X has already …" ends with."""
    return {"succeeded": "succeeded", "failed": "failed"}.get(str(status), f"been {status}")
