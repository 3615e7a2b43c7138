"""Escape attempts from inside the sandbox: each one fails or is contained.

Every test runs real commands in a real sandbox on a loop-mounted ext4 tree
(see conftest). The attempts are the ones a hostile template would make with
a ``run:`` line; under the old build chroot (real root, the host's network,
the host's root reachable through /proc/1/root) each of them reached the
host.
"""

from __future__ import annotations

import os
import socket
import socketserver
import subprocess
import threading
from pathlib import Path

import pytest

from rain.formats.tool import ToolExitError
from rain.sandbox import Bind, Sandbox, SandboxConfig

pytestmark = pytest.mark.integration


def shell(root: Path, line: str, **config: object) -> str:
    with Sandbox(root, config=SandboxConfig(**config)) as sandbox:  # type: ignore[arg-type]
        return sandbox.shell(line)


def python(root: Path, code: str) -> str:
    with Sandbox(root) as sandbox:
        return sandbox.run(["python3", "-c", code])


def test_root_inside_is_an_unprivileged_id_outside(image_root: Path) -> None:
    out = shell(image_root, "id -u; cat /proc/self/uid_map; stat -c %u:%g /bin/sh").split()
    base = SandboxConfig().id_base
    assert out == ["0", "0", str(base), "65536", "0:0"]
    # What it creates is stored as uid 0 on disk, setuid bit and all: the image still boots.
    shell(image_root, "touch /made-inside && chmod 4755 /made-inside")
    made = os.lstat(image_root / "made-inside")
    assert (made.st_uid, made.st_gid, made.st_mode & 0o7777) == (0, 0, 0o4755)


def test_host_root_through_proc_1_root(image_root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("host secret\n")
    planted = tmp_path / "planted"
    out = shell(image_root, f"for p in /proc/[0-9]*; do cat $p/root{secret}; "
                            f"echo pwned > $p/root{planted}; done 2>&1; echo done")
    assert "host secret" not in out and out.strip().endswith("done")
    assert not planted.exists()


def test_chroot_and_dotdot_escape(image_root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("host secret\n")
    # The classic escape of a root process from a chroot: keep a directory open, chroot
    # below it, climb with '..' from there, chroot again.
    out = python(image_root, f"""
import os
os.makedirs("/jail", exist_ok=True)
outside = os.open("/", os.O_RDONLY)
os.chroot("/jail")
os.fchdir(outside)
for _ in range(64):
    os.chdir("..")
os.chroot(".")
for path in ("{secret}", "../../../../../../..{secret}"):
    try:
        print(open(path).read())
    except OSError as exc:
        print("refused", exc.errno)
""")
    assert "host secret" not in out
    assert out.split().count("refused") == 2


def test_absolute_symlink_planted_in_the_tree(image_root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("host secret\n")
    (image_root / "hostroot").symlink_to("/")
    out = shell(image_root, f"cat /hostroot{secret} 2>&1; echo pwned > /hostroot{tmp_path}/p "
                            "2>&1; echo done")
    assert "host secret" not in out
    assert not (tmp_path / "p").exists()


def test_host_loopback_services_are_unreachable(image_root: Path) -> None:
    got: list[bytes] = []

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            got.append(self.request.recv(100))

    with socketserver.TCPServer(("127.0.0.1", 0), Handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        port = server.server_address[1]
        try:
            out = shell(image_root, f"bash -c 'echo hello > /dev/tcp/127.0.0.1/{port}' 2>&1; "
                                    "echo rc=$?")
        finally:
            server.shutdown()
    assert "rc=1" in out and "Connection refused" in out
    assert got == []


def test_network_is_off(image_root: Path) -> None:
    out = shell(image_root, "cat /proc/net/dev; bash -c 'echo > /dev/tcp/192.0.2.1/80' 2>&1; "
                            "echo rc=$?")
    interfaces = [line.split(":")[0].strip() for line in out.splitlines() if ":" in line
                  and not line.startswith(("Inter", " face", "bash"))]
    assert interfaces == ["lo"]
    assert "Network is unreachable" in out and "rc=1" in out
    # Its own loopback works (package scripts may talk to a daemon they start).
    echo = python(image_root, """
import socket
server = socket.create_server(("127.0.0.1", 0))
client = socket.create_connection(server.getsockname())
peer, _ = server.accept()
client.sendall(b"over lo")
print(peer.recv(100).decode())
""")
    assert echo.strip() == "over lo"


def test_host_processes_are_invisible(image_root: Path) -> None:
    host = subprocess.Popen(["sleep", "3131"])
    try:
        pids = shell(image_root, "ls /proc | grep -E '^[0-9]+$'").split()
        assert pids[0] == "1" and len(pids) <= 4, pids  # init, the shell, ls, grep
        cmdlines = shell(image_root, "cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
        assert "sleep" not in cmdlines and "rain.sandbox.launcher" in cmdlines
        out = shell(image_root, f"kill -9 {host.pid} 2>&1; echo rc=$?")
        assert "No such process" in out and "rc=1" in out
        assert host.poll() is None, "the sandbox killed a host process"
    finally:
        host.kill()
        host.wait()


def test_no_host_devices(image_root: Path) -> None:
    loop = _device_of(image_root)
    major, minor = os.major(loop), os.minor(loop)
    devices = shell(image_root, "ls /dev").split()
    assert set(devices) == {"fd", "full", "mqueue", "null", "ptmx", "pts", "random", "shm",
                            "stderr", "stdin", "stdout", "tty", "urandom", "zero"}
    out = shell(image_root, f"mknod /tmp/disk b {major} {minor} 2>&1; echo rc=$?; "
                            f"dd if=/tmp/disk of=/dev/null count=1 2>&1; echo rc=$?; "
                            "ls /sys; echo sys-empty")
    assert out.count("rc=1") == 2, out
    assert "Operation not permitted" in out
    assert out.split()[-1] == "sys-empty" and out.split()[-2] == "rc=1"
    # A device node already in the image opens nothing either (the mount is nodev).
    os.mknod(image_root / "disk-node", 0o600 | 0o060000, loop)
    out = shell(image_root, "dd if=/disk-node of=/dev/null count=1 2>&1; echo rc=$?")
    assert "rc=1" in out and "Permission denied" in out


def test_mounting_is_refused_or_contained(image_root: Path) -> None:
    before = Path("/proc/mounts").read_text()
    out = shell(image_root, "mkdir -p /mnt; mount -t ext4 /dev/null /mnt 2>&1; echo rc=$?; "
                            "mount -t sysfs sysfs /sys 2>&1; echo rc=$?; "
                            "mount -t tmpfs scratch /mnt && echo mounted; "
                            "umount /proc 2>&1; echo rc=$?")
    assert out.count("rc=32") >= 1 or out.count("rc=1") >= 1, out
    assert "sysfs" not in shell(image_root, "cat /proc/mounts")
    assert "mounted" in out  # inside its own mount namespace only...
    assert Path("/proc/mounts").read_text() == before  # ...which vanished with it
    assert not any(line.split()[1].startswith(str(image_root) + "/")
                   for line in before.splitlines())


def test_hostname_stays_the_hosts(image_root: Path) -> None:
    before = socket.gethostname()
    out = shell(image_root, "hostname; hostname evil-sandbox && hostname")
    assert out.split() == ["localhost", "evil-sandbox"]
    assert socket.gethostname() == before


def test_init_is_out_of_reach(image_root: Path) -> None:
    # The status pipe and the launcher's descriptors must not be reachable from the command.
    out = shell(image_root, "ls /proc/1/fd 2>&1; echo rc=$?; cat /proc/1/environ 2>&1; "
                            "echo rc=$?")
    assert out.count("rc=") == 2 and "rc=0" not in out, out
    traced = python(image_root, """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
print(libc.ptrace(16, 1, 0, 0), ctypes.get_errno())  # PTRACE_ATTACH to init
""")
    assert traced.split() == ["-1", "1"]  # EPERM


def test_open_by_handle_is_refused(image_root: Path) -> None:
    # "Shocker": open_by_handle_at reaches any inode of a filesystem without a path.
    out = python(image_root, """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
class Handle(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_uint), ("type", ctypes.c_int), ("f", ctypes.c_ubyte * 128)]
h = Handle(128, 0)
mount_id = ctypes.c_int()
print("name", libc.name_to_handle_at(-100, b"/", ctypes.byref(h), ctypes.byref(mount_id), 0))
fd = os.open("/", os.O_RDONLY)
print("open", libc.open_by_handle_at(fd, ctypes.byref(h), os.O_RDONLY), ctypes.get_errno())
""")
    assert "open -1 1" in out  # EPERM: needs CAP_DAC_READ_SEARCH on the host


def test_read_only_binds_stay_read_only(image_root: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "hello.deb").write_bytes(b"verified")
    line = ("echo bad > /run/rain-apt/new 2>&1; echo bad >> /run/rain-apt/hello.deb 2>&1; "
            "mount -o remount,bind,rw /run/rain-apt 2>&1; "
            "echo bad > /run/rain-apt/new2 2>&1; echo bad >> /run/rain-apt/hello.deb 2>&1; "
            "rm -f /run/rain-apt/hello.deb 2>&1; cat /run/rain-apt/hello.deb")
    with Sandbox(image_root, binds=[Bind(shared, "/run/rain-apt")]) as sandbox:
        out = sandbox.shell(line)
    assert out.strip().endswith("verified")
    assert sorted(p.name for p in shared.iterdir()) == ["hello.deb"]
    assert (shared / "hello.deb").read_bytes() == b"verified"


def test_failures_name_the_command(image_root: Path) -> None:
    with Sandbox(image_root) as sandbox:
        with pytest.raises(ToolExitError, match=r"^ls failed \(exit 2\): .*no-such-file"):
            sandbox.run(["ls", "/no-such-file"])
        with pytest.raises(ToolExitError, match=r"^rain-no-such-tool failed \(exit 127\): "
                                                r".*cannot run rain-no-such-tool"):
            sandbox.run(["rain-no-such-tool"])
        assert sandbox.run(["cat"], input=b"fed on stdin") == "fed on stdin"


def _device_of(root: Path) -> int:
    return os.stat(root).st_dev
