"""The bar of `rain push` and `rain pull`: bytes when bytes move, a spinner when they wait.

A transfer has steps that count bytes (scanning the file for zeros, sending,
receiving) and steps that only wait for the server (checking and storing an
upload, converting an image before it sends the first byte). The client says
which (`rain.client.transfer`'s `phase`); each starts the bar afresh, and a
waiting step shows its name, a spinner and the time it has taken instead of
`0/? bytes`.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text


class _Switch(ProgressColumn):
    """One column while the step counts bytes towards a known total, another (or
    nothing) while it waits."""

    def __init__(self, counting: ProgressColumn | None,
                 waiting: ProgressColumn | None = None) -> None:
        super().__init__()
        self.counting = counting
        self.waiting = waiting

    def render(self, task: Task) -> Any:
        column = self.counting if task.total is not None else self.waiting
        return column.render(task) if column is not None else Text("")


class TransferBar:
    def __init__(self, label: str, total: int | None, console: Console) -> None:
        self.label = label
        self.progress = Progress(
            _Switch(None, SpinnerColumn()), "[progress.description]{task.description}",
            BarColumn(), _Switch(DownloadColumn()), _Switch(TransferSpeedColumn()),
            _Switch(TimeRemainingColumn(), TimeElapsedColumn()),
            console=console, transient=True)
        self.task = self.progress.add_task(label, total=total)

    def __enter__(self) -> TransferBar:
        self.progress.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.progress.stop()

    def __call__(self, n: int) -> None:
        self.progress.advance(self.task, n)

    def phase(self, what: str, total: int | None) -> None:
        """A new step: `what` it is, and the bytes it will count (None: it waits)."""
        self.progress.reset(self.task, total=total, completed=0,
                            description=f"{self.label}: {what}")
