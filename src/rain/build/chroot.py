"""Run commands inside an image's root filesystem while it is being built.

`Chroot(root, apt_cache=...)` makes a root filesystem directory usable for
``apt-get install``, ``systemctl enable``, a template's ``run:`` lines, ...:
it gives the tree /proc, a read-only /sys, a small /dev, a tmpfs /run, the
build host's DNS configuration, the shared package cache on
``/var/cache/apt/archives`` and a ``policy-rc.d`` that stops package scripts
from starting daemons.

Why a private mount and PID namespace. Every mount is made inside a namespace
held by one small process (``unshare --mount --propagation private --pid
--fork --kill-child -- cat``), and every command enters it with ``nsenter``
before ``chroot``. So:

- none of these mounts is ever visible on the host, and they cannot outlive
  the build: the namespace ends when its holder ends, and the holder (``cat``
  reading a pipe from this process) ends when the `with` block closes the
  pipe or when this process dies in any way, SIGKILL included. Cleanup needs
  no unmounting that could fail with EBUSY;
- when the namespace's init ends, the kernel kills every process left in it
  (a daemon a package started despite ``policy-rc.d``, a template command's
  background job), so nothing keeps files open on the image and the disk it
  lives on can be unmounted and detached right after;
- a symlink planted in an image cannot redirect a mount onto a host path.

/dev is a tmpfs with only the usual character devices and a private devpts:
package scripts (grub, os-prober, ...) must not see, probe or write the build
host's disks. `devices` adds the few block devices a step needs (the loop
device a bootloader is installed on).

Files changed in the tree are put back on leaving the block: ``policy-rc.d``
is removed (or the image's own restored) and ``/etc/resolv.conf`` restored,
unless a package replaced it meanwhile (then the package's version is the
image's). With ``/etc/resolv.conf`` a symlink into /run (systemd-resolved),
the host's copy is written to its target inside the private /run instead.

SIGTERM: while a Chroot or an `open_disk` is active in the main thread and no
SIGTERM handler is installed, SIGTERM raises `SystemExit`, so every `finally`
(and `run_tool`'s process-group kill) runs as it does on KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import posixpath
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType

from rain.build.distros import mounts_under
from rain.build.phases import LogFn, log_command, log_output
from rain.formats.tool import ToolExitError, run_tool, running_tool, stderr_tail
from rain.model.errors import InvalidImage, ToolFailed

RUN_TIMEOUT = 1800.0
MOUNT_TIMEOUT = 60.0
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
POLICY_RC_D = b"#!/bin/sh\n# Written by rain while the image is built: start no daemon.\nexit 101\n"
# (name, major, minor) of the character devices package scripts expect.
_CHAR_DEVICES = (
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
)
_DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
)
# The environment of commands inside: nothing of the build host's leaks in.
_BASE_ENV = {"PATH": CHROOT_PATH, "HOME": "/root", "LC_ALL": "C.UTF-8", "TERM": "dumb"}
_HOST_ENV = {"PATH": CHROOT_PATH, "LC_ALL": "C"}


class Chroot:
    """A root filesystem prepared for running commands in it (see the module doc)."""

    def __init__(
        self,
        root: Path,
        *,
        apt_cache: Path | None = None,
        devices: Sequence[str] = (),
        log: LogFn | None = None,
    ) -> None:
        self.root = Path(os.path.realpath(root))
        self.apt_cache = Path(apt_cache).absolute() if apt_cache is not None else None
        self.devices = tuple(devices)
        self.log = log
        self._stack = contextlib.ExitStack()
        self._init: int | None = None
        self._resolv_written: bytes | None = None
        self._resolv_original: tuple[str, bytes | str, int] | None = None
        self._resolv_in_run: str | None = None
        self._apt_lock_depth = 0

    # -- the with block ---------------------------------------------------

    def __enter__(self) -> Chroot:
        if not self.root.is_dir() or self.root == Path("/"):
            raise InvalidImage(f"{self.root} is not a root filesystem directory")
        if self._init is not None:
            raise RuntimeError("a Chroot is entered once at a time")
        self._stack = contextlib.ExitStack()
        self._resolv_original = self._resolv_written = self._resolv_in_run = None
        try:
            self._setup()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._init = None
        self._stack.close()

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = RUN_TIMEOUT,
        input: bytes | None = None,
    ) -> str:
        """Run `argv` inside the root and return its standard output.

        The command sees only `env` over a minimal environment (PATH, HOME,
        LC_ALL=C.UTF-8). A non-zero exit raises `ToolExitError` naming the
        command (not the namespace helpers) and quoting its stderr.
        """
        if isinstance(argv, str | bytes) or not argv:
            raise TypeError("Chroot.run takes a non-empty argv list, never a shell string")
        if self._init is None:
            raise RuntimeError("Chroot.run called outside its with block")
        args = [str(a) for a in argv]
        tool = os.path.basename(args[0])
        log_command(self.log, args)
        # Each command is the init of its own PID namespace: when it exits,
        # whatever it left running (``cmd &`` in a run: line, a daemon) is
        # killed, so nothing holds its output pipe or the image's files.
        full = [
            *self._enter_argv(),
            "unshare",
            "--pid",
            "--fork",
            "--kill-child",
            "--",
            "chroot",
            str(self.root),
            *args,
        ]
        try:
            proc = run_tool(
                full, timeout=timeout, env={**_BASE_ENV, **(env or {})}, input=input, check=False
            )
        except ToolFailed as exc:
            # Timeouts and signals: name the command, not nsenter.
            message = exc.message.replace("nsenter", tool, 1)
            raise ToolFailed(message, tool=tool, stderr=exc.stderr) from None
        out = proc.stdout.decode("utf-8", "replace")
        err = proc.stderr.decode("utf-8", "replace")
        log_output(self.log, out)
        log_output(self.log, err)
        if proc.returncode != 0:
            tail = stderr_tail(err) or stderr_tail(out)
            raise ToolExitError(
                f"{tool} failed (exit {proc.returncode})" + (f": {tail}" if tail else ""),
                tool=tool,
                stderr=err,
                returncode=proc.returncode,
            )
        return out

    def shell(
        self, line: str, *, env: Mapping[str, str] | None = None, timeout: float = RUN_TIMEOUT
    ) -> str:
        """Run one shell line inside the root (a template's ``run:`` entry)."""
        return self.run(["/bin/sh", "-c", line], env=env, timeout=timeout)

    @contextlib.contextmanager
    def apt_cache_lock(self, timeout: float = RUN_TIMEOUT) -> Iterator[None]:
        """Hold the shared package cache alone for the block (no-op without one).

        apt locks ``archives/lock`` for a whole ``apt-get install`` and fails
        at once, rather than waiting, when another build holds it; builds
        sharing `apt_cache` queue here instead (any thread, any process).
        `DistroInstaller.install` takes it; a builder that also runs a
        template's commands (which may call apt) can hold it for the whole
        session. Re-entrant for the same Chroot.
        """
        if self.apt_cache is None or self._apt_lock_depth:
            self._apt_lock_depth += 1
            try:
                yield
            finally:
                self._apt_lock_depth -= 1
            return
        self.apt_cache.mkdir(parents=True, exist_ok=True)
        with open(self.apt_cache / "rain.lock", "a+b") as lock:
            deadline = time.monotonic() + timeout
            waiting = False
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ToolFailed(
                            f"the package cache {self.apt_cache} stayed busy for {timeout:g} s",
                            tool="apt-get",
                        ) from None
                    if not waiting and self.log is not None:
                        self.log("waiting for the package cache (another build is using it)")
                    waiting = True
                    time.sleep(0.2)
            self._apt_lock_depth = 1
            try:
                yield
            finally:
                self._apt_lock_depth = 0
                fcntl.flock(lock, fcntl.LOCK_UN)

    def path(self, inside: str) -> Path:
        """The host path of `inside` (an absolute path in the image), refusing symlinked parents.

        Only for the image's own files: the mounts of the block are not
        visible through it.
        """
        return inside_root(self.root, inside)

    # -- setup ------------------------------------------------------------

    def _setup(self) -> None:
        before = set(mounts_under(self.root))
        self._stack.callback(self._unmount_strays, before)
        self._stack.enter_context(sigterm_raises())
        self._install_policy_rc_d()
        self._install_resolv_conf()
        holder = self._stack.enter_context(
            running_tool(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "--pid",
                    "--fork",
                    "--kill-child",
                    "--",
                    "cat",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=_HOST_ENV,
            )
        )
        self._stack.callback(_stop_holder, holder)
        self._init = _wait_for_child(holder)
        self._mount_all()

    def _enter_argv(self) -> list[str]:
        return ["nsenter", f"--target={self._init}", "--mount", "--pid", "--"]

    def _ns_run(self, argv: Sequence[str]) -> None:
        """Run a host tool inside the namespace (mounts), not chrooted."""
        full = [*self._enter_argv(), *argv]
        log_command(self.log, argv)
        try:
            run_tool(full, timeout=MOUNT_TIMEOUT, env=_HOST_ENV)
        except ToolFailed as exc:
            raise ToolFailed(exc.message.replace("nsenter", argv[0], 1), tool=argv[0]) from None

    def _ns_path(self, inside: str) -> str:
        """`inside` (an image path) as seen through the namespace, for host-side writes."""
        return f"/proc/{self._init}/root{self.root}{inside}"

    def _mount_all(self) -> None:
        r = self.root
        for name in ("proc", "sys", "dev", "run"):
            inside_root(r, "/" + name).mkdir(mode=0o755, exist_ok=True)
        self._ns_run(["mount", "-t", "proc", "-o", "nosuid,nodev,noexec", "proc", f"{r}/proc"])
        # Read-only: package scripts must not tune the build host's kernel.
        self._ns_run(["mount", "-t", "sysfs", "-o", "ro,nosuid,nodev,noexec", "sysfs", f"{r}/sys"])
        self._ns_run(["mount", "-t", "tmpfs", "-o", "mode=755,nosuid", "dev", f"{r}/dev"])
        self._populate_dev()
        self._ns_run(
            [
                "mount",
                "-t",
                "devpts",
                "-o",
                "newinstance,ptmxmode=0666,mode=0620,gid=5",
                "devpts",
                f"{r}/dev/pts",
            ]
        )
        self._ns_run(
            ["mount", "-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "shm", f"{r}/dev/shm"]
        )
        self._ns_run(["mount", "-t", "tmpfs", "-o", "mode=755,nosuid,nodev", "run", f"{r}/run"])
        if self._resolv_in_run is not None and self._resolv_written is not None:
            target = Path(self._ns_path(self._resolv_in_run))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self._resolv_written)
        if self.apt_cache is not None:
            self.apt_cache.mkdir(parents=True, exist_ok=True)
            archives = inside_root(r, "/var/cache/apt/archives")
            archives.mkdir(parents=True, exist_ok=True)
            self._ns_run(["mount", "--bind", str(self.apt_cache), str(archives)])

    def _populate_dev(self) -> None:
        dev = Path(self._ns_path("/dev"))
        for name, major, minor in _CHAR_DEVICES:
            os.mknod(dev / name, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
            os.chmod(dev / name, 0o666)
        for name, target in _DEV_LINKS:
            os.symlink(target, dev / name)
        for name in ("pts", "shm"):
            (dev / name).mkdir()
        for device in self.devices:
            info = os.stat(device)
            if not stat.S_ISBLK(info.st_mode):
                raise ToolFailed(f"{device} is not a block device", tool="mknod")
            node = dev / Path(device).name
            os.mknod(node, 0o660 | stat.S_IFBLK, info.st_rdev)

    # -- files put back on exit --------------------------------------------

    def _install_policy_rc_d(self) -> None:
        path = inside_root(self.root, "/usr/sbin/policy-rc.d")
        original: bytes | None = None
        mode = 0o755
        if path.is_file():
            original = path.read_bytes()
            mode = stat.S_IMODE(path.stat().st_mode)
            if original == POLICY_RC_D:
                original = None  # left by an interrupted build of ours
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(path, POLICY_RC_D, 0o755)

        def restore() -> None:
            if original is None:
                path.unlink(missing_ok=True)
            else:
                _write(path, original, mode)

        self._stack.callback(restore)

    def _install_resolv_conf(self) -> None:
        path = inside_root(self.root, "/etc/resolv.conf")
        try:
            host = Path("/etc/resolv.conf").read_bytes()
        except OSError:
            host = b""
        self._resolv_written = host
        if path.is_symlink():
            link = os.readlink(path)
            inside = posixpath.normpath(posixpath.join("/etc", link))
            if inside.startswith("/run/"):
                # systemd-resolved's stub: serve it from the private /run.
                self._resolv_in_run = inside
                return
            self._resolv_original = ("link", link, 0)
            path.unlink()
        elif path.is_file():
            self._resolv_original = ("file", path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
        else:
            self._resolv_original = ("missing", b"", 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(path, host, 0o644)
        self._stack.callback(self._restore_resolv_conf, path)

    def _restore_resolv_conf(self, path: Path) -> None:
        if self._resolv_original is None:
            return
        try:
            unchanged = (
                not path.is_symlink()
                and path.is_file()
                and path.read_bytes() == self._resolv_written
            )
        except OSError:
            unchanged = False
        if not unchanged:
            return  # a package replaced it: that is the image's resolv.conf now
        kind, value, mode = self._resolv_original
        path.unlink()
        if kind == "link":
            os.symlink(str(value), path)
        elif kind == "file":
            _write(path, value if isinstance(value, bytes) else value.encode(), mode)

    def _unmount_strays(self, before: set[Path]) -> None:
        """Last resort: nothing is mounted on the host by this class, so this finds nothing."""
        for point in mounts_under(self.root):
            if point != self.root and point not in before:
                with contextlib.suppress(ToolFailed):
                    run_tool(["umount", "-l", str(point)], timeout=MOUNT_TIMEOUT, env=_HOST_ENV)


def inside_root(root: Path, inside: str) -> Path:
    """`root` + `inside`, refusing a path whose existing parents in the image are symlinks.

    An image's own symlinks must not redirect a host-side write out of the tree
    (``usr/sbin -> /usr/sbin`` would put policy-rc.d on the build host). The
    last component may be a symlink; callers that write it decide.
    """
    parts = [p for p in inside.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidImage(f"path {inside!r} must not contain '..'")
    path = Path(root)
    for part in parts[:-1]:
        path = path / part
        if path.is_symlink():
            raise InvalidImage(f"{inside} in the image goes through a symlink ({path})")
    return path / parts[-1] if parts else path


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises `SystemExit(143)` so cleanup code runs.

    Only in the main thread and only when no one else handles SIGTERM (a
    server's own handler is left alone); otherwise a no-op.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write a regular file (replacing a symlink rather than following it)."""
    if path.is_symlink():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _wait_for_child(holder: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """PID of the namespace's init (the child `unshare --fork` starts)."""
    deadline = time.monotonic() + timeout
    children = Path(f"/proc/{holder.pid}/task/{holder.pid}/children")
    while time.monotonic() < deadline:
        if holder.poll() is not None:
            err = holder.stderr.read().decode("utf-8", "replace") if holder.stderr else ""
            raise ToolFailed(
                f"unshare failed (exit {holder.returncode}): {stderr_tail(err)}",
                tool="unshare",
                stderr=err,
            )
        pids = _children(holder.pid, children)
        if pids:
            return int(pids[0])
        time.sleep(0.005)
    raise ToolFailed(f"unshare did not start its namespace within {timeout:g} s", tool="unshare")


def _children(pid: int, listing: Path) -> list[str]:
    """Child PIDs of `pid`: from /proc's children list, else by scanning every process."""
    try:
        return listing.read_text().split()
    except FileNotFoundError:
        pass  # a kernel without CONFIG_PROC_CHILDREN
    except OSError:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat_line = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name (2nd field) may hold spaces and parentheses.
            fields = stat_line.rsplit(")", 1)[-1].split()
            if len(fields) > 1 and fields[1] == str(pid):
                found.append(entry.name)
    return found


def _stop_holder(holder: subprocess.Popen[bytes]) -> None:
    """End the namespace: EOF ends `cat`, the kernel then kills what is left inside."""
    if holder.stdin is not None:
        with contextlib.suppress(OSError):
            holder.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        holder.wait(timeout=30)
