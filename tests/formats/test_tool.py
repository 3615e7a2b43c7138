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
