"""Chroot: mounts exist inside only, vanish afterwards; files put back; strays killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rain.build.chroot import POLICY_RC_D, Chroot, inside_root
from rain.build.disk import DiskInfo, copy_disk, open_disk
from rain.build.distros import mounts_under
from rain.formats.tool import ToolExitError
from rain.model.errors import InvalidImage, ToolFailed

from .conftest import release_everything

pytestmark = pytest.mark.integration

EXPECTED_INSIDE = (
    ("/proc", "proc"),
    ("/sys", "sysfs"),
    ("/dev", "tmpfs"),
    ("/dev/pts", "devpts"),
    ("/dev/shm", "tmpfs"),
    ("/run", "tmpfs"),
    ("/var/cache/apt/archives", None),
)


@pytest.fixture(scope="module")
def root(base_disk: DiskInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The base image's root filesystem, mounted from a private copy for this module."""
    copy = tmp_path_factory.mktemp("chroot") / "disk.raw"
    copy_disk(base_disk.path, copy)
    try:
        with open_disk(copy) as mounted:
            yield mounted
    finally:
        leaked = release_everything(copy)
        copy.unlink(missing_ok=True)
        assert leaked == []


def _host_mounts_below(root: Path) -> list[Path]:
    return [p for p in mounts_under(root) if p != root]


def _processes_with(text: str) -> list[int]:
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


def test_mounts_exist_inside_only_and_files_are_restored(root: Path, tmp_path: Path) -> None:
    resolv_before = os.readlink(root / "etc/resolv.conf")
    cache = tmp_path / "apt-cache"
    assert not (root / "usr/sbin/policy-rc.d").exists()

    with Chroot(root, apt_cache=cache) as chroot:
        inside = chroot.run(["cat", "/proc/mounts"])
        points = {line.split()[1]: line.split()[2] for line in inside.splitlines()}
        for point, fstype in EXPECTED_INSIDE:
            assert point in points, inside
            if fstype:
                assert points[point] == fstype
        # Nothing of it is visible on the host.
        assert _host_mounts_below(root) == []
        # No daemon may start while building.
        assert (root / "usr/sbin/policy-rc.d").read_bytes() == POLICY_RC_D
        with pytest.raises(ToolExitError) as refused:
            chroot.run(["/usr/sbin/policy-rc.d", "ssh", "start"])
        assert refused.value.returncode == 101
        # The host's DNS servers, served from the private /run (resolved's stub link).
        assert chroot.run(["cat", "/etc/resolv.conf"]) == Path("/etc/resolv.conf").read_text()
        # The package cache is shared with the host directory.
        chroot.run(["touch", "/var/cache/apt/archives/from-inside"])
        assert (cache / "from-inside").exists()
        assert not (root / "var/cache/apt/archives/from-inside").exists()
        # Only the usual devices, none of the host's disks.
        devices = chroot.run(["ls", "/dev"]).split()
        assert "null" in devices and "urandom" in devices
        assert not any(d.startswith(("vd", "sd", "loop", "nvme")) for d in devices)

    assert _host_mounts_below(root) == []
    assert not (root / "usr/sbin/policy-rc.d").exists()
    assert os.readlink(root / "etc/resolv.conf") == resolv_before


def test_regular_resolv_conf_is_restored(root: Path) -> None:
    link = root / "etc/resolv.conf"
    target = os.readlink(link)
    link.unlink()
    link.write_text("nameserver 192.0.2.1\n")
    try:
        with Chroot(root) as chroot:
            assert chroot.run(["cat", "/etc/resolv.conf"]) == Path("/etc/resolv.conf").read_text()
        assert link.read_text() == "nameserver 192.0.2.1\n"
    finally:
        link.unlink()
        link.symlink_to(target)


def test_cleanup_when_the_body_raises(root: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), Chroot(root) as chroot:
        # A background job of a run: line must neither hang run() nor survive.
        chroot.shell("sleep 3001 & echo started")
        raise RuntimeError("boom")
    assert _host_mounts_below(root) == []
    assert not (root / "usr/sbin/policy-rc.d").exists()
    assert _processes_with("sleep 3001") == []


def test_command_failure_names_the_command(root: Path) -> None:
    with Chroot(root) as chroot:
        with pytest.raises(ToolExitError, match=r"^ls failed \(exit 2\): .*no-such-file"):
            chroot.run(["ls", "/no-such-file"])
        with pytest.raises(Exception, match=r"^sleep timed out after 1 s"):
            chroot.run(["sleep", "30"], timeout=1)
    assert _host_mounts_below(root) == []


def test_cleanup_on_sigterm(root: Path, tmp_path: Path) -> None:
    script = tmp_path / "hold.py"
    script.write_text(
        "import sys\n"
        "from pathlib import Path\n"
        "from rain.build.chroot import Chroot\n"
        "with Chroot(Path(sys.argv[1])) as chroot:\n"
        "    chroot.run(['sleep', '3002'])\n"
    )
    proc = subprocess.Popen([sys.executable, str(script), str(root)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not _processes_with("sleep 3002"):
            assert time.monotonic() < deadline, "the chroot command never started"
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10
    while _processes_with("sleep 3002") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_with("sleep 3002") == []
    assert not (root / "usr/sbin/policy-rc.d").exists()
    assert _host_mounts_below(root) == []


def test_refuses_what_is_not_a_root(tmp_path: Path) -> None:
    with pytest.raises(InvalidImage), Chroot(tmp_path / "missing"):
        pass
    with pytest.raises(InvalidImage), Chroot(Path("/")):
        pass


def test_inside_root_refuses_symlinked_parents(tmp_path: Path) -> None:
    (tmp_path / "usr").mkdir()
    (tmp_path / "usr" / "sbin").symlink_to("/usr/sbin")
    with pytest.raises(InvalidImage, match="symlink"):
        inside_root(tmp_path, "/usr/sbin/policy-rc.d")
    with pytest.raises(InvalidImage):
        inside_root(tmp_path, "/etc/../../x")
    assert inside_root(tmp_path, "/etc/hosts") == tmp_path / "etc" / "hosts"


def test_builds_sharing_a_package_cache_take_turns(tmp_path: Path) -> None:
    lines: list[str] = []
    first = Chroot(tmp_path, apt_cache=tmp_path / "cache")
    second = Chroot(tmp_path, apt_cache=tmp_path / "cache", log=lines.append)
    with first.apt_cache_lock():
        with pytest.raises(ToolFailed, match="stayed busy"), second.apt_cache_lock(timeout=0.3):
            pass
        assert lines == ["waiting for the package cache (another build is using it)"]
    with second.apt_cache_lock(timeout=0.3), second.apt_cache_lock(timeout=0.3):
        pass  # re-entrant: a builder may hold it around install(), which takes it too
    with Chroot(tmp_path).apt_cache_lock(timeout=0):  # no shared cache, nothing to wait for
        pass
