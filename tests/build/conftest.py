"""Fixtures for real builds: a bootable bookworm base disk, cached across test runs.

The base disk (debootstrap + boot packages + `make_disk`) takes a minute or
two to make, so it is kept in ``.pytest_cache/d/rain-base-disk/<key>/`` where
the key covers the release and the source of the modules that decide its
content; a later run (or `make test`) reuses it. Tests never modify it: they
open it read-only or work on a sparse copy. Downloaded packages are cached in
``.pytest_cache/d/rain-debootstrap`` (debootstrap) and
``.pytest_cache/d/rain-apt-archives`` (indexes and .debs rain fetches on the host
for apt in the sandbox).

Every fixture that attaches loop devices or mounts checks on the way out that
none of its own is left, and removes what it can if a test left some. Only its
own: other test sessions may be building on the same machine at the same time.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import rain.build.boot
import rain.build.disk
import rain.build.distros.debian
import rain.build.distros.debian_archive
from rain.build.disk import DiskInfo, copy_disk, disk_info, make_disk
from rain.build.distros import unmount_under
from rain.build.distros.debian import DebianInstaller
from rain.build.phases import PhaseTimer
from rain.sandbox import Sandbox

RELEASE = "bookworm"
BASE_SIZE = 2 * 1024**3
_KEY_SOURCES = (rain.build.disk, rain.build.distros.debian, rain.build.distros.debian_archive,
                rain.build.boot)
_REQUIRED_TOOLS = ("debootstrap", "sfdisk", "mke2fs", "losetup", "qemu-system-x86_64",
                   "extlinux", "gpgv")


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))


def require_image_tools() -> None:
    """Skip (with the reason) where real image builds cannot run at all."""
    if os.geteuid() != 0:
        pytest.skip("building images needs root (loop devices, mounts, namespaces)")
    missing = [tool for tool in _REQUIRED_TOOLS if _which(tool) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)} (make test installs them)")


def loop_devices_of(path: Path) -> list[str]:
    """Loop devices backed by `path` (`losetup -j`)."""
    out = subprocess.run(
        ["losetup", "--associated", str(path)], capture_output=True, text=True, check=False
    ).stdout
    return [line.split(":", 1)[0] for line in out.splitlines() if line.strip()]


def release_everything(path: Path) -> list[str]:
    """Detach loop devices of `path` and unmount their partitions; what had to be undone."""
    undone: list[str] = []
    for loop in loop_devices_of(path):
        for line in Path("/proc/mounts").read_text().splitlines():
            source, point = line.split()[:2]
            if source.startswith(loop):
                subprocess.run(["umount", "-l", point], check=False)
                undone.append(point)
        subprocess.run(["losetup", "-d", loop], check=False)
        undone.append(loop)
    return undone


@pytest.fixture(scope="session")
def apt_cache(request: pytest.FixtureRequest) -> Path:
    return Path(request.config.cache.mkdir("rain-apt-archives")).absolute()


@pytest.fixture(scope="session")
def debootstrap_cache(request: pytest.FixtureRequest) -> Path:
    return Path(request.config.cache.mkdir("rain-debootstrap")).absolute()


def _cache_key() -> str:
    digest = hashlib.sha256(RELEASE.encode())
    for module in _KEY_SOURCES:
        digest.update(Path(str(module.__file__)).read_bytes())
    return f"{RELEASE}-amd64-{digest.hexdigest()[:16]}"


def build_base_disk(
    out: Path, *, debootstrap_cache: Path, apt_cache: Path, work: Path
) -> tuple[DiskInfo, dict[str, float]]:
    """Bootstrap, boot packages, clean, disk: the from-scratch path, timed per phase."""
    installer = DebianInstaller(cache=apt_cache)
    timer = PhaseTimer()
    root = work / "root"
    try:
        with timer.phase("bootstrap"):
            installer.bootstrap(root, RELEASE, "amd64", cache_dir=debootstrap_cache)
        with timer.phase("boot packages"), Sandbox(root) as sandbox:
            installer.install(sandbox, installer.boot_packages("amd64", release=RELEASE),
                              release=RELEASE, arch="amd64")
            installer.configure_boot(sandbox)
            installer.clean(sandbox)
        with timer.phase("disk"):
            info = make_disk(root, out, BASE_SIZE)
    finally:
        unmount_under(root)
        shutil.rmtree(root, ignore_errors=True)
    return info, timer.seconds


@pytest.fixture(scope="session")
def base_disk(
    request: pytest.FixtureRequest, debootstrap_cache: Path, apt_cache: Path
) -> DiskInfo:
    """A bootable bookworm disk (raw), built once and reused until its recipe changes."""
    require_image_tools()
    cache = Path(request.config.cache.mkdir("rain-base-disk")).absolute()
    key = _cache_key()
    folder = cache / key
    disk = folder / "disk.raw"
    stamp = folder / "built.json"
    # Test sessions may run side by side on one checkout: one builds, the others wait.
    with open(cache / "lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.is_file() or not disk.is_file():
            _remove_stale(cache, keep=key)
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            with tempfile.TemporaryDirectory(dir=cache, prefix="work-") as work:
                _info, seconds = build_base_disk(
                    disk, debootstrap_cache=debootstrap_cache, apt_cache=apt_cache, work=Path(work)
                )
            stamp.write_text(json.dumps({"seconds": seconds}, indent=1))
            print(f"\nbase disk built from scratch: {seconds}")
        stamp.touch()
    assert loop_devices_of(disk) == []
    return disk_info(disk)


def _remove_stale(cache: Path, *, keep: str, unused_for: float = 3600.0) -> None:
    """Drop cached disks of other recipes (they are large) once no session used them lately."""
    for folder in cache.iterdir():
        if not folder.is_dir() or folder.name == keep:
            continue
        stamp = folder / "built.json"
        last_used = stamp.stat().st_mtime if stamp.exists() else 0.0
        if folder.name.startswith("work-") or time.time() - last_used > unused_for:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def disk_copy(base_disk: DiskInfo, tmp_path: Path) -> Iterator[Path]:
    """A sparse copy of the base disk that the test may change; released afterwards."""
    copy = tmp_path / "disk.raw"
    copy_disk(base_disk.path, copy)
    try:
        yield copy
    finally:
        leaked = release_everything(copy)
        copy.unlink(missing_ok=True)
        assert leaked == [], f"test left loop devices or mounts behind: {leaked}"
