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
survives a restart while queued; the queue reads and writes them only through
the repository's `BuildRecords` (rain.repo.builds), which also decides who may
see or cancel a build. `max_concurrent` worker threads per server
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
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

from rain.build.config import BuildConfig
from rain.build.progress import BufferedProgress
from rain.build.request import BuildRequest, parse_request
from rain.model import (
    Build,
    BuildStatus,
    Conflict,
    Image,
    ImageStatus,
    RainError,
    Unsupported,
    User,
)
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
        self.records = repo.build_records
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
        self._running: dict[str, BufferedProgress] = {}

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
            hit = self.repo.image_with_template(user, digest)
            if hit is not None:
                return self.records.record_template_hit(user, digest, text,
                                                        request.parent_texts, hit)
            purged = self.repo.image_with_template(user, digest, ImageStatus.PURGED)
            if purged is not None:
                return self.records.load(self.records.queue_rebuild(purged))
            same = self.records.running_build_of(user, digest)
            if same is not None:
                return same
            build = self.records.queue_build(user, digest, text, request.parent_texts)
        self._notify()
        return build

    def rebuild(self, viewer: User | None, ref: str) -> Build:
        """Rebuild a purged image now (owner or admin); joins a rebuild already going."""
        image = self.repo.purged_for_rebuild(viewer, ref)
        return self.records.load(self.rebuild_purged(image))

    def rebuild_purged(self, image: Image) -> str:
        """Start (or join) the rebuild of a purged image; the `Rebuilder` of the repository."""
        self._require_runner()
        with self._submit_lock:
            build_id = self.records.queue_rebuild(image)
        self._notify()
        return build_id

    def get(self, viewer: User | None, build_id: str, *, log_offset: int | None = 0) -> Build:
        """A build the viewer may see (rain.repo.builds says which), by id or unique prefix."""
        return self.records.get(viewer, build_id, log_offset=log_offset)

    def list_builds(self, viewer: User | None, *, image: str | None = None,
                    statuses: Sequence[str] = (), limit: int = 50,
                    offset: int = 0) -> tuple[list[Build], int]:
        """Own builds (admins: all), newest first; with `image`, the builds of that image."""
        return self.records.list_builds(viewer, image=image, statuses=statuses, limit=limit,
                                        offset=offset)

    def cancel(self, viewer: User | None, build_id: str) -> Build:
        """Cancel a build (its owner or an admin): a queued one ends `cancelled` now, a
        running one is `cancelling` until its worker has stopped it."""
        build = self.records.request_cancel(viewer, build_id)
        progress = self._running.get(build.id)
        if progress is not None:
            self._stop(progress, require_user(viewer).name)
        return build

    @staticmethod
    def _stop(progress: BufferedProgress, who: str) -> None:
        if not progress.cancelled.is_set():
            progress.log(f"cancel requested by {who}: stopping at the next step")
            progress.cancelled.set()

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
            self.records.abandon(build_id, "the server stopped while this build ran")
        for thread in self._threads:
            thread.join(timeout if thread.name == "rain-build-flush" else 0.1)

    def recover(self) -> list[str]:
        """Mark running builds whose server is gone failed; returns their ids."""
        return self.records.fail_dead(
            timedelta(seconds=self.config.stale_after_seconds), self._worker_gone,
            "the server running this build stopped before it finished")

    def _worker_gone(self, build_id: str, worker: str | None) -> bool:
        """A build with a fresh heartbeat: is its worker a process of this host that died?"""
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
                build = self.records.claim(self.worker)
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
                for build_id in self.records.asked_to_stop(list(self._running)):
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
        progress = BufferedProgress(self.records, build.id,
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
            if stopped and (progress.cancelled.is_set() or self.records.status(
                    build.id) is BuildStatus.CANCELLING):
                self._cancelled(build, progress, image_id)
        finally:
            self._running.pop(build.id, None)

    def _cancelled(self, build: Build, progress: BufferedProgress,
                   image_id: str | None) -> None:
        """End a build that was asked to stop; an image it made anyway is taken back."""
        if image_id is not None:
            try:
                self.records.take_back_image(build, image_id)
                progress.log(f"build cancelled: image {image_id} it had made was "
                             + ("purged again" if build.rebuild_of else "deleted"))
            except Exception:
                log.exception("build %s: cannot take back image %s", build.id, image_id)
        else:
            progress.log("build cancelled")
        self._finish(build, progress, BuildStatus.CANCELLED,
                     expect=[BuildStatus.RUNNING, BuildStatus.CANCELLING])

    def _run(self, build: Build, progress: BufferedProgress) -> str:
        runner = self._require_runner()
        owner = self.records.owner(build)
        request = replace(parse_request(build.template, build.template_parents),
                          digest=build.template_digest)
        before = self.records.image_before_rebuild(build)
        image_id = runner.run(owner, request, progress, rebuild_of=build.rebuild_of)
        if before is not None and image_id != before.id:
            raise Conflict(f"the builder rebuilt image {before.id} as {image_id}")
        image = self.records.record_image(image_id,
                                          replace(build, timings=dict(progress.timings)))
        if before is not None:
            progress.log(_package_change(before, image))
        return image_id

    def _finish(self, build: Build, reporter: BufferedProgress, status: BuildStatus,
                expect: Sequence[BuildStatus] = (BuildStatus.RUNNING,),
                **fields: Any) -> bool:
        with contextlib.suppress(Exception):
            reporter.flush()
        if not self.records.finish(build.id, status, expect=expect,
                                   timings=dict(reporter.timings), **fields):
            log.info("build %s had already been ended (%s)", build.id,
                     self.records.status(build.id))
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
