"""Test double for the build runner: `RecordingRunner` builds nothing for real.

It stands in for the real builder (`rain.build.builder`, written separately)
in the tests of the job queue, purge/rebuild and the HTTP API. It does not
bootstrap, install or boot anything. It writes a small raw disk image — one
chunk shared by every image it makes, one chunk unique to the build (from the
template digest and a nonce, so a rebuild differs byte for byte as a real one
does), zeros after that — and pushes it through the repository, so what it
produces is a real image in a real store.

It reads the template's `run:` commands as instructions to itself:
`sleep SECONDS` (take that long, reporting progress), `fail MESSAGE` (fail
with ToolFailed), `wait FILE` (block until FILE exists: lets a test hold a
build running, even in a server process), `say N` (log N lines, as apt
does), `hold` (make a scratch directory, log its path, and report progress
until the build is cancelled — the
progress call raises then, as a real builder's next step would — removing
the directory on the way out), `ignore-cancel` (wait until the build is
asked to stop — or FILE, if given, exists — then finish anyway without
looking again: a runner that noticed too late). Other
commands are only logged.

A server process uses it with `RAIN_BUILD__RUNNER=tests.build.doubles:make_runner`.
"""

from __future__ import annotations

import hashlib
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rain.build.jobs import BuildProgress
from rain.build.request import BuildRequest, resolve_digest
from rain.build.template import BaseRef
from rain.model import ToolFailed, User
from rain.repo import Repository

CHUNK = 256 * 1024
IMAGE_SIZE = 4 * CHUNK
SHARED_CHUNK = random.Random("rain-test-shared").randbytes(CHUNK)


class RecordingRunner:
    """A `BuildRunner` that records its calls and pushes a small real image."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.calls: list[tuple[str, str | None]] = []  # (digest, rebuild_of) per run
        self.gate: threading.Event | None = None  # when set by a test, runs wait for it
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def resolve(self, viewer: User, request: BuildRequest) -> str:
        return resolve_digest(request, lambda ref: self._image_id(viewer, ref))

    def _image_id(self, viewer: User, ref: BaseRef) -> str:
        return self.repo.get(viewer, ref.image).id

    def run(self, viewer: User, request: BuildRequest, progress: BuildProgress, *,
            rebuild_of: str | None) -> str:
        with self._lock:
            self.calls.append((request.digest, rebuild_of))
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            return self._run(viewer, request, progress, rebuild_of)
        finally:
            with self._lock:
                self.active -= 1

    def _run(self, viewer: User, request: BuildRequest, progress: BuildProgress,
             rebuild_of: str | None) -> str:
        template = request.template
        started = time.monotonic()
        progress.phase("base")
        progress.log(f"test double: building {template.name} ({request.digest[:12]})")
        if self.gate is not None:
            self.gate.wait(30)
        progress.phase("install")
        for command in template.run:
            if command.split()[0] == "ignore-cancel":
                progress.log(f"+ {command}")
                until = Path(command.split()[1]) if len(command.split()) > 1 else None
                deadline = time.monotonic() + 60
                while not progress.cancelled.wait(0.05) and time.monotonic() < deadline:
                    if until is not None and until.exists():
                        break
                progress = _Deaf(progress)
                continue
            self._obey(command, progress)
        progress.timing("install", time.monotonic() - started)
        progress.phase("upload")
        with tempfile.TemporaryDirectory() as tmp:
            disk = Path(tmp) / "disk.raw"
            _write_disk(disk, request.digest)
            if rebuild_of is not None:
                image_id = self.repo.restore_file(viewer, rebuild_of, disk).id
            else:
                image_id = self._push(viewer, request, disk)
        progress.progress(1.0)
        progress.timing("upload", 0.01)
        progress.log(f"test double: image {image_id}")
        return image_id

    def _push(self, viewer: User, request: BuildRequest, disk: Path) -> str:
        template = request.template
        root = request.root.base
        meta: dict[str, Any] = {
            "name": template.name, "description": template.description,
            "os_distro": root.distro, "os_release": root.release, "arch": template.arch,
            "template_digest": request.digest,
            "packages": {p.split("=", 1)[0]: "1.0-test" for p in template.packages},
        }
        if template.version:
            meta["version"] = template.version
        if template.base.kind == "image":
            meta["parent"] = self._image_id(viewer, template.base)
        image = self.repo.create(viewer, meta, internal=True)
        return self.repo.upload_file(viewer, image.id, disk).id

    @staticmethod
    def _obey(command: str, progress: BuildProgress) -> None:
        verb, _, arg = command.partition(" ")
        progress.log(f"+ {command}")
        if verb == "sleep":
            steps = 10
            for step in range(steps):
                time.sleep(float(arg) / steps)
                progress.progress((step + 1) / steps)
        elif verb == "fail":
            raise ToolFailed(arg or "the test double was told to fail", tool="double")
        elif verb == "wait":
            deadline = time.monotonic() + 60
            while not Path(arg).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        elif verb == "say":
            for i in range(int(arg)):
                progress.log(f"Setting up package-{i} (1.0-{i}) ...")
        elif verb == "hold":
            with tempfile.TemporaryDirectory(prefix="rain-double-") as scratch:
                (Path(scratch) / "partial.raw").write_bytes(b"half an image")
                progress.log(f"scratch {scratch}")
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    progress.progress(0.5)  # raises BuildCancelled once cancelled
                    progress.cancelled.wait(0.05)
                raise ToolFailed("hold: never cancelled", tool="double")


class _Deaf:
    """A BuildProgress that no longer raises when cancelled (for `ignore-cancel`)."""

    def __init__(self, inner: BuildProgress) -> None:
        self.inner = inner
        self.cancelled = threading.Event()

    def phase(self, name: str) -> None:
        pass

    def progress(self, fraction: float) -> None:
        pass

    def log(self, line: str) -> None:
        self.inner.log(line)

    def timing(self, phase: str, seconds: float) -> None:
        self.inner.timing(phase, seconds)


def _write_disk(path: Path, digest: str) -> None:
    nonce = f"{digest}:{time.time_ns()}".encode()
    unique = random.Random(hashlib.sha256(nonce).digest()).randbytes(CHUNK)
    with open(path, "wb") as f:
        f.write(SHARED_CHUNK)
        f.write(unique)
        f.truncate(IMAGE_SIZE)


def make_runner(repo: Repository, config: object) -> RecordingRunner:
    """The `[build] runner` factory for server processes under test."""
    return RecordingRunner(repo)
