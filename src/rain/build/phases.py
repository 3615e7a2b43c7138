"""Progress lines and phase timings for builds.

Build primitives (`Chroot`, the distro installers, `make_disk`, `boot_test`)
take an optional `log: LogFn` that receives one line per tool run and the
tools' output; the orchestration streams those lines into the build log.
`PhaseTimer` measures named phases (bootstrap, packages, disk, boot test, ...)
so a build can report where its time went, and so the targets ("a cached build
in 45 s") can be checked against real builds.
"""

from __future__ import annotations

import contextlib
import shlex
import time
from collections.abc import Callable, Iterator, Sequence

LogFn = Callable[[str], None]


def log_command(log: LogFn | None, argv: Sequence[str]) -> None:
    """Report a command about to run, as a shell-quoted line (for people, never executed)."""
    if log is not None:
        log("$ " + shlex.join(str(a) for a in argv))


def log_output(log: LogFn | None, text: str | bytes) -> None:
    """Report a tool's output, one call per non-empty line."""
    if log is None:
        return
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    for line in text.splitlines():
        line = line.rstrip()
        if line:
            log(line)


class PhaseTimer:
    """Seconds spent per named phase; a phase entered twice accumulates.

    >>> timer = PhaseTimer()
    >>> with timer.phase("bootstrap"):
    ...     pass
    >>> sorted(timer.seconds)
    ['bootstrap']
    """

    def __init__(self, log: LogFn | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self._log = log

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase `name` (recorded also when the block raises)."""
        if self._log is not None:
            self._log(f"== {name}")
        started = time.monotonic()
        try:
            yield
        finally:
            elapsed = time.monotonic() - started
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            if self._log is not None:
                self._log(f"== {name}: {elapsed:.1f} s")

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def summary(self) -> str:
        """One line such as ``bootstrap 54.2 s, packages 31.0 s (total 85.2 s)``."""
        parts = [f"{name} {secs:.1f} s" for name, secs in self.seconds.items()]
        return f"{', '.join(parts)} (total {self.total:.1f} s)"
