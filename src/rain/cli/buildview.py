"""A build as `rain build`/`rebuild`/`builds ID` show it while it runs.

Fed each poll's answer by `Client.follow_build`. Three levels:

- quiet (no `--follow`): on a terminal one bar with the phase; piped, nothing;
- `--follow`: a line when each phase starts and when it ends (with its
  duration), and on a terminal a bar for the phase that runs — its progress
  when the builder reports one, the seconds against the timeout for the boot
  test (which reports nothing until QEMU answers), a spinner otherwise;
- `--log`: the same, and the raw build log (apt's, the tools') as it comes.

A build that fails shows the last lines of its log whatever the level, so the
reason is on the screen without `--log`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from rain.cli.output import err

FAILURE_TAIL = 15  # log lines shown when a build fails without --log


class BuildDisplay:
    def __init__(self, label: str, *, phases: bool = False, show_log: bool = False,
                 console: Console | None = None, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.show_log = show_log
        self.phases = phases or show_log
        self.console = console or err
        self.stream = stream
        self.clock = clock
        self.phase: str | None = None
        self._since = 0.0
        self._timeout: float | None = None
        self._timings: dict[str, float] = {}
        self.bar: Progress | None = None  # on a terminal
        self._task: Any = None

    # -- life cycle ------------------------------------------------------------
    def __enter__(self) -> BuildDisplay:
        if self.console.is_terminal:
            self.bar = Progress(
                SpinnerColumn(), TextColumn("[progress.description]{task.description}"),
                BarColumn(), TextColumn("{task.fields[how_far]}"), TimeElapsedColumn(),
                console=self.console, transient=True)
            self.bar.start()
            self._task = self.bar.add_task(self.label, total=None, how_far="")
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    # -- each poll ---------------------------------------------------------------
    def update(self, build: dict[str, Any]) -> None:
        text = build.get("log") or ""
        if self.show_log and text:
            for line in text.rstrip("\n").split("\n"):
                self._line(line)
        phase = build.get("phase") or ""
        finished = build.get("status") in ("succeeded", "failed", "cancelled")
        self._ended(build, phase, finished)
        if phase and phase != self.phase and not finished:
            self._started(phase, build.get("phase_timeout_s"))
        self._bar(build, finished)

    def failed(self, build: dict[str, Any]) -> None:
        """A build that did not succeed: the end of its log, unless it was all shown."""
        if self.show_log:
            return
        lines = (build.get("log") or "").rstrip("\n").split("\n")
        tail = [line for line in lines[-FAILURE_TAIL:] if line]
        if tail:
            self._line(f"-- the last {len(tail)} lines of the build log:")
        for line in tail:
            self._line(line)

    # -- helpers -------------------------------------------------------------------
    def _started(self, phase: str, timeout: Any) -> None:
        """The phase that runs now; `timeout` bounds it (the boot test), if set."""
        self.phase, self._since = phase, self.clock()
        self._timeout = float(timeout) if timeout else None
        if self.phases:
            limit = f" (times out after {self._timeout:.0f} s)" if self._timeout else ""
            self._line(f"== {phase}{limit}")

    def _ended(self, build: dict[str, Any], phase: str, finished: bool) -> None:
        """Lines for the phases that ended since the last poll, with how long they took:
        the server's timings say (also of phases too short for any poll to see), else
        the poll clock does."""
        timings = {str(k): float(v) for k, v in (build.get("timings") or {}).items()}
        ended = [(name, spent - self._timings.get(name, 0.0)) for name, spent in
                 timings.items() if spent > self._timings.get(name, 0.0)]
        self._timings = timings
        if self.phase is not None and (phase != self.phase or finished):
            if all(name != self.phase for name, _ in ended):
                ended.insert(0, (self.phase, self.clock() - self._since))
            self.phase = None
        if self.phases:
            for name, spent in ended:
                self._line(f"== {name}: {spent:.1f} s")

    def _bar(self, build: dict[str, Any], finished: bool) -> None:
        if self.bar is None:
            return
        if finished:
            self.bar.update(self._task, description=f"{self.label} {build['status']}",
                                  total=1.0, completed=1.0, how_far="")
            return
        phase = build.get("phase") or build.get("status") or ""
        fraction = float(build.get("progress") or 0.0)
        timeout = self._timeout if self.phase else None
        if timeout:
            spent = self.clock() - self._since
            self.bar.update(self._task, description=f"{self.label} {phase}",
                                  total=timeout, completed=min(spent, timeout),
                                  how_far=f"{spent:.0f} s / {timeout:.0f} s")
        elif fraction > 0:
            self.bar.update(self._task, description=f"{self.label} {phase}", total=1.0,
                                  completed=fraction, how_far=f"{100 * fraction:.0f}%")
        else:  # nothing to measure: a pulsing bar and the spinner
            self.bar.update(self._task, description=f"{self.label} {phase}",
                                  total=None, how_far="")

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text, markup=False, highlight=False)
            return
        stream = self.stream or sys.stderr
        stream.write(text + "\n")
        stream.flush()
