"""run_tool: argv only, limits enforced by the kernel, failures as ToolFailed."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from rain.formats import qemu
from rain.formats.tool import ToolExitError, ToolLimits, run_tool
from rain.model import DiskFormat
from rain.model.errors import ToolFailed

PY = sys.executable


def test_runs_argv_and_returns_output() -> None:
    proc = run_tool(
        [PY, "-c", "import sys; print(sys.stdin.read().upper())"], timeout=10, input=b"disk"
    )
    assert proc.returncode == 0
    assert proc.stdout.strip() == b"DISK"


def test_refuses_shell_strings() -> None:
    with pytest.raises(TypeError):
        run_tool("echo hello", timeout=5)  # type: ignore[arg-type]


def test_missing_binary_is_tool_failed() -> None:
    with pytest.raises(ToolFailed, match="no-such-tool-rain is not installed"):
        run_tool(["no-such-tool-rain", "--help"], timeout=5)


def test_nonzero_exit_quotes_tool_and_last_stderr_line() -> None:
    script = "import sys; sys.stderr.write('noise\\nthe real reason\\n'); sys.exit(3)"
    with pytest.raises(ToolExitError) as err:
        run_tool([PY, "-c", script], timeout=10)
    assert err.value.returncode == 3
    assert err.value.tool == os.path.basename(PY)
    assert "failed (exit 3)" in err.value.message
    assert "the real reason" in err.value.message
    assert "\n" not in err.value.message
    assert "noise" in err.value.stderr


def test_check_false_returns_nonzero_status() -> None:
    proc = run_tool([PY, "-c", "raise SystemExit(2)"], timeout=10, check=False)
    assert proc.returncode == 2


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    script = f"sleep 30 & echo $! > {pidfile}; wait"
    start = time.monotonic()
    with pytest.raises(ToolFailed, match=r"sh timed out after 0\.5 s"):
        run_tool(["sh", "-c", script], timeout=0.5)
    assert time.monotonic() - start < 10
    # The backgrounded grandchild is gone too (or a zombie waiting for init to reap it).
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _running(child):
        assert time.monotonic() < deadline, "grandchild survived the timeout"
        time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_cpu_limit_kills_a_busy_loop() -> None:
    start = time.monotonic()
    with pytest.raises(ToolFailed, match="CPU time limit of 1 s") as err:
        run_tool([PY, "-c", "while True: pass"], timeout=20, cpu_seconds=1)
    assert not isinstance(err.value, ToolExitError)
    assert time.monotonic() - start < 10


def test_memory_limit_stops_an_allocation() -> None:
    with pytest.raises(ToolFailed, match="MemoryError"):
        run_tool([PY, "-c", "b = bytearray(1 << 30)"], timeout=20, memory_bytes=256 << 20)


@pytest.mark.integration
def test_qemu_img_over_its_memory_limit_is_killed_and_reported(raw_image: Path) -> None:
    with pytest.raises(ToolFailed, match="qemu-img") as err:
        qemu.info(raw_image, DiskFormat.RAW, ToolLimits(memory_bytes=16 << 20))
    assert "memory limit" in err.value.message or "exit" in err.value.message


# -- how the limits are applied ---------------------------------------------------------------

def _in_child(code: str) -> str:
    """Run `code` in a fresh interpreter (its limits must not leak into the test process)."""
    import subprocess

    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_limits_never_ask_above_the_hard_limit_already_set() -> None:
    """An operator's tighter hard limit (or a server without CAP_SYS_RESOURCE) must not make
    every limited tool fail to start: the ceiling is clamped to it and applies."""
    got = _in_child(
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_CPU, (7, 7))\n"
        "from rain.formats.tool import run_tool\n"
        "p = run_tool(['sh', '-c', 'ulimit -t'], timeout=10, cpu_seconds=30)\n"
        "print(p.stdout.decode().strip())\n")
    assert got == "7"


def test_the_fork_fallback_applies_the_same_limits() -> None:
    """Without prlimit the limits are set between fork and exec: still enforced."""
    got = _in_child(
        "import rain.formats.tool as t\n"
        "t.PRLIMIT = None\n"
        "p = t.run_tool(['sh', '-c', 'ulimit -t; ulimit -v'], timeout=10, cpu_seconds=9,\n"
        "               memory_bytes=512 << 20)\n"
        "print(' '.join(p.stdout.decode().split()))\n")
    assert got == f"9 {512 << 10}"


def test_the_tool_is_found_on_the_childs_path(tmp_path: Path) -> None:
    """`env` decides which binary runs, with or without limits: the same one either way."""
    tool = tmp_path / "rain-probe-tool"
    tool.write_text("#!/bin/sh\necho from-the-child-path\n")
    tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}"}
    for limits in ({}, {"cpu_seconds": 5}):
        proc = run_tool(["rain-probe-tool"], timeout=10, env=env, **limits)  # type: ignore[arg-type]
        assert proc.stdout.strip() == b"from-the-child-path"


def test_a_failing_prlimit_is_not_read_as_the_tools_answer(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`qemu-img compare` answers with its exit status (1 = differ): a prlimit that could
    not start the tool must be an error, not 'the images differ'."""
    import rain.formats.tool as tool_module

    fake = tmp_path / "prlimit"
    fake.write_text("#!/bin/sh\necho 'prlimit: failed to set the CPU resource limit: "
                    "Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(tool_module, "PRLIMIT", str(fake))
    with pytest.raises(ToolFailed, match="could not be started under its limits") as err:
        run_tool(["true"], timeout=10, cpu_seconds=5, check=False)
    assert not isinstance(err.value, ToolExitError)
