"""The one place rain runs external tools.

Every `qemu-img` (and later `sfdisk`, `mke2fs`, ...) call goes through
`run_tool`: argv lists only (never a shell), a timeout that kills the whole
process group, optional CPU/address-space ceilings and one error type,
`ToolFailed`, whose one-line message names the tool and quotes the end of its
stderr.

The ceilings matter because image headers are attacker-controlled: a crafted
qcow2/vmdk can make `qemu-img info` allocate gigabytes or spin for minutes.
OpenStack caps `qemu-img info` the same way (OSSA-2015-014: prlimit with 1 GiB
of address space and 30 s of CPU); `ToolLimits()` carries the same numbers.

Limits are applied by util-linux `prlimit`, which sets them on itself and
execs the tool, so the child is started with posix_spawn/vfork. Only without
`prlimit` they are set in the child between fork and exec (`preexec_fn`):
that forks the whole server, and runs Python's after-fork handlers in the
child (they drop the other threads' states, whose finalizers may then wait on
a lock some parent thread held — it happened, with 40 concurrent uploads).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from rain.model.errors import ToolFailed

GiB = 1 << 30

# How much of stderr is kept on the error (the message itself quotes only the end).
_STDERR_KEPT = 64 * 1024
_TAIL_LINES = 2
_TAIL_CHARS = 300


@dataclass(frozen=True)
class ToolLimits:
    """Ceilings for one run of a tool over untrusted input.

    `cpu_seconds` and `memory_bytes` (address space) are enforced by the
    kernel; `timeout` is wall-clock time, after which the process group is
    killed. `None` means no ceiling.
    """

    cpu_seconds: int | None = 30
    memory_bytes: int | None = 1 * GiB
    timeout: float = 60.0


# For inspecting untrusted images (qemu-img info/check): the OpenStack numbers.
DEFAULT_LIMITS = ToolLimits()
# Converting reads and writes the whole image, so time scales with its size;
# qemu-img convert also keeps several coroutine buffers and a thread pool.
CONVERT_LIMITS = ToolLimits(cpu_seconds=3600, memory_bytes=2 * GiB, timeout=3600.0)


class ToolExitError(ToolFailed):
    """The tool ran to completion and reported failure with a non-zero exit status.

    Callers that run a tool over untrusted input catch this one to turn the
    tool's complaint into `InvalidImage`; timeouts, limit kills and missing
    binaries stay plain `ToolFailed`.
    """

    def __init__(self, message: str, *, tool: str, stderr: str, returncode: int) -> None:
        super().__init__(message, tool=tool, stderr=stderr)
        self.returncode = returncode


def run_tool(
    argv: Sequence[str],
    *,
    timeout: float,
    cpu_seconds: int | None = None,
    memory_bytes: int | None = None,
    input: bytes | None = None,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run `argv` and return its completed process (stdout and stderr as bytes).

    Raises `ToolFailed` when the tool is missing, times out or is killed by a
    signal (including the kernel enforcing `cpu_seconds`), and `ToolExitError`
    on a non-zero exit unless `check` is false (for tools such as
    `qemu-img check` whose exit status carries results).
    """
    if isinstance(argv, str | bytes) or not argv:
        raise TypeError("run_tool takes a non-empty argv list, never a shell string")
    args = [str(a) for a in argv]
    tool = os.path.basename(args[0])
    preexec = None
    run_env = dict(os.environ if env is None else env)
    run_env.setdefault("LC_ALL", "C")  # stable, parseable messages
    via_prlimit = False
    if cpu_seconds is not None or memory_bytes is not None:
        # The tool as the child would find it (its PATH, not ours), named in full so
        # prlimit runs exactly that; missing, it is reported as such below.
        found = shutil.which(args[0], path=run_env.get("PATH", os.defpath))
        if PRLIMIT is not None and found is not None:
            args = [PRLIMIT, *_prlimit_options(cpu_seconds, memory_bytes), "--", found,
                    *args[1:]]
            via_prlimit = True
        else:
            preexec = _rlimit_setter(cpu_seconds, memory_bytes)
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=run_env,
            preexec_fn=preexec,
            start_new_session=True,  # own process group, so a timeout kills helpers too
            close_fds=True,
        )
    except FileNotFoundError:
        raise ToolFailed(f"{tool} is not installed (not found on PATH)", tool=tool) from None
    except OSError as exc:
        raise ToolFailed(f"{tool} could not be started: {exc.strerror}", tool=tool) from None

    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = _drain(proc)
        stderr = _decode(err)
        raise ToolFailed(
            _message(tool, f"timed out after {timeout:g} s and was killed", stderr),
            tool=tool,
            stderr=stderr,
        ) from None
    except BaseException:
        _kill_group(proc)
        _drain(proc)
        raise

    stderr = _decode(err)
    rc = proc.returncode
    if via_prlimit and rc != 0 and stderr.startswith("prlimit: "):
        # prlimit itself failed (limits refused, exec failed): the tool never ran, so
        # its exit status must not be read as the tool's answer.
        raise ToolFailed(_message(tool, "could not be started under its limits", stderr),
                         tool=tool, stderr=stderr)
    if rc < 0:
        raise ToolFailed(
            _message(tool, _signal_reason(-rc, cpu_seconds, memory_bytes), stderr),
            tool=tool,
            stderr=stderr,
        )
    if rc != 0 and check:
        raise ToolExitError(
            _message(tool, f"failed (exit {rc})", stderr),
            tool=tool,
            stderr=stderr,
            returncode=rc,
        )
    return subprocess.CompletedProcess(args, rc, out, err)


@contextlib.contextmanager
def running_tool(
    argv: Sequence[str],
    *,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | IO[bytes] | None = subprocess.DEVNULL,
    stderr: int | IO[bytes] | None = subprocess.DEVNULL,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a long-running tool (a VM, a namespace holder) for the length of a `with` block.

    For tools the caller must watch while they run, which `run_tool` cannot
    do. The tool gets its own process group, and on leaving the block, on
    success, error or KeyboardInterrupt alike, the whole group is killed and
    reaped, so nothing it started outlives the block.
    """
    if isinstance(argv, str | bytes) or not argv:
        raise TypeError("running_tool takes a non-empty argv list, never a shell string")
    args = [str(a) for a in argv]
    tool = os.path.basename(args[0])
    run_env = dict(os.environ if env is None else env)
    run_env.setdefault("LC_ALL", "C")
    try:
        proc = subprocess.Popen(
            args,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            cwd=cwd,
            env=run_env,
            start_new_session=True,
            close_fds=True,
        )
    except FileNotFoundError:
        raise ToolFailed(f"{tool} is not installed (not found on PATH)", tool=tool) from None
    except OSError as exc:
        raise ToolFailed(f"{tool} could not be started: {exc.strerror}", tool=tool) from None
    try:
        yield proc
    finally:
        _kill_group(proc)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        # A process stuck in the kernel cannot be reaped; do not hang with it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)


def stderr_tail(stderr: str, lines: int = _TAIL_LINES) -> str:
    """The last non-empty lines of stderr joined on one line (what messages quote)."""
    kept = [line.strip() for line in stderr.splitlines() if line.strip()][-lines:]
    tail = " / ".join(kept)
    if len(tail) > _TAIL_CHARS:
        tail = "…" + tail[-_TAIL_CHARS:]
    return tail


def _message(tool: str, what: str, stderr: str) -> str:
    tail = stderr_tail(stderr)
    return f"{tool} {what}: {tail}" if tail else f"{tool} {what}"


def _signal_reason(signum: int, cpu_seconds: int | None, memory_bytes: int | None) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    if signum == signal.SIGXCPU and cpu_seconds is not None:
        return f"was killed by {name} (CPU time limit of {cpu_seconds} s)"
    if signum == signal.SIGKILL and cpu_seconds is not None:
        return f"was killed by {name} (CPU time limit of {cpu_seconds} s, or out of memory)"
    if memory_bytes is not None and signum in (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS):
        return f"was killed by {name} (memory limit of {memory_bytes >> 20} MiB likely exceeded)"
    return f"was killed by {name}"


PRLIMIT = shutil.which("prlimit")


def _limits(cpu_seconds: int | None,
            memory_bytes: int | None) -> list[tuple[str, int, tuple[int, int]]]:
    """(prlimit option, resource, (soft, hard)) for each ceiling, never above the hard
    limit this process already has: a child cannot raise it without privilege, and a
    tighter ceiling set by the operator is the one that applies."""
    wanted: list[tuple[str, int, tuple[int, int]]] = []
    if cpu_seconds is not None:
        # Soft limit sends SIGXCPU; the hard limit one second later is a SIGKILL
        # for a tool that catches or ignores SIGXCPU.
        wanted.append(("cpu", resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1)))
    if memory_bytes is not None:
        wanted.append(("as", resource.RLIMIT_AS, (memory_bytes, memory_bytes)))
    limits = []
    for option, which, (soft, hard) in wanted:
        current = resource.getrlimit(which)[1]
        if current != resource.RLIM_INFINITY:
            soft, hard = min(soft, current), min(hard, current)
        limits.append((option, which, (soft, hard)))
    return limits


def _prlimit_options(cpu_seconds: int | None, memory_bytes: int | None) -> list[str]:
    """The same limits as `_rlimit_setter`, as `prlimit` options (soft:hard)."""
    return [f"--{option}={soft}:{hard}"
            for option, _, (soft, hard) in _limits(cpu_seconds, memory_bytes)]


def _rlimit_setter(cpu_seconds: int | None, memory_bytes: int | None) -> Callable[[], None] | None:
    """A preexec function applying the limits in the child, or None when there are none."""
    frozen = tuple((which, value) for _, which, value in _limits(cpu_seconds, memory_bytes))
    if not frozen:
        return None

    def apply() -> None:
        for which, value in frozen:
            resource.setrlimit(which, value)

    return apply


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _drain(proc: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    """Collect what the killed process wrote, without hanging on a stray pipe holder."""
    try:
        out, err = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return out or b"", err or b""


def _decode(err: bytes | None) -> str:
    return (err or b"")[-_STDERR_KEPT:].decode("utf-8", "replace")
