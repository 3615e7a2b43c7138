"""One sandbox, one command: ``python -S -m rain.sandbox.launcher --spec-fd N --status-fd M``.

`rain.sandbox.Sandbox.run` starts this as a fresh, single-threaded process
(namespaces and fork-without-exec are unsafe in the threaded server) after
putting it in the run's cgroups. Three processes, each with one job:

1. the **launcher** (host root) reads the JSON spec, creates a user
   namespace whose root is host uid ``id_base`` (through a throwaway child:
   only a process outside the namespace may write an arbitrary id map), and
   makes, as host root, the detached mounts the sandbox will attach: the
   image tree *idmapped* to that namespace (on-disk uid 0 appears as the
   sandbox's root, and files it creates are stored as uid 0, so the image
   still boots; no chown, setuid bits and file capabilities survive), the
   read-only binds, and the six harmless character devices;
2. the **child** joins the user namespace (losing every host privilege),
   becomes its root and unshares mount, PID, network, UTS, IPC and cgroup
   namespaces;
3. **init** (PID 1 of the new PID namespace) attaches the mounts, mounts a
   fresh /proc, a tmpfs /dev with devpts, /dev/shm and /run, brings up its
   own loopback, sets the hostname, ``pivot_root``\\s into the image and
   detaches the host's tree, then runs the command as its child, reaps
   orphans, and reports how the command ended on the status pipe. When init
   exits the kernel kills every process left in the namespace, and the mount
   namespace (with every mount made here) goes with its last process.

Each process dies with its parent (``PR_SET_PDEATHSIG``), so killing the
launcher (a timeout, a cancel, the server dying) ends the whole tree. Init
is not dumpable: the command, root in the namespace but not on the host,
can neither ptrace it nor open its descriptors through /proc.

The status pipe carries JSON lines: ``{"error": ..., "kind": "host"|"image"}``
when the sandbox could not be made, else ``{"exit": N}`` or ``{"signal": N}``.
The command never holds that pipe. Only the standard library is imported:
nothing can be imported after ``pivot_root``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import resource
import signal
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from rain.sandbox import syscalls as sc

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
)
# Directories the image must have (made when missing) for the sandbox's own mounts.
MOUNT_POINTS = ("proc", "dev", "run", "sys", "tmp")
DEV_BYTES = 1024**2
STAGING = "/tmp"
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


class SetupError(Exception):
    """The sandbox could not be made; `kind` says whose fault: the host's or the image's."""

    def __init__(self, message: str, kind: str = "host") -> None:
        super().__init__(message)
        self.kind = kind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rain.sandbox.launcher")
    parser.add_argument("--spec-fd", type=int, required=True)
    parser.add_argument("--status-fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != args.parent:
        return 1  # the server died before we armed the death signal
    with os.fdopen(args.spec_fd, "rb") as f:
        spec = json.loads(f.read())
    try:
        launch(spec, args.status_fd)
    except SetupError as exc:
        report(args.status_fd, {"error": str(exc), "kind": exc.kind})
        return 1
    except OSError as exc:
        report(args.status_fd, {"error": f"sandbox setup failed: {exc}", "kind": "host"})
        return 1
    return 0


def report(fd: int, message: dict[str, Any]) -> None:
    """One JSON line on the status pipe (short enough to be written atomically)."""
    if "error" in message:
        message["error"] = str(message["error"])[:1500]
    os.write(fd, (json.dumps(message) + "\n").encode())


def in_child(status_fd: int, body: Callable[[], None]) -> NoReturn:
    """Run a forked child's `body`; report why it failed; never return into the parent's code."""
    try:
        body()
    except SetupError as exc:
        report(status_fd, {"error": str(exc), "kind": exc.kind})
    except BaseException as exc:
        report(status_fd, {"error": f"sandbox setup failed: {exc}", "kind": "host"})
    os._exit(1)


# -- the launcher (host root) ---------------------------------------------------

def launch(spec: dict[str, Any], status_fd: int) -> None:
    root = spec["root"]
    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    prepare_mount_points(rootfd)
    userns = make_userns(int(spec["id_base"]), int(spec["id_count"]))
    tree = idmapped_tree(rootfd, userns, root)
    binds = [(read_only_tree(b["source"]), b["target"]) for b in spec.get("binds", [])]
    devices = {name: sc.open_tree(f"/dev/{name}", sc.OPEN_TREE_CLONE) for name in DEVICES}
    pid = os.fork()
    if pid == 0:
        in_child(status_fd, lambda: enter(spec, status_fd, userns, tree, binds, devices))
    for fd in (rootfd, userns, tree, *(b for b, _ in binds), *devices.values()):
        os.close(fd)
    os.waitpid(pid, 0)


def prepare_mount_points(rootfd: int) -> None:
    """Make sure /proc, /dev, ... are real directories of the image, never symlinks."""
    resolve = sc.RESOLVE_IN_ROOT | sc.RESOLVE_NO_SYMLINKS | sc.RESOLVE_NO_XDEV
    for name in MOUNT_POINTS:
        try:
            os.close(sc.openat2(rootfd, name, os.O_PATH | os.O_DIRECTORY, resolve))
            continue
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise SetupError(f"the image's /{name} must be a directory ({exc.strerror})",
                             "image") from None
        try:
            os.mkdir(name, 0o755, dir_fd=rootfd)
        except OSError as exc:
            raise SetupError(f"cannot make /{name} in the image: {exc.strerror}",
                             "image") from None


def make_userns(id_base: int, id_count: int) -> int:
    """A user namespace mapping ids 0..id_count-1 to id_base..; its descriptor."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(done_w)
        try:
            sc.unshare(sc.CLONE_NEWUSER)
            os.write(ready_w, b"1")
        except OSError as exc:
            os.write(ready_w, b"0" + str(exc).encode()[:200])
        os.read(done_r, 1)
        os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        answer = os.read(ready_r, 256)
        if not answer.startswith(b"1"):
            raise SetupError(
                "user namespaces are not available on this host "
                f"({answer[1:].decode(errors='replace')}; check user.max_user_namespaces): "
                "rain will not run template steps as host root")
        mapping = f"0 {id_base} {id_count}\n"
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(mapping)
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(done_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


def idmapped_tree(rootfd: int, userns: int, root: str) -> int:
    """A detached copy of the image's mount, idmapped into `userns`, device nodes inert."""
    try:
        tree = sc.open_tree("", sc.OPEN_TREE_CLONE | sc.AT_RECURSIVE | sc.AT_EMPTY_PATH,
                            dirfd=rootfd)
    except OSError as exc:
        raise SetupError(f"this kernel cannot clone mounts (open_tree: {exc.strerror}; "
                         "Linux 5.12 or later is needed)") from None
    try:
        sc.mount_setattr(tree, attr_set=sc.MOUNT_ATTR_IDMAP | sc.MOUNT_ATTR_NODEV,
                         attr_clr=sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NOEXEC, userns_fd=userns)
    except OSError as exc:
        os.close(tree)
        raise SetupError(
            f"idmapped mounts are not available for {root} ({filesystem_of(root)}: "
            f"{exc.strerror}); rain needs them (Linux 5.12+, a filesystem that supports "
            "them such as ext4, xfs, btrfs or tmpfs) and will not run template steps as "
            "host root") from None
    return tree


def read_only_tree(source: str) -> int:
    tree = sc.open_tree(source, sc.OPEN_TREE_CLONE | sc.AT_RECURSIVE)
    sc.mount_setattr(tree, attr_set=sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID
                     | sc.MOUNT_ATTR_NODEV)
    return tree


def filesystem_of(path: str) -> str:
    """The filesystem type `path` lives on, from /proc/self/mountinfo ("unknown" if not found)."""
    best, fstype = "", "unknown"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                point = fields[4].replace("\\040", " ")
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, fstype = point, fields[fields.index("-") + 1]
    except (OSError, ValueError, IndexError):
        pass
    return fstype


# -- the child: into the user namespace ------------------------------------------

def enter(spec: dict[str, Any], status_fd: int, userns: int, tree: int,
          binds: list[tuple[int, str]], devices: dict[str, int]) -> None:
    launcher = os.getppid()
    sc.setns(userns, sc.CLONE_NEWUSER)
    os.close(userns)
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    # Changing credentials clears the death signal: arm it only now, then make sure the
    # launcher did not die in between.
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != launcher:
        os._exit(1)
    sc.unshare(sc.CLONE_NEWNS | sc.CLONE_NEWPID | sc.CLONE_NEWNET | sc.CLONE_NEWUTS
               | sc.CLONE_NEWIPC | sc.CLONE_NEWCGROUP)
    lifeline, held = os.pipe()  # held open by this process for as long as it lives
    pid = os.fork()
    if pid == 0:
        os.close(held)
        in_child(status_fd, lambda: init(spec, status_fd, tree, binds, devices, lifeline))
    os.waitpid(pid, 0)
    os._exit(0)


# -- init: PID 1 of the sandbox -----------------------------------------------------

def init(spec: dict[str, Any], status_fd: int, tree: int, binds: list[tuple[int, str]],
         devices: dict[str, int], lifeline: int) -> None:
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    _parent_alive_or_exit(lifeline)
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    loopback_up()
    sc.sethostname(spec.get("hostname", "localhost"))
    # The new root is assembled on a scratch tmpfs over /tmp (world-traversable on every
    # host, unlike the 0700 directory the image is mounted in), in this namespace only.
    sc.mount("rain-sandbox", STAGING, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=700,size=64k")
    root = f"{STAGING}/root"
    os.mkdir(root, 0o700)
    sc.move_mount(tree, root)
    tmpfs = int(spec.get("tmpfs_bytes", 256 * 1024**2))
    dev = f"{root}/dev"
    sc.mount("tmpfs", dev, "tmpfs", sc.MS_NOSUID | sc.MS_NOEXEC, f"mode=755,size={DEV_BYTES}")
    for name, fd in devices.items():
        os.close(os.open(f"{dev}/{name}", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
        sc.move_mount(fd, f"{dev}/{name}")
    for name, target in DEV_LINKS:
        os.symlink(target, f"{dev}/{name}")
    for name in ("pts", "shm", "mqueue"):
        os.mkdir(f"{dev}/{name}", 0o755)
    sc.mount("devpts", f"{dev}/pts", "devpts", sc.MS_NOSUID | sc.MS_NOEXEC,
             "newinstance,ptmxmode=0666,mode=0620,gid=5")
    sc.mount("tmpfs", f"{dev}/shm", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV,
             f"mode=1777,size={tmpfs}")
    sc.mount("tmpfs", f"{root}/run", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV,
             f"mode=755,size={tmpfs}")
    os.mkdir(f"{root}/run/lock")
    os.chmod(f"{root}/run/lock", 0o1777)
    for fd, target in binds:
        os.makedirs(f"{root}{target}", exist_ok=True)
        sc.move_mount(fd, f"{root}{target}")
    try:
        sc.mount("proc", f"{root}/proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    except OSError as exc:
        raise SetupError(
            f"cannot mount a /proc for the sandbox ({exc.strerror}): this needs a fully "
            "visible /proc on the host (not one with masked entries, as in some "
            "containers)") from None
    os.chdir(root)
    sc.pivot_root(".", ".")
    sc.umount2(".", sc.MNT_DETACH)
    os.chdir("/")
    for fd in (tree, *(b for b, _ in binds), *devices.values()):
        os.close(fd)
    sc.prctl(sc.PR_SET_DUMPABLE, 0)
    command = os.fork()
    if command == 0:
        run_command(spec)
    report(status_fd, reap(command))
    os._exit(0)


def _parent_alive_or_exit(lifeline: int) -> None:
    """Exit if the parent died before our death signal was armed (its pipe end is closed).

    Init cannot ask getppid(): its parent is outside its PID namespace (always 0).
    """
    os.set_blocking(lifeline, False)
    try:
        if os.read(lifeline, 1) == b"":
            os._exit(1)
    except BlockingIOError:
        pass
    os.close(lifeline)


def loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, _SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))


def reap(command: int) -> dict[str, int]:
    """Wait for the command, reaping every orphan meanwhile (init's duty); how it ended."""
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return {"exit": 255}
        except InterruptedError:
            continue
        if pid == command:
            if os.WIFSIGNALED(status):
                return {"signal": os.WTERMSIG(status)}
            return {"exit": os.WEXITSTATUS(status)}


def run_command(spec: dict[str, Any]) -> None:
    """In the command's process: own session, limits, no inherited descriptors, then exec."""
    try:
        os.setsid()
        for signum in (signal.SIGPIPE, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        for name, soft, hard in spec.get("rlimits", []):
            resource.setrlimit(getattr(resource, name), (soft, hard))
        os.umask(0o022)
        os.chdir(spec.get("cwd", "/"))
        os.closerange(3, 65536)
        argv = [str(a) for a in spec["argv"]]
        env = {str(k): str(v) for k, v in spec.get("env", {}).items()}
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        name = spec["argv"][0] if spec.get("argv") else "?"
        os.write(2, f"rain-sandbox: cannot run {name}: {exc.strerror}\n".encode())
    os._exit(127)


if __name__ == "__main__":
    sys.exit(main())
