"""The push/pull bar on a (fake) terminal: bytes while they move, the step's name, a
spinner and the time while the server works."""

from __future__ import annotations

import io

from rich.console import Console

from rain.cli.transferbar import TransferBar
from rain.client.transfer import CONVERTING, RECEIVING

MiB = 1 << 20


def screen_after(bar: TransferBar, out: io.StringIO) -> str:
    bar.progress.refresh()
    return out.getvalue().rsplit("\r", 1)[-1]


def test_waiting_shows_the_step_not_zero_of_unknown_bytes() -> None:
    out = io.StringIO()
    with TransferBar("pull web", None, Console(file=out, force_terminal=True, width=120)) as bar:
        bar.phase(CONVERTING, None)
        waiting = screen_after(bar, out)
        bar.phase(RECEIVING, 64 * MiB)
        bar(16 * MiB)
        moving = screen_after(bar, out)
    assert "pull web: converting on the server" in waiting
    assert "?" not in waiting and "bytes" not in waiting and "0:00:0" in waiting
    assert "pull web: receiving" in moving and "16.8/67.1 MB" in moving
