"""Build steps on a real Debian image: in the sandbox, nothing reaches the host.

What the old build chroot guaranteed and still matters (no mount visible on
the host or left behind, nothing left running, policy-rc.d put back, clean
exit on SIGTERM), and what it did not: a derived image is a stranger's tree,
so symlinks planted in it must not turn the host-side steps (clean-up,
files, the package list) onto the host's files, and ``run:`` has no network.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rain.build.disk import open_disk
from rain.build.distros import mounts_under
from rain.build.distros.debian import POLICY_RC_D, DebianInstaller, _no_daemons, installed_packages
from rain.formats.tool import ToolExitError
from rain.model.errors import InvalidImage
from rain.sandbox import Sandbox
from tests.sandbox.conftest import processes_with

from .conftest import loop_devices_of

pytestmark = pytest.mark.integration


@pytest.fixture
def root(disk_copy: Path) -> Iterator[Path]:
    with open_disk(disk_copy) as mounted:
        yield mounted


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """Host files a hostile image points its symlinks at."""
    d = tmp_path / "host"
    d.mkdir()
    (d / "precious.deb").write_bytes(b"host")
    (d / "motd").write_text("the host's own\n")
    (d / "status").write_text("Package: host-only\nStatus: install ok installed\n"
                              "Version: 1\n")
    return d


def _host_mounts_below(root: Path) -> list[Path]:
    return [p for p in mounts_under(root) if p != root]


def test_mounts_exist_inside_only(root: Path) -> None:
    with Sandbox(root) as sandbox:
        inside = sandbox.run(["cat", "/proc/mounts"])
        points = {line.split()[1]: line.split()[2] for line in inside.splitlines()}
        for point, fstype in (("/", "ext4"), ("/proc", "proc"), ("/dev", "tmpfs"),
                              ("/dev/pts", "devpts"), ("/dev/shm", "tmpfs"), ("/run", "tmpfs")):
            assert points.get(point) == fstype, inside
        assert "idmapped" in next(line for line in inside.splitlines()
                                  if line.split()[1] == "/")
        assert _host_mounts_below(root) == []
    assert _host_mounts_below(root) == []


def test_policy_rc_d_is_put_back(root: Path) -> None:
    tree_path = root / "usr/sbin/policy-rc.d"
    assert not tree_path.exists()
    with Sandbox(root) as sandbox:
        with _no_daemons(sandbox.tree):
            assert tree_path.read_bytes() == POLICY_RC_D
            with pytest.raises(ToolExitError) as refused:
                sandbox.run(["/usr/sbin/policy-rc.d", "ssh", "start"])
            assert refused.value.returncode == 101
        assert not tree_path.exists()
        tree_path.write_text("#!/bin/sh\nexit 0\n")
        try:
            with pytest.raises(RuntimeError), _no_daemons(sandbox.tree):
                raise RuntimeError("a failed install")
            assert tree_path.read_text() == "#!/bin/sh\nexit 0\n"
        finally:
            tree_path.unlink()


def test_run_has_no_network_and_leaves_nothing_running(root: Path) -> None:
    with Sandbox(root) as sandbox:
        # The image's own apt, with its own sources: it reaches no mirror (apt reports
        # fetch failures as warnings, exit 0).
        out = sandbox.shell("apt-get -q -o Acquire::Retries=0 update 2>&1; true")
        assert "Temporary failure resolving" in out or "Could not resolve" in out, out
        assert "Hit:" not in out and "Get:" not in out, out
        assert sandbox.shell("sleep 3201 & echo started") == "started\n"
    assert processes_with("sleep 3201") == []
    assert _host_mounts_below(root) == []


def test_clean_through_planted_links_stays_inside(root: Path, host: Path) -> None:
    archives = root / "var/cache/apt/archives"
    saved = archives.with_name("archives.saved")
    archives.rename(saved)
    archives.symlink_to(str(host))  # an image built by a stranger may hold anything
    try:
        with Sandbox(root) as sandbox:
            DebianInstaller().clean(sandbox)
        assert (host / "precious.deb").read_bytes() == b"host"
    finally:
        archives.unlink()
        saved.rename(archives)


def test_files_through_planted_links_stay_inside(root: Path, host: Path) -> None:
    motd = root / "etc/motd"
    saved = motd.read_bytes() if motd.exists() and not motd.is_symlink() else None
    motd.unlink(missing_ok=True)
    motd.symlink_to(str(host / "motd"))
    try:
        with Sandbox(root) as sandbox:
            sandbox.tree.write_text("/etc/motd", "from the template\n")  # as the builder does
        assert (host / "motd").read_text() == "the host's own\n"
        assert not motd.is_symlink() and motd.read_text() == "from the template\n"
    finally:
        motd.unlink()
        if saved is not None:
            motd.write_bytes(saved)


def test_package_list_through_planted_links_stays_inside(root: Path, host: Path) -> None:
    dpkg = root / "var/lib/dpkg"
    saved = dpkg.with_name("dpkg.saved")
    dpkg.rename(saved)
    dpkg.symlink_to(str(host))
    try:
        with pytest.raises(Exception) as refused:
            installed_packages(root)
        assert "host-only" not in str(refused.value)
    finally:
        dpkg.unlink()
        saved.rename(dpkg)
    assert "host-only" not in installed_packages(root)


def test_a_fifo_planted_as_hostname_does_not_hang_clean(root: Path) -> None:
    hostname = root / "etc/hostname"
    saved = hostname.read_bytes()
    hostname.unlink()
    os.mkfifo(hostname)
    done = threading.Event()

    def clean() -> None:
        with Sandbox(root) as sandbox:
            DebianInstaller().clean(sandbox)
        done.set()

    try:
        worker = threading.Thread(target=clean, daemon=True)
        worker.start()
        worker.join(120)
        assert done.is_set(), "clean blocked on a FIFO in the image"
        assert hostname.read_text() == "localhost\n"  # replaced by a regular file
    finally:
        hostname.unlink()
        hostname.write_bytes(saved)


def test_a_symlinked_parent_loop_fails_cleanly(root: Path) -> None:
    # usr/sbin -> /usr/sbin is the same path inside the image: a loop, not the host's sbin.
    sbin = root / "usr/sbin"
    saved = sbin.with_name("sbin.saved")
    host = Path("/usr/sbin/policy-rc.d")
    before = host.read_bytes() if host.exists() else None
    sbin.rename(saved)
    sbin.symlink_to("/usr/sbin")
    try:
        with Sandbox(root) as sandbox, pytest.raises(InvalidImage), _no_daemons(sandbox.tree):
            pass
        assert (host.read_bytes() if host.exists() else None) == before
    finally:
        sbin.unlink()
        saved.rename(sbin)


def test_cleanup_on_sigterm(disk_copy: Path, tmp_path: Path) -> None:
    script = tmp_path / "hold.py"
    script.write_text(
        "import sys\n"
        "from pathlib import Path\n"
        "from rain.build.disk import open_disk\n"
        "from rain.sandbox import Sandbox\n"
        "with open_disk(Path(sys.argv[1])) as root, Sandbox(root) as sandbox:\n"
        "    sandbox.run(['sleep', '3202'])\n"
    )
    proc = subprocess.Popen([sys.executable, str(script), str(disk_copy)],
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not processes_with("sleep 3202"):
            assert time.monotonic() < deadline, "the sandboxed command never started"
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10
    while processes_with("sleep 3202") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with("sleep 3202") == []
    assert loop_devices_of(disk_copy) == []
