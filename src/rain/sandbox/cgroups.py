"""Resource limits of one sandboxed command: cgroup v2, else cgroup v1, else rlimits.

Each command gets its own cgroup, a child of the server's own cgroup (under a
``rain-sandbox`` folder), made before the launcher starts anything and
removed after the last process in it is gone. Per limit, the best mechanism
this host offers is used and named in the build log:

| limit     | cgroup v2          | cgroup v1                        | fallback (per process) |
|-----------|--------------------|----------------------------------|------------------------|
| memory    | memory.max, swap 0 | memory.limit_in_bytes (+ memsw)  | RLIMIT_AS              |
| processes | pids.max           | pids.max                         | RLIMIT_NPROC (per uid) |
| CPU       | cpu.max            | cpu.cfs_quota_us / cfs_period_us | RLIMIT_CPU (seconds)   |

cgroup v2 is used when the server's cgroup can delegate the controller to a
child: it is the root of its hierarchy, or already has the controller in its
``cgroup.subtree_control``, or has no processes of its own (cgroup v2's rule).
A server started from a login shell on a pure-v2 systemd host usually cannot;
run it as a service with ``Delegate=yes`` and the server in a leaf cgroup.
Tmpfs pages count against memory in both versions.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from rain.sandbox.config import SandboxConfig

FOLDER = "rain-sandbox"
CPU_PERIOD_US = 100_000
_counter = itertools.count(1)


@dataclass(frozen=True)
class Hierarchy:
    """Where one cgroup hierarchy is mounted and where this process sits in it."""

    version: int
    mount: Path
    own: Path  # this process's cgroup directory
    controllers: frozenset[str]


def hierarchies(mountinfo: str | None = None, cgroup: str | None = None) -> list[Hierarchy]:
    """Every cgroup hierarchy this process is in (v2 first), from /proc/self."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    if cgroup is None:
        cgroup = Path("/proc/self/cgroup").read_text()
    paths: dict[str, str] = {}
    for line in cgroup.splitlines():
        number, _, rest = line.partition(":")
        names, _, path = rest.partition(":")
        paths["" if number == "0" and not names else names] = path
    found: list[Hierarchy] = []
    for line in mountinfo.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-")
        except ValueError:
            continue
        fstype, mount_root, point = fields[sep + 1], fields[3], Path(fields[4])
        if fstype == "cgroup2" and "" in paths:
            own = _inside(point, mount_root, paths[""])
            if own is not None:
                controllers = frozenset(_read(own / "cgroup.controllers").split())
                found.append(Hierarchy(2, point, own, controllers))
        elif fstype == "cgroup":
            options = set(fields[sep + 3].split(","))
            for names, path in paths.items():
                wanted = set(names.split(",")) if names else set()
                if wanted and wanted <= options:
                    own = _inside(point, mount_root, path)
                    if own is not None:
                        found.append(Hierarchy(1, point, own, frozenset(wanted)))
    return sorted(found, key=lambda h: h.version, reverse=True)


@dataclass
class RunCgroups:
    """The cgroups of one command, and the rlimits that stand in for missing controllers."""

    dirs: dict[str, Path] = field(default_factory=dict)  # controller -> its cgroup directory
    applied: dict[str, str] = field(default_factory=dict)  # limit -> how it is enforced
    rlimits: list[tuple[str, int, int]] = field(default_factory=list)

    def attach(self, pid: int) -> None:
        """Put `pid` (the launcher, before it starts anything) into every cgroup of the run."""
        for directory in set(self.dirs.values()):
            (directory / "cgroup.procs").write_text(f"{pid}\n")

    def out_of_memory(self) -> bool:
        """Whether the kernel's OOM killer acted in the memory cgroup."""
        directory = self.dirs.get("memory")
        if directory is None:
            return False
        for name in ("memory.events", "memory.oom_control"):
            for line in _read(directory / name).splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and value.strip().isdigit() and int(value) > 0:
                    return True
        return False

    def hit_process_limit(self) -> bool:
        directory = self.dirs.get("pids")
        if directory is None:
            return False
        for line in _read(directory / "pids.events").splitlines():
            key, _, value = line.partition(" ")
            if key == "max" and value.strip().isdigit() and int(value) > 0:
                return True
        return False

    def kill(self) -> None:
        """SIGKILL whatever is still in the run's cgroups."""
        for directory in set(self.dirs.values()):
            if (directory / "cgroup.kill").exists():
                with contextlib.suppress(OSError):
                    (directory / "cgroup.kill").write_text("1\n")
            for pid in _read(directory / "cgroup.procs").split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)

    def remove(self, timeout: float = 10.0) -> None:
        """Remove the cgroups (killing stragglers); they are empty within moments of the end."""
        deadline = time.monotonic() + timeout
        for directory in set(self.dirs.values()):
            while True:
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        break
                    self.kill()
                    time.sleep(0.02)


def prepare(config: SandboxConfig, *, timeout: float,
            found: list[Hierarchy] | None = None) -> RunCgroups:
    """Cgroups for one command with `config`'s limits (`timeout`: the command's wall clock)."""
    run = RunCgroups()
    found = hierarchies() if found is None else found
    name = f"{os.getpid()}-{next(_counter)}"
    wanted = {"memory": config.memory_bytes > 0, "pids": config.processes > 0,
              "cpu": config.cpus > 0}
    for controller in ("memory", "pids", "cpu"):
        if not wanted[controller]:
            continue
        for h in found:
            if controller not in h.controllers:
                continue
            directory = _make(h, controller, name)
            if directory is None:
                continue
            try:
                _limit(h.version, controller, directory, config)
            except OSError:
                continue
            run.dirs[controller] = directory
            run.applied[_LIMIT_NAMES[controller]] = f"cgroup v{h.version}"
            break
    if wanted["memory"] and "memory" not in run.dirs:
        run.rlimits.append(("RLIMIT_AS", config.memory_bytes, config.memory_bytes))
        run.applied["memory"] = "RLIMIT_AS (per process; no memory cgroup)"
    if wanted["pids"] and "pids" not in run.dirs:
        run.rlimits.append(("RLIMIT_NPROC", config.processes, config.processes))
        run.applied["processes"] = "RLIMIT_NPROC (per uid; no pids cgroup)"
    if wanted["cpu"] and "cpu" not in run.dirs:
        seconds = max(1, int(timeout * config.cpus))
        run.rlimits.append(("RLIMIT_CPU", seconds, seconds + 1))
        run.applied["cpu"] = f"RLIMIT_CPU {seconds} s (per process; no cpu cgroup)"
    return run


_LIMIT_NAMES = {"memory": "memory", "pids": "processes", "cpu": "cpu"}


def _limit(version: int, controller: str, directory: Path, config: SandboxConfig) -> None:
    if controller == "memory":
        if version == 2:
            (directory / "memory.max").write_text(str(config.memory_bytes))
            if (directory / "memory.swap.max").exists():
                (directory / "memory.swap.max").write_text("0")
        else:
            (directory / "memory.limit_in_bytes").write_text(str(config.memory_bytes))
            if (directory / "memory.memsw.limit_in_bytes").exists():
                with contextlib.suppress(OSError):
                    (directory / "memory.memsw.limit_in_bytes").write_text(
                        str(config.memory_bytes))
    elif controller == "pids":
        (directory / "pids.max").write_text(str(config.processes))
    else:
        quota = max(1000, int(config.cpus * CPU_PERIOD_US))
        if version == 2:
            (directory / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
        else:
            (directory / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
            (directory / "cpu.cfs_quota_us").write_text(str(quota))


def _make(h: Hierarchy, controller: str, name: str) -> Path | None:
    """The run's cgroup directory in hierarchy `h` (made), or None when it cannot be used."""
    parent = h.own / FOLDER
    try:
        if h.version == 2:
            _delegate(h.own, controller)
            parent.mkdir(exist_ok=True)
            _delegate(parent, controller)
        else:
            parent.mkdir(exist_ok=True)
        _sweep(parent)
        directory = parent / name
        directory.mkdir(exist_ok=True)
    except OSError:
        return None
    if h.version == 2 and not (directory / f"{controller}.max").exists():
        with contextlib.suppress(OSError):
            directory.rmdir()
        return None
    return directory


def _delegate(directory: Path, controller: str) -> None:
    control = directory / "cgroup.subtree_control"
    if controller not in _read(control).split():
        control.write_text(f"+{controller}\n")


def _sweep(parent: Path) -> None:
    """Remove run cgroups left by a server that died (they are named after its pid)."""
    for entry in parent.iterdir():
        owner = entry.name.split("-", 1)[0]
        if not entry.is_dir() or not owner.isdigit() or int(owner) == os.getpid():
            continue
        if not Path(f"/proc/{owner}").exists():
            with contextlib.suppress(OSError):
                entry.rmdir()


def _inside(point: Path, mount_root: str, path: str) -> Path | None:
    """This process's cgroup directory under a mount whose root is `mount_root`."""
    mount_root = mount_root.rstrip("/") or "/"
    if mount_root != "/" and not (path == mount_root or path.startswith(mount_root + "/")):
        return None
    rest = path[len(mount_root):] if mount_root != "/" else path
    return point / rest.lstrip("/")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
