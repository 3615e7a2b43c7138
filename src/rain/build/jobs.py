"""Build jobs: a queue in the catalog, a few worker threads, and the runner interface.

`BuildQueue.submit` parses the template (a bad one is a 400 naming its line,
and no job), resolves its digest, and then, cheapest first:

1. an active image the caller may see already has that digest — a *template
   hit*: a build that succeeded at once (`cached`), pointing at that image;
2. a purged image the caller may see has it — that image's rebuild job;
3. the caller already has a queued or running build of that digest — that
   job: identical concurrent requests share one;
4. otherwise a new queued job.

Jobs live in the catalog, so several servers can share a queue and a job
survives a restart while queued. `max_concurrent` worker threads per server
claim the oldest queued job (compare-and-set), run it through the
`BuildRunner`, and record the result. A running job whose server died is
marked failed — by the next server to start on that host at once, by any
server once its heartbeat is `stale_after_seconds` old.

Cancelling a queued build ends it at once; a running one is marked
`cancelling` in the catalog. Its worker learns it (at once on this server,
within a flush on another), its progress object raises `BuildCancelled`
at the builder's next step, the builder's temporary files go with the
exception, and the build ends `cancelled`. An image the run made anyway (it
finished before it noticed) is deleted again — or, for a rebuild, purged
again — so a cancelled build leaves no image behind.

The runner, which really builds, is found through `[build] runner`
(default `rain.build.builder:make_runner`); without it the server still
serves build records, purges and pedigrees, and answers 501 to new builds.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from rain.build.config import BuildConfig
from rain.build.progress import CatalogProgress
from rain.build.request import BuildRequest, parse_request
from rain.catalog import is_id_prefix, unique_prefix
from rain.model import (
    Build,
    BuildStatus,
    Conflict,
    Forbidden,
    Image,
    ImageStatus,
    InvalidRequest,
    NotFound,
    RainError,
    Unsupported,
    User,
)
from rain.model.clock import utcnow
from rain.model.errors import BuildCancelled
from rain.repo import Repository
from rain.repo.access import require_user

if TYPE_CHECKING:
    from rain.config import Config

log = logging.getLogger("rain.build.jobs")
FLUSH_SECONDS = 0.5
HEARTBEAT_SECONDS = 10.0
SWEEP_SECONDS = 30.0


class BuildProgress(Protocol):
    """What a running build reports. Any thread may call these, as often as it likes.

    `cancelled` is set once the build is asked to stop; `phase` and `progress`
    then raise BuildCancelled. Pass `cancelled` to a long step that can be
    killed (`Sandbox.run(..., cancel=progress.cancelled)`)."""

    cancelled: threading.Event

    def phase(self, name: str) -> None:
        """Entering a phase ("base", "install", "disk", "compress", "boot-test", "upload");
        resets progress to 0."""

    def progress(self, fraction: float) -> None:
        """How far the current phase is, 0.0 to 1.0."""

    def log(self, line: str) -> None:
        """One line of the build log."""

    def timing(self, phase: str, seconds: float) -> None:
        """Seconds spent in a phase (recorded on the build and on the image)."""


class BuildRunner(Protocol):
    """Builds images. `rain.build.builder.make_runner(repo, config)` returns one."""

    def resolve(self, viewer: User, request: BuildRequest) -> str:
        """The template digest, with the parent resolved as `viewer` sees it.

        Raises InvalidRequest or NotFound (e.g. `from: image:X` that the viewer
        cannot see). `rain.build.request.resolve_digest` does the usual thing.
        """

    def run(self, viewer: User, request: BuildRequest, progress: BuildProgress, *,
            rebuild_of: str | None) -> str:
        """Build `request` (its `digest` is set) as `viewer` and return the image id.

        New builds create the image in the repository (with `template_digest`,
        `parent`, packages …) and upload it (`Repository.upload_file`). With
        `rebuild_of`, the purged image of that id gets new content instead
        (`Repository.restore_file`) and its id is returned. Raise on failure —
        preferably a RainError, whose message becomes the build's error.
        """


def load_runner(repo: Repository, config: Config) -> tuple[BuildRunner | None, str]:
    """The runner named by `[build] runner`, or (None, why not) when it is not installed."""
    spec = config.build.runner
    module_name, _, function = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name):
            raise  # the runner's module exists but something it imports is missing
        return None, (f"this server has no image builder ({module_name} is not installed); "
                      "it can show, purge and list images and builds but not build")
    try:
        runner: BuildRunner = getattr(module, function or "make_runner")(repo, config)
    except Unsupported as exc:  # e.g. a tool the builder needs is missing
        return None, exc.message
    return runner, ""


class BuildQueue:
    def __init__(self, repo: Repository, runner: BuildRunner | None,
                 config: BuildConfig | None = None, *, unavailable: str = "") -> None:
        self.repo = repo
        self.catalog = repo.catalog
        self.runner = runner
        self.config = config or BuildConfig()
        self.unavailable = unavailable or "this server has no image builder"
        self.retry_after = self.config.retry_after
        self.host = socket.gethostname()
        self.worker = f"{self.host}:{os.getpid()}"
        self._submit_lock = threading.Lock()
        self._wake = threading.Condition()
        self._generation = 0
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._running: dict[str, CatalogProgress] = {}

    # -- requests --------------------------------------------------------------
    def submit(self, viewer: User | None, text: str, parents: Sequence[str] = (),
               sources: Sequence[str] = ()) -> Build:
        """Start (or join, or answer from the catalog) the build of a template; `parents`
        are the texts of the templates it extends, `sources` names for error messages."""
        user = require_user(viewer)
        request = parse_request(text, parents, sources)
        runner = self._require_runner()
        digest = runner.resolve(user, request)
        with self._submit_lock:
            hit = self.catalog.image_with_template(digest, user)
            if hit is not None:
                build = self.catalog.create_build(
                    user, template_digest=digest, template=text,
                    template_parents=request.parent_texts, status=BuildStatus.SUCCEEDED,
                    cached=True, image_id=hit.id)
                self.catalog.update_build(build.id, append_log=(
                    f"template hit: image {hit.id} ({hit.name}) already has template digest "
                    f"{digest}; nothing to build\n"))
                return self.catalog.get_build(build.id)
            purged = self.catalog.image_with_template(digest, user, ImageStatus.PURGED)
            if purged is not None:
                return self.catalog.get_build(self._rebuild_locked(purged))
            same = self.catalog.find_active_build(owner_id=user.id, template_digest=digest)
            if same is not None:
                return same
            build = self.catalog.create_build(user, template_digest=digest, template=text,
                                              template_parents=request.parent_texts)
        self._notify()
        return build

    def rebuild(self, viewer: User | None, ref: str) -> Build:
        """Rebuild a purged image now (owner or admin); joins a rebuild already going."""
        image = self.repo.purged_for_rebuild(viewer, ref)
        return self.catalog.get_build(self.rebuild_purged(image))

    def rebuild_purged(self, image: Image) -> str:
        """Start (or join) the rebuild of a purged image; the `Rebuilder` of the repository."""
        self._require_runner()
        with self._submit_lock:
            build_id = self._rebuild_locked(image)
        self._notify()
        return build_id

    def _rebuild_locked(self, image: Image) -> str:
        same = self.catalog.find_active_build(rebuild_of=image.id)
        if same is not None:
            return same.id
        if not image.template or not image.template_digest:
            raise Conflict(f"image {image.id} has no template and cannot be rebuilt")
        # The image's owner rebuilds it, whoever asked: it resolves and is stored as theirs.
        owner = self.catalog.get_user(image.owner)
        return self.catalog.create_build(
            owner, template_digest=image.template_digest, template=image.template,
            template_parents=image.template_parents, rebuild_of=image.id).id

    def get(self, viewer: User | None, build_id: str, *, log_offset: int | None = 0) -> Build:
        """A build the viewer may see, by id or unique id prefix: their own, or one that
        made or remakes an image they may see (admins see all); anything else is 404."""
        if viewer is None and not self.repo.config.anonymous_read:
            require_user(viewer)
        try:
            build = self.catalog.get_build(build_id, log_offset=log_offset)
        except NotFound:
            if not is_id_prefix(build_id):
                raise
            seen = [b for b in map(self.catalog.get_build,
                                   self.catalog.build_ids_with_prefix(build_id))
                    if self._may_see(viewer, b)]
            found = unique_prefix("build", build_id, seen,
                                  lambda b: f"{b.id} ({b.owner}, {b.status})")
            return self.catalog.get_build(found.id, log_offset=log_offset)
        if not self._may_see(viewer, build):
            raise NotFound(f"no build {build_id!r}")
        return build

    def list_builds(self, viewer: User | None, *, image: str | None = None,
             statuses: Sequence[str] = (), limit: int = 50,
             offset: int = 0) -> tuple[list[Build], int]:
        """Own builds (admins: all), newest first; with `image`, the builds of that image."""
        me = require_user(viewer)
        if not 1 <= limit <= 1000 or offset < 0:
            raise InvalidRequest("limit must be 1..1000 and offset >= 0")
        if image is not None:
            image_id = self.repo.get(me, image).id
            return self.catalog.list_builds(image_id=image_id, statuses=statuses,
                                            limit=limit, offset=offset)
        return self.catalog.list_builds(owner=None if me.is_admin else me.name,
                                        statuses=statuses, limit=limit, offset=offset)

    def cancel(self, viewer: User | None, build_id: str) -> Build:
        """Cancel a build (its owner or an admin): a queued one ends `cancelled` now, a
        running one is `cancelling` until its worker has stopped it."""
        build = self.get(viewer, build_id, log_offset=None)
        build_id = build.id  # the whole id, when a prefix was given
        me = require_user(viewer)
        if not (me.is_admin or me.name == build.owner):
            raise Forbidden(f"only the owner or an admin may cancel build {build_id}")
        status = self.catalog.request_cancel(build_id, f"cancelled by {me.name}")
        if status is None:
            now = self.catalog.get_build(build_id).status
            raise Conflict(f"build {build_id} has already {_ended(now)}; there is nothing to "
                           "cancel")
        progress = self._running.get(build_id)
        if progress is not None:
            self._stop(progress, me.name)
        return self.catalog.get_build(build_id)

    @staticmethod
    def _stop(progress: CatalogProgress, who: str) -> None:
        if not progress.cancelled.is_set():
            progress.log(f"cancel requested by {who}: stopping at the next step")
            progress.cancelled.set()

    def _may_see(self, viewer: User | None, build: Build) -> bool:
        if viewer is not None and (viewer.is_admin or viewer.name == build.owner):
            return True
        for image_id in {build.image_id, build.rebuild_of} - {None}:
            with contextlib.suppress(RainError):
                self.repo.get(viewer, str(image_id))
                return True
        return False

    def _require_runner(self) -> BuildRunner:
        if self.runner is None:
            raise Unsupported(self.unavailable)
        return self.runner

    # -- workers ------------------------------------------------------------------
    def start(self) -> None:
        """Fail what died with an earlier server, then start the workers and the flusher."""
        failed = self.recover()
        if failed:
            log.warning("marked %d build(s) of a stopped server failed: %s", len(failed),
                        ", ".join(failed))
        if self.runner is not None:
            for n in range(max(1, self.config.max_concurrent)):
                self._spawn(self._work, f"rain-build-{n}")
        self._spawn(self._maintain, "rain-build-flush")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking jobs; builds still running are marked failed (they cannot finish)."""
        self._stopping.set()
        self._notify()
        for build_id, progress in list(self._running.items()):
            with contextlib.suppress(Exception):
                progress.log("the server stopped while this build ran")
                progress.flush()
            self.catalog.finish_build(build_id, BuildStatus.FAILED,
                                      error="the server stopped while this build ran")
            self.catalog.finish_build(build_id, BuildStatus.CANCELLED,
                                      expect=[BuildStatus.CANCELLING])
        for thread in self._threads:
            thread.join(timeout if thread.name == "rain-build-flush" else 0.1)

    def recover(self) -> list[str]:
        """Mark running builds whose server is gone failed; returns their ids."""
        return self.catalog.fail_dead_builds(
            self._is_dead, "the server running this build stopped before it finished")

    def _is_dead(self, build_id: str, worker: str | None, heartbeat: datetime | None) -> bool:
        if heartbeat is None or heartbeat < utcnow() - timedelta(
                seconds=self.config.stale_after_seconds):
            return True
        host, _, pid = (worker or "").rpartition(":")
        if host != self.host or not pid.isdigit():
            return False  # another machine's build with a fresh heartbeat
        if int(pid) == os.getpid():
            return build_id not in self._running
        return not _pid_alive(int(pid))

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _notify(self) -> None:
        with self._wake:
            self._generation += 1
            self._wake.notify_all()

    def _work(self) -> None:
        while not self._stopping.is_set():
            with self._wake:
                seen = self._generation
            try:
                build = self.catalog.claim_build(self.worker)
            except Exception:
                log.exception("cannot read the build queue")
                build = None
            if build is None:
                with self._wake:
                    if self._generation == seen and not self._stopping.is_set():
                        self._wake.wait(self.config.poll_seconds)
                continue
            self._execute(build)

    def _maintain(self) -> None:
        """Flush running builds' reports twice a second; sweep for dead builds now and then."""
        swept = 0.0
        while not self._stopping.wait(FLUSH_SECONDS):
            for progress in list(self._running.values()):
                try:
                    progress.flush(heartbeat_every=HEARTBEAT_SECONDS)
                except Exception:
                    log.exception("cannot record the progress of build %s", progress.build_id)
            try:  # cancel requests made through another server sharing the catalog
                for build_id in self.catalog.cancelling_builds(list(self._running)):
                    stopping = self._running.get(build_id)
                    if stopping is not None:
                        self._stop(stopping, "a user (through another server)")
            except Exception:
                log.exception("cannot read cancel requests")
            swept += FLUSH_SECONDS
            if swept >= SWEEP_SECONDS:
                swept = 0.0
                with contextlib.suppress(Exception):
                    self.recover()

    def _execute(self, build: Build) -> None:
        progress = CatalogProgress(self.catalog, build.id,
                                   max_log_chars=self.config.max_log_chars,
                                   log_size=build.log_size)
        self._running[build.id] = progress
        try:
            image_id = self._run(build, progress)
        except BaseException as exc:
            if isinstance(exc, BuildCancelled) or (
                    isinstance(exc, Exception) and progress.cancelled.is_set()):
                self._cancelled(build, progress, None)
                return
            message = exc.message if isinstance(exc, RainError) else (
                f"{type(exc).__name__}: {exc}")
            if not isinstance(exc, RainError):
                log.exception("build %s failed", build.id)
            progress.log(f"build failed: {message}")
            self._finish(build, progress, BuildStatus.FAILED, error=message)
            if not isinstance(exc, Exception):
                raise
        else:
            # Asked to stop while it finished: a success the CAS refuses (cancelling).
            stopped = progress.cancelled.is_set() or not self._finish(
                build, progress, BuildStatus.SUCCEEDED, image_id=image_id, progress=1.0)
            if stopped and (progress.cancelled.is_set() or self.catalog.get_build(
                    build.id).status is BuildStatus.CANCELLING):
                self._cancelled(build, progress, image_id)
        finally:
            self._running.pop(build.id, None)

    def _cancelled(self, build: Build, progress: CatalogProgress, image_id: str | None) -> None:
        """End a build that was asked to stop; an image it made anyway is taken back."""
        if image_id is not None:
            try:
                self._discard(build, image_id)
                progress.log(f"build cancelled: image {image_id} it had made was "
                             + ("purged again" if build.rebuild_of else "deleted"))
            except Exception:
                log.exception("build %s: cannot take back image %s", build.id, image_id)
        else:
            progress.log("build cancelled")
        self._finish(build, progress, BuildStatus.CANCELLED,
                     expect=[BuildStatus.RUNNING, BuildStatus.CANCELLING])

    def _discard(self, build: Build, image_id: str) -> None:
        if build.rebuild_of:
            self.catalog.transition(image_id, [ImageStatus.ACTIVE], ImageStatus.PURGED,
                                    manifest_id=None, stored_bytes=0)
        else:
            self.catalog.transition(image_id, [s for s in ImageStatus
                                               if s != ImageStatus.DELETED],
                                    ImageStatus.DELETED)
            self.catalog.drop_variants(image_id)

    def _run(self, build: Build, progress: CatalogProgress) -> str:
        runner = self._require_runner()
        owner = self.catalog.get_user(build.owner)
        request = replace(parse_request(build.template, build.template_parents),
                          digest=build.template_digest)
        before = self.catalog.get_image(build.rebuild_of) if build.rebuild_of else None
        image_id = runner.run(owner, request, progress, rebuild_of=build.rebuild_of)
        if before is not None and image_id != before.id:
            raise Conflict(f"the builder rebuilt image {before.id} as {image_id}")
        image = self.repo.record_build(image_id, replace(build, timings=dict(progress.timings)))
        if before is not None:
            progress.log(_package_change(before, image))
        return image_id

    def _finish(self, build: Build, reporter: CatalogProgress, status: BuildStatus,
                expect: Sequence[BuildStatus] = (BuildStatus.RUNNING,),
                **fields: Any) -> bool:
        with contextlib.suppress(Exception):
            reporter.flush()
        if not self.catalog.finish_build(build.id, status, expect=expect,
                                         timings=dict(reporter.timings), **fields):
            log.info("build %s had already been ended (%s)", build.id,
                     self.catalog.get_build(build.id).status)
            return False
        return True


def _package_change(before: Image, after: Image) -> str:
    old, new = set(before.packages), set(after.packages)
    if old == new:
        return f"rebuilt with the same package set ({len(new)} packages)"
    added, removed = sorted(new - old), sorted(old - new)
    return (f"rebuilt, but the package set changed: added {', '.join(added) or '-'}; "
            f"removed {', '.join(removed) or '-'}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ended(status: str) -> str:
    """`succeeded`, `failed`, `been cancelled`: what "build X has already …" ends with."""
    return {"succeeded": "succeeded", "failed": "failed"}.get(str(status), f"been {status}")
