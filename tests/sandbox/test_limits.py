"""Limits and lifetimes: fork bombs, memory hogs, runaways, cancels and a killed server."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rain.formats.tool import ToolExitError
from rain.model.errors import ToolFailed
from rain.sandbox import Sandbox, SandboxConfig, StepCancelled, cgroups

from .conftest import processes_with

pytestmark = pytest.mark.integration


def _gone(text: str, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while processes_with(text):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _run_dirs() -> list[Path]:
    """Run cgroups that exist now (every hierarchy)."""
    return [d for h in cgroups.hierarchies() for d in (h.own / cgroups.FOLDER).glob("*-*")]


def test_fork_bomb_is_contained(image_root: Path) -> None:
    config = SandboxConfig(processes=48, timeout=20)
    with Sandbox(image_root, config=config) as sandbox:
        # Bounded first: no more than the limit ever exists at once.
        # (The loop runs in a subshell, which dies at the first fork refused; the count
        # uses shell builtins only, as no fork is left to spare.)
        out = sandbox.shell("(for i in $(seq 1 200); do sleep 3140 & done) 2>/dev/null; "
                            "set -- /proc/[0-9]*; echo $#")
        assert 40 <= int(out.split()[-1]) <= 48
        # Then a real one: it dies at the time limit, and takes nothing with it.
        started = time.monotonic()
        with pytest.raises(ToolFailed):
            sandbox.run(["/bin/sh", "-c", "b() { b | b & }; b; sleep 3141"], timeout=5)
        assert time.monotonic() - started < 30
    assert _gone("sleep 3140") and _gone("sleep 3141")
    assert _run_dirs() == []


def test_memory_hog_is_killed(image_root: Path) -> None:
    config = SandboxConfig(memory_bytes=96 * 1024**2)
    with Sandbox(image_root, config=config) as sandbox, pytest.raises(ToolFailed) as killed:
        sandbox.run(["tail", "/dev/zero"])  # keeps the "last line" of an endless one
    assert "out of memory (limit 96 MiB)" in str(killed.value) or "RLIMIT_AS" in str(
        killed.value) or "memory" in str(killed.value)
    assert _run_dirs() == []


def test_runaway_command_is_killed_at_its_time_limit(image_root: Path) -> None:
    with Sandbox(image_root) as sandbox:
        started = time.monotonic()
        with pytest.raises(ToolFailed, match=r"^sleep timed out after 1 s and was killed"):
            sandbox.run(["sleep", "3142"], timeout=1)
        assert time.monotonic() - started < 10
    assert _gone("sleep 3142")


def test_background_jobs_do_not_outlive_their_command(image_root: Path) -> None:
    with Sandbox(image_root) as sandbox:
        started = time.monotonic()
        assert sandbox.shell("sleep 3143 & echo started") == "started\n"
        assert time.monotonic() - started < 10
    assert _gone("sleep 3143")


def test_cancel_kills_the_whole_tree_promptly(image_root: Path) -> None:
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)
    with Sandbox(image_root) as sandbox:
        timer.start()
        started = time.monotonic()
        with pytest.raises(StepCancelled, match=r"^sh was cancelled$"):
            sandbox.run(["sh", "-c", "sleep 3144 & sleep 3145 & wait"], cancel=stop)
        assert time.monotonic() - started < 5
        # A callable works too; one already true cancels before the command does anything.
        with pytest.raises(StepCancelled):
            sandbox.run(["touch", "/cancelled-before"], cancel=lambda: True)
    assert _gone("sleep 3144") and _gone("sleep 3145")
    assert _run_dirs() == []


def test_a_killed_server_leaves_nothing_behind(image_root: Path, tmp_path: Path) -> None:
    mounts_before = Path("/proc/mounts").read_text()
    script = tmp_path / "hold.py"
    script.write_text("import sys\nfrom rain.sandbox import Sandbox\n"
                      "with Sandbox(sys.argv[1]) as s:\n    s.run(['sleep', '3146'])\n")
    proc = subprocess.Popen([sys.executable, str(script), str(image_root)],
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not processes_with("sleep 3146"):
            assert time.monotonic() < deadline, "the sandboxed command never started"
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _gone("sleep 3146"), "a sandboxed command outlived its server"
    assert _gone("rain.sandbox.launcher")
    assert Path("/proc/mounts").read_text() == mounts_before
    # Its cgroup stays until the next sandbox of any server sweeps it.
    leftover = [d for d in _run_dirs() if d.name.startswith(f"{proc.pid}-")]
    with Sandbox(image_root) as sandbox:
        sandbox.run(["true"])
    assert all(not d.exists() for d in leftover)


def test_limits_are_named_in_the_log(image_root: Path) -> None:
    lines: list[str] = []
    with Sandbox(image_root, log=lines.append) as sandbox:
        sandbox.run(["true"])
        sandbox.run(["true"])
    described = [line for line in lines if line.startswith("sandbox:")]
    assert len(described) == 1
    line = described[0]
    assert "no network" in line and "wall 1800 s" in line
    for limit in ("memory 2048 MiB (", "processes 1024 (", "CPU 1 ("):
        assert limit in line
    assert "cgroup v" in line or "RLIMIT" in line


def test_exit_status_is_the_commands(image_root: Path) -> None:
    with Sandbox(image_root) as sandbox, pytest.raises(ToolExitError) as failed:
        sandbox.shell("echo oops >&2; exit 3")
    assert failed.value.returncode == 3 and str(failed.value) == "sh failed (exit 3): oops"
