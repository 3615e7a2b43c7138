"""A small image tree for sandbox tests: an ext4 disk, loop-mounted, holding host binaries.

The tree is made the way a build's tree is (a real ext4 filesystem mounted
nodev,nosuid), but from the host's own binaries and their libraries rather
than a debootstrap, so it takes seconds: a shell, bash (for /dev/tcp),
coreutils, util-linux's mount/mknod/unshare, and the system Python 3 for
attempts a shell cannot make (raw syscalls). Every file is owned by uid 0
on disk, as in a real image.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

BINARIES = (
    "/bin/sh", "/bin/dash", "/usr/bin/bash", "/usr/bin/cat", "/usr/bin/ls", "/usr/bin/id",
    "/usr/bin/mkdir", "/usr/bin/touch", "/usr/bin/rm", "/usr/bin/ln", "/usr/bin/sleep",
    "/usr/bin/stat", "/usr/bin/head", "/usr/bin/tail", "/usr/bin/tr", "/usr/bin/readlink",
    "/usr/bin/dd", "/usr/bin/wc", "/usr/bin/grep", "/usr/bin/seq", "/usr/bin/chmod",
    "/usr/bin/mknod", "/usr/bin/mount", "/usr/bin/umount", "/usr/bin/hostname",
    "/usr/bin/unshare", "/usr/bin/echo", "/usr/bin/true", "/usr/bin/env", "/usr/sbin/chroot",
    "/usr/bin/python3.11",
)
IMAGE_BYTES = 768 * 1024**2


def processes_with(text: str) -> list[int]:
    """Host processes whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                found.append(int(entry.name))
    return found


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("sandbox tests need root (loop devices, namespaces, idmapped mounts)")


def _libraries(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False).stdout
    found = []
    for line in out.splitlines():
        for word in line.split():
            if word.startswith("/"):
                found.append(word)
    return found


def _copy_libraries(root: Path, binary: str) -> None:
    for lib in _libraries(binary):
        target = root / lib.lstrip("/")  # /lib and /lib64 are relative links into usr
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            shutil.copy2(os.path.realpath(lib), target)


def populate(root: Path) -> None:
    """Copy the host binaries, their libraries and Python's standard library into `root`."""
    for directory in ("usr/bin", "usr/lib", "usr/lib64", "etc", "tmp", "root", "var/tmp"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    for link, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64"),
                         ("sbin", "usr/bin")):
        if not (root / link).exists():
            (root / link).symlink_to(target)
    (root / "tmp").chmod(0o1777)
    for binary in BINARIES:
        real = os.path.realpath(binary)
        dest = root / "usr/bin" / Path(binary).name
        if not dest.exists():
            shutil.copy2(real, dest)
        _copy_libraries(root, real)
    (root / "usr/bin/python3").symlink_to("python3.11")
    shutil.copytree("/usr/lib/python3.11", root / "usr/lib/python3.11", symlinks=True,
                    ignore=shutil.ignore_patterns("dist-packages", "site-packages", "test",
                                                  "idlelib", "tkinter", "ensurepip"))
    for module in (root / "usr/lib/python3.11/lib-dynload").glob("*.so"):
        _copy_libraries(root, str(module))
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                     "nobody:x:65534:65534:nobody:/:/bin/false\n")
    (root / "etc/group").write_text("root:x:0:\ntty:x:5:\nnogroup:x:65534:\n")
    (root / "etc/hostname").write_text("image\n")


@pytest.fixture(scope="session")
def image_disk() -> Iterator[Path]:
    """An ext4 disk file holding the small image (made once per session)."""
    require_root()
    with tempfile.TemporaryDirectory(prefix="rain-sandbox-test-") as tmp:
        disk = Path(tmp) / "image.ext4"
        with open(disk, "wb") as f:
            f.truncate(IMAGE_BYTES)
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", str(disk)], check=True)
        mnt = Path(tmp) / "mnt"
        mnt.mkdir()
        subprocess.run(["mount", "-o", "loop,nodev,nosuid", str(disk), str(mnt)], check=True)
        try:
            populate(mnt)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        yield disk


@pytest.fixture
def image_root(image_disk: Path, tmp_path: Path) -> Iterator[Path]:
    """The small image mounted (nodev,nosuid, as the builder mounts disks) from a fresh copy."""
    copy = tmp_path / "image.ext4"
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(image_disk), str(copy)],
                   check=True)
    mnt = tmp_path / "root"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop,nodev,nosuid", str(copy), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        leftover = subprocess.run(["losetup", "-j", str(copy)], capture_output=True,
                                  text=True, check=False).stdout
        for line in leftover.splitlines():
            subprocess.run(["losetup", "-d", line.split(":", 1)[0]], check=False)
