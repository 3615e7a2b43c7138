"""What the store's streams hold and how they stop: shared buffer budget, read-ahead shared by
readers, stopping a writer mid-hash, index connections of finished threads."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from rain.store import ChunkStore, FilesystemBackend, ImageWriter, StoreConfig
from rain.store.index import ChunkIndex
from rain.store.stream import BLOCKS, BlockPool, ReadAhead, WriterStopped

CS = 64 * 1024
LIVENESS = 60.0  # a bound on "eventually", not a speed claim


def make_store(tmp_path: Path) -> ChunkStore:
    return ChunkStore(FilesystemBackend(tmp_path / "store"), StoreConfig(chunk_size=CS))


def test_blocks_shrink_as_writers_share_the_budget() -> None:
    pool = BlockPool(budget=6 * 16 * CS, keep=0)  # one writer of 6 full blocks
    sizes = []
    for _ in range(64):
        pool.join()
        sizes.append(pool.block_size(CS, 16, 6))
    assert sizes[0] == 16 * CS  # alone: full blocks, as a single stream always had
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] == CS  # never below a chunk
    for n, size in enumerate(sizes, 1):  # n writers × 6 blocks stay within the budget
        assert n * 6 * size <= max(pool.budget, n * 6 * CS)


def test_many_concurrent_writers_stay_within_the_budget(tmp_path: Path) -> None:
    # BLOCKS is the process's pool: count from what other tests may have left in it.
    writers0, in_use0 = BLOCKS.writers, BLOCKS.in_use
    store = make_store(tmp_path)
    writers = [ImageWriter(store, blocks=6, block_chunks=16) for _ in range(40)]
    data = os.urandom(CS * 40)
    peak = 0
    for _ in range(3):
        for w in writers:
            w.write(data)
            peak = max(peak, BLOCKS.in_use - in_use0)
    for w in writers:
        w.finish()
    assert peak <= max(BLOCKS.budget, 40 * 6 * CS) + 40 * 16 * CS  # + one old block each
    assert BLOCKS.in_use == in_use0 and BLOCKS.writers == writers0
    assert BLOCKS.idle_bytes() <= BLOCKS.keep
    BLOCKS.release_idle()
    assert BLOCKS.idle_bytes() == 0


def test_read_ahead_is_shared_by_concurrent_readers() -> None:
    ra = ReadAhead(budget=16 * CS)
    managers = [ra.reading(CS, 8) for _ in range(10)]
    depths = [m.__enter__() for m in managers]
    assert depths[:2] == [8, 8]  # a reader or two: the full depth, as before
    assert depths == sorted(depths, reverse=True) and depths[-1] == 2  # never below 2
    for m in managers:
        m.__exit__(None, None, None)
    assert ra.readers == 0


def test_stop_breaks_off_hashing_a_terabyte_of_declared_zeros(tmp_path: Path) -> None:
    """Declared zeros are hashed for minutes; `stop` from another thread ends it at once."""
    store = make_store(tmp_path)
    writers0 = BLOCKS.writers
    w = ImageWriter(store)
    w.write(os.urandom(CS))
    w.write_zeros(1024**4)
    outcome: list[BaseException] = []

    def finish() -> None:
        try:
            w.finish()
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=finish, daemon=True)
    t.start()
    threading.Timer(0.3, w.stop).start()
    t.join(LIVENESS)
    assert not t.is_alive(), "finish() kept hashing after stop()"
    assert len(outcome) == 1 and isinstance(outcome[0], WriterStopped)
    assert not list((tmp_path / "store" / "packs").rglob("*.pack"))  # nothing left behind
    assert BLOCKS.writers == writers0


def test_interrupt_is_called_while_waiting_and_ends_the_upload(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    writers0 = BLOCKS.writers
    calls = []

    def interrupt() -> None:
        calls.append(1)
        if len(calls) >= 2:
            raise EOFError("client gone")

    w = ImageWriter(store, interrupt=interrupt)
    w.write_zeros(1024**4)
    with pytest.raises(EOFError, match="client gone"):
        w.finish()
    assert len(calls) == 2 and BLOCKS.writers == writers0


def test_index_connections_of_finished_threads_are_closed(tmp_path: Path) -> None:
    """The HTTP server runs a thread per client connection: their SQLite connections must
    not pile up (each kept a page cache and file handles)."""
    index = ChunkIndex(tmp_path / "index.sqlite")
    for _ in range(50):
        t = threading.Thread(target=index.lookup, args=(b"\0" * 32,))
        t.start()
        t.join()
    alive = [c for c in index._all if c.alive]
    assert len(alive) <= 2  # this thread's (schema) and at most one not yet collected
    index.close()
