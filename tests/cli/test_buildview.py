"""`BuildDisplay`: what `rain build --follow` / `--log` print, fed build answers as the
server gives them, on a pipe and on a (fake) terminal."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from rain.cli.buildview import BuildDisplay


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def poll(phase: str, *, status: str = "running", log: str = "", progress: float = 0.0,
         timings: dict[str, float] | None = None, timeout: float | None = None
         ) -> dict[str, Any]:
    return {"status": status, "phase": phase, "progress": progress, "log": log,
            "timings": timings or {}, "phase_timeout_s": timeout}


APT = "".join(f"Setting up package-{i} (1.0) ...\n" for i in range(300))
BUILD = [  # what a follower sees of one build, poll by poll
    poll(""), poll("restore", log="building hpc on image 1234\n"),
    poll("install", log=APT, timings={"restore": 2.0}),
    poll("install", log=APT, progress=0.5, timings={"restore": 2.0}),
    # compress was too short for any poll to see; the server timed it
    poll("boot-test", log="$ qemu-system-x86_64 ...\n", timeout=180.0,
         timings={"restore": 2.0, "install": 31.0, "compress": 4.2}),
    poll("upload", timings={"restore": 2.0, "install": 31.0, "compress": 4.2,
                            "boot-test": 42.5}),
    poll("upload", status="succeeded", log="test double: image 1234\n",
         timings={"restore": 2.0, "install": 31.0, "compress": 4.2, "boot-test": 42.5,
                  "upload": 1.0}),
]


def follow(**kw: Any) -> str:
    out = io.StringIO()
    console = Console(file=io.StringIO(), force_terminal=False)
    with BuildDisplay("build hpc.yaml", console=console, stream=out, clock=Clock(),
                      **kw) as display:
        for answer in BUILD:
            display.update(answer)
    return out.getvalue()


def test_follow_prints_phases_in_order_with_their_durations() -> None:
    lines = follow(phases=True).splitlines()
    assert lines == ["== restore", "== restore: 2.0 s", "== install",
                     "== install: 31.0 s", "== compress: 4.2 s",
                     "== boot-test (times out after 180 s)", "== boot-test: 42.5 s",
                     "== upload", "== upload: 1.0 s"]


def test_log_adds_the_raw_log_and_quiet_prints_nothing() -> None:
    logged = follow(show_log=True)
    assert logged.count("Setting up package-") == 600
    assert "== install: 31.0 s" in logged and "test double: image 1234" in logged
    assert follow() == ""


def test_a_phase_the_server_did_not_time_ends_by_the_poll_clock() -> None:
    out, clock = io.StringIO(), Clock()
    display = BuildDisplay("b", phases=True, stream=out, clock=clock,
                           console=Console(file=io.StringIO(), force_terminal=False))
    with display:
        display.update(poll("base"))
        clock.now += 3.25
        display.update(poll("base", status="failed", log="E: no room\n"))
        display.failed({"log": "one\ntwo\nE: no room\n"})
    assert out.getvalue().splitlines() == [
        "== base", "== base: 3.2 s", "-- the last 3 lines of the build log:", "one", "two",
        "E: no room"]


def test_on_a_terminal_the_boot_test_shows_seconds_against_its_timeout() -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    clock = Clock()
    with BuildDisplay("build hpc.yaml", phases=True, console=console, clock=clock) as display:
        assert display.bar is not None
        display.update(BUILD[2])
        display.update(BUILD[3])
        display.bar.refresh()
        assert "50%" in screen.getvalue()  # the phase's own progress
        display.update(BUILD[4])
        clock.now += 42
        display.update(BUILD[4] | {"log": ""})
        display.bar.refresh()
        shown = screen.getvalue()
    assert "build hpc.yaml boot-test" in shown and "42 s / 180 s" in shown
    # Phase lines go above the bar, not the apt chatter.
    assert "== install: 31.0 s" in shown and "Setting up package" not in shown
