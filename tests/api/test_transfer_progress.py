"""What `rain push` / `rain pull` bars are fed, against a real `rain serve`: bytes as they
go (not one jump at the end of a run of data), and the steps that only wait named."""

from __future__ import annotations

import random
from pathlib import Path

from rain.client import Client
from rain.client.transfer import CONVERTING, RECEIVING, SCANNING, SENDING, STORING
from tests.conftest import Server

MiB = 1 << 20


class Recorder:
    """Stands where the CLI's bar does: every phase, and the bytes counted in each."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, int | None]] = []
        self.counts: list[list[int]] = []

    def __call__(self, n: int) -> None:
        self.counts[-1].append(n)

    def phase(self, what: str, total: int | None) -> None:
        self.steps.append((what, total))
        self.counts.append([])


def test_push_counts_bytes_as_they_go_and_names_the_waits(server: Server,
                                                         tmp_path: Path) -> None:
    # One run of data with no zero segment: a sparse push sends it as one range, which
    # the bar used to count only once it had all gone.
    path = tmp_path / "dense.raw"
    path.write_bytes(random.Random(3).randbytes(48 * MiB))
    seen = Recorder()
    with Client(server.url, server.token) as c:
        c.push(path, name="dense", disk_format="raw", progress=seen, phase=seen.phase)
    size = path.stat().st_size
    assert seen.steps == [(SCANNING, size), (SENDING, size), (STORING, None)]
    scanning, sending, storing = seen.counts
    assert sum(scanning) == size and len(scanning) > 2
    assert sum(sending) == size and len(sending) >= 4 and max(sending) <= 8 * MiB
    assert storing == []


def test_a_converting_pull_says_so_then_counts_to_a_known_total(server: Server,
                                                               tmp_path: Path) -> None:
    path = tmp_path / "small.raw"
    data = bytearray(8 * MiB)
    data[MiB : 2 * MiB] = random.Random(4).randbytes(MiB)
    path.write_bytes(bytes(data))
    seen = Recorder()
    with Client(server.url, server.token) as c:
        image = c.push(path, name="to-convert", disk_format="raw")
        got = c.pull(image["id"], tmp_path / "out.qcow2", format="qcow2", progress=seen,
                     phase=seen.phase)
        plain = Recorder()
        c.pull(image["id"], tmp_path / "out.raw", progress=plain, phase=plain.phase)
    (first, _), (second, total) = seen.steps
    assert (first, second) == (CONVERTING, RECEIVING)
    assert total == got["size"] and sum(seen.counts[1]) == got["size"]
    assert [s for s, _ in plain.steps] == ["waiting for the server", RECEIVING]
    assert plain.steps[1][1] == len(data) and sum(plain.counts[1]) == len(data)
