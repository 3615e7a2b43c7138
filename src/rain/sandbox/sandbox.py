"""`Sandbox`: run other people's commands on an image tree without letting them touch the host.

::

    with Sandbox(root, config=SandboxConfig(), binds=[Bind(debs, "/run/rain-apt")],
                 log=progress.log) as sandbox:
        sandbox.run(["apt-get", "install", "-y", "hello"], env=APT_ENV)
        sandbox.shell("echo built > /etc/built-by-rain", cancel=stop_event)
        sandbox.tree.write_text("/etc/motd", "hello\\n")   # host side, symlink-safe

Every `run` is a fresh sandbox (`rain.sandbox.launcher`): its own user
namespace (root inside is an unprivileged host uid; the tree is seen
through an idmapped mount so files stay owned by uid 0 on disk), mount,
PID, network (loopback only), UTS, IPC and cgroup namespaces, ``pivot_root``
into the tree, a fresh /proc, a minimal /dev, and the limits of
`SandboxConfig` (see `rain.sandbox.cgroups`). Nothing survives a run but
what it wrote into the tree: no process, no mount. `tree` is the host-side
way in (`ImageTree`), for code that must not run the image's binaries.

A run ends in one of: its output (exit 0); `ToolExitError` (non-zero exit,
naming the command and quoting its stderr); `ToolFailed` (killed: time or
memory limit, a signal); `StepCancelled` (its `cancel` was set: the whole
process tree is killed within a tenth of a second); `Unsupported` (this host
cannot make the sandbox: the one-line reason, never a silent fallback to
host root); `InvalidImage` (the tree cannot hold a sandbox, e.g. its /dev is
a symlink).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import rain
from rain.formats.tool import ToolExitError, stderr_tail
from rain.model.errors import InvalidImage, ToolFailed, Unsupported
from rain.sandbox import cgroups
from rain.sandbox.config import SandboxConfig
from rain.sandbox.tree import ImageTree

LogFn = Callable[[str], None]
Cancel = threading.Event | Callable[[], bool]
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BASE_ENV = {"PATH": SANDBOX_PATH, "HOME": "/root", "LC_ALL": "C.UTF-8", "TERM": "dumb"}
OUTPUT_LIMIT = 64 * 1024**2  # bytes of a command's stdout kept (the rest is dropped, noted)
STDERR_LIMIT = 1024**2
POLL_SECONDS = 0.1
_SRC = str(Path(rain.__file__).resolve().parent.parent)


class StepCancelled(ToolFailed):
    """The command's `cancel` was set; its whole process tree was killed."""

    code = "cancelled"


@dataclass(frozen=True)
class Bind:
    """A host directory shown read-only at `target` (a path under /run) in every run."""

    source: Path
    target: str

    def __post_init__(self) -> None:
        parts = self.target.split("/")
        if not self.target.startswith("/run/") or ".." in parts or "" in parts[1:]:
            raise ValueError(f"bind target {self.target!r} must be a plain path under /run/")


class Sandbox:
    """Runs commands on the tree at `root`, each in a fresh sandbox (see the module doc)."""

    def __init__(self, root: Path | str, *, config: SandboxConfig | None = None,
                 binds: Sequence[Bind] = (), hostname: str = "localhost",
                 log: LogFn | None = None, cancel: Cancel | None = None) -> None:
        self.root = Path(os.path.realpath(root))
        self.config = config or SandboxConfig()
        self.binds = tuple(binds)
        self.hostname = hostname
        self.log = log
        self.cancel = cancel  # the default for every run (a build's cancel)
        self._tree: ImageTree | None = None
        self._described = False

    def __enter__(self) -> Sandbox:
        if not self.root.is_dir() or self.root == Path("/"):
            raise InvalidImage(f"{self.root} is not a root filesystem directory")
        check_id_range(self.config)
        self._tree = ImageTree(self.root)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._tree is not None:
            self._tree.close()
            self._tree = None

    def with_binds(self, *binds: Bind) -> Sandbox:
        """The same sandbox with more read-only binds (valid inside this one's with block)."""
        sibling = Sandbox(self.root, config=self.config, binds=(*self.binds, *binds),
                          hostname=self.hostname, log=self.log, cancel=self.cancel)
        sibling._tree = self.tree
        sibling._described = self._described
        return sibling

    @property
    def tree(self) -> ImageTree:
        if self._tree is None:
            raise RuntimeError("Sandbox.tree used outside its with block")
        return self._tree

    def shell(self, line: str, *, env: Mapping[str, str] | None = None,
              timeout: float | None = None, cancel: Cancel | None = None) -> str:
        """One shell line (a template's ``run:`` entry) with the image's /bin/sh."""
        return self.run(["/bin/sh", "-c", line], env=env, timeout=timeout, cancel=cancel)

    def run(self, argv: Sequence[str], *, input: bytes | None = None,
            env: Mapping[str, str] | None = None, timeout: float | None = None,
            cancel: Cancel | None = None) -> str:
        """Run `argv` in a fresh sandbox on the tree; its standard output.

        The command sees only `env` over a minimal environment (PATH, HOME,
        LC_ALL=C.UTF-8). `timeout` defaults to ``config.timeout``. `cancel`
        (an Event, or a callable returning True; default: the sandbox's) is
        polled ten times a second; once set, the run's whole process tree is
        killed and `StepCancelled` raised.
        """
        if isinstance(argv, str | bytes) or not argv:
            raise TypeError("Sandbox.run takes a non-empty argv list, never a shell string")
        if self._tree is None:
            raise RuntimeError("Sandbox.run called outside its with block")
        args = [str(a) for a in argv]
        tool = os.path.basename(args[0])
        limit = self.config.timeout if timeout is None else timeout
        run_cgroups = cgroups.prepare(self.config, timeout=limit)
        if not self._described:
            self._describe(run_cgroups, limit)
        _log(self.log, "$ " + " ".join(_quote(a) for a in args))
        spec = {
            "root": str(self.root), "argv": args, "env": {**BASE_ENV, **(env or {})},
            "id_base": self.config.id_base, "id_count": self.config.id_count,
            "hostname": self.hostname, "tmpfs_bytes": self.config.tmpfs_bytes,
            "binds": [{"source": str(b.source), "target": b.target} for b in self.binds],
            "rlimits": run_cgroups.rlimits,
        }
        try:
            outcome = _launch(spec, run_cgroups, input=input, timeout=limit,
                              cancel=self.cancel if cancel is None else cancel)
        finally:
            run_cgroups.remove()
        out = outcome.stdout.decode("utf-8", "replace")
        err = outcome.stderr.decode("utf-8", "replace")
        _log_lines(self.log, out)
        _log_lines(self.log, err)
        return _result(tool, outcome, out, err, limit, self.config)

    def _describe(self, run_cgroups: cgroups.RunCgroups, timeout: float) -> None:
        """Say once per sandbox what isolates it and how each limit is enforced."""
        self._described = True
        c = self.config
        how = run_cgroups.applied
        parts = [f"wall {timeout:g} s per command"]
        if c.memory_bytes > 0:
            parts.append(f"memory {c.memory_bytes >> 20} MiB ({how['memory']})")
        if c.processes > 0:
            parts.append(f"processes {c.processes} ({how['processes']})")
        if c.cpus > 0:
            parts.append(f"CPU {c.cpus:g} ({how['cpu']})")
        parts.append(f"tmpfs {c.tmpfs_bytes >> 20} MiB each")
        _log(self.log, f"sandbox: root is host uid {c.id_base} (idmapped tree), own mount/pid/"
                       "net/uts/ipc/cgroup namespaces, no network; limits: " + ", ".join(parts))


def check_id_range(config: SandboxConfig) -> None:
    """Refuse an id range that overlaps a host account or an /etc/subuid, /etc/subgid grant."""
    low, high = config.id_base, config.id_base + config.id_count
    if config.id_base <= 0 or config.id_count < 65536 or high > 2**32 - 1:
        raise Unsupported(f"[sandbox] id_base {config.id_base} / id_count {config.id_count}: "
                          "the range must start above 0 and hold at least 65536 ids")
    for path in ("/etc/subuid", "/etc/subgid"):
        for line in _lines(path):
            fields = line.split(":")
            if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                start, count = int(fields[1]), int(fields[2])
                if start < high and low < start + count:
                    raise Unsupported(f"[sandbox] id_base {low}: ids {low}-{high - 1} overlap "
                                      f"{path} ({line.strip()}); choose another range")
    for path in ("/etc/passwd", "/etc/group"):
        for line in _lines(path):
            fields = line.split(":")
            if len(fields) > 2 and fields[2].isdigit() and low <= int(fields[2]) < high:
                raise Unsupported(f"[sandbox] id_base {low}: id {fields[2]} of {path} "
                                  f"({fields[0]}) is inside the sandbox's range")


@dataclass
class _Outcome:
    stdout: bytes
    stderr: bytes
    status: dict[str, object]
    launcher_rc: int
    timed_out: bool
    cancelled: bool
    truncated: bool
    out_of_memory: bool = False
    hit_process_limit: bool = False


def _launch(spec: dict[str, object], run_cgroups: cgroups.RunCgroups, *, input: bytes | None,
            timeout: float, cancel: Cancel | None) -> _Outcome:
    spec_r, spec_w = os.pipe()
    status_r, status_w = os.pipe()
    argv = [sys.executable, "-S", "-m", "rain.sandbox.launcher", "--spec-fd", str(spec_r),
            "--status-fd", str(status_w), "--parent", str(os.getpid())]
    env = {"PATH": SANDBOX_PATH, "LC_ALL": "C", "PYTHONPATH": _SRC, "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if input is not None
                                else subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, pass_fds=(spec_r, status_w), env=env,
                                start_new_session=True, close_fds=True)
    except OSError as exc:
        for fd in (spec_r, spec_w, status_r, status_w):
            os.close(fd)
        raise ToolFailed(f"the sandbox launcher could not start: {exc.strerror}",
                         tool="sandbox") from None
    os.close(spec_r)
    os.close(status_w)
    try:
        try:
            run_cgroups.attach(proc.pid)
        except OSError as exc:
            raise ToolFailed(f"cannot put the sandbox into its cgroup: {exc}",
                             tool="sandbox") from None
        with os.fdopen(spec_w, "wb") as f:
            f.write(json.dumps(spec).encode())
        spec_w = -1
        return _pump(proc, status_r, run_cgroups, input=input, timeout=timeout, cancel=cancel)
    except BaseException:
        _kill(proc, run_cgroups)
        raise
    finally:
        if spec_w >= 0:
            with contextlib.suppress(OSError):
                os.close(spec_w)
        with contextlib.suppress(OSError):
            os.close(status_r)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)


def _pump(proc: subprocess.Popen[bytes], status_r: int, run_cgroups: cgroups.RunCgroups, *,
          input: bytes | None, timeout: float, cancel: Cancel | None) -> _Outcome:
    """Feed stdin, collect stdout/stderr/status until the launcher ends, a limit or a cancel."""
    assert proc.stdout is not None and proc.stderr is not None
    out = bytearray()
    err = bytearray()
    status = bytearray()
    truncated = False
    pending = memoryview(input or b"")
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ, "out")
    selector.register(proc.stderr, selectors.EVENT_READ, "err")
    selector.register(status_r, selectors.EVENT_READ, "status")
    if proc.stdin is not None:
        os.set_blocking(proc.stdin.fileno(), False)
        if pending:
            selector.register(proc.stdin, selectors.EVENT_WRITE, "in")
        else:
            proc.stdin.close()
    deadline = time.monotonic() + timeout
    timed_out = cancelled = False
    open_streams = 3
    try:
        while open_streams:
            if _is_set(cancel):
                cancelled = True
                break
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in selector.select(min(POLL_SECONDS, left)):
                if key.data == "in":
                    assert proc.stdin is not None
                    try:
                        pending = pending[os.write(proc.stdin.fileno(), pending[:65536]):]
                    except BrokenPipeError:
                        pending = memoryview(b"")
                    if not pending:
                        selector.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                if key.data == "out":
                    room = OUTPUT_LIMIT - len(out)
                    truncated = truncated or len(chunk) > room
                    out += chunk[:max(room, 0)]
                elif key.data == "err":
                    err += chunk
                    del err[:-STDERR_LIMIT]
                else:
                    status += chunk[:65536]
    finally:
        selector.close()
    if timed_out or cancelled:
        _kill(proc, run_cgroups)
    try:
        rc = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        _kill(proc, run_cgroups)
        rc = proc.wait()
    return _Outcome(bytes(out), bytes(err), _last_status(bytes(status)), rc, timed_out,
                    cancelled, truncated, run_cgroups.out_of_memory(),
                    run_cgroups.hit_process_limit())


def _result(tool: str, o: _Outcome, out: str, err: str, timeout: float,
            config: SandboxConfig) -> str:
    if o.cancelled:
        raise StepCancelled(f"{tool} was cancelled", tool=tool, stderr=err)
    if o.timed_out:
        raise ToolFailed(f"{tool} timed out after {timeout:g} s and was killed", tool=tool,
                         stderr=err)
    if "error" in o.status:
        message = str(o.status["error"])
        if o.status.get("kind") == "image":
            raise InvalidImage(message)
        raise Unsupported(message)
    tail = stderr_tail(err) or stderr_tail(out)
    suffix = f": {tail}" if tail else ""
    if o.out_of_memory:
        raise ToolFailed(f"{tool} was killed: out of memory (limit {config.memory_bytes >> 20} "
                         f"MiB)", tool=tool, stderr=err)
    if "signal" in o.status:
        number = int(str(o.status["signal"]))
        reason = f"{tool} was killed by {_signal_name(number)}"
        if o.hit_process_limit:
            reason += f" (process limit of {config.processes} reached)"
        raise ToolFailed(reason + suffix, tool=tool, stderr=err)
    if "exit" not in o.status:
        raise ToolFailed(f"the sandbox of {tool} ended without a result (launcher exit "
                         f"{o.launcher_rc}){suffix}", tool=tool, stderr=err)
    code = int(str(o.status["exit"]))
    if code != 0:
        if o.hit_process_limit:
            suffix += f" (process limit of {config.processes} reached)"
        raise ToolExitError(f"{tool} failed (exit {code}){suffix}", tool=tool, stderr=err,
                            returncode=code)
    if o.truncated:
        out += f"\n[rain: output beyond {OUTPUT_LIMIT} bytes dropped]\n"
    return out


def _kill(proc: subprocess.Popen[bytes], run_cgroups: cgroups.RunCgroups) -> None:
    """Kill the launcher's process group (its tree dies with it) and anything in its cgroups."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    run_cgroups.kill()


def _is_set(cancel: Cancel | None) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def _last_status(raw: bytes) -> dict[str, object]:
    """The launcher's verdict: an error line wins, else the last line."""
    found: dict[str, object] = {}
    for line in raw.decode("utf-8", "replace").splitlines():
        with contextlib.suppress(ValueError):
            message = json.loads(line)
            if isinstance(message, dict):
                if "error" in message:
                    return message
                found = message
    return found


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _log(log: LogFn | None, line: str) -> None:
    if log is not None:
        log(line)


def _log_lines(log: LogFn | None, text: str) -> None:
    if log is None:
        return
    for line in text.splitlines():
        if line.strip():
            log(line.rstrip())


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return []
