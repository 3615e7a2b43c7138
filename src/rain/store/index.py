"""The chunk index: digest → where the chunk's bytes live in which pack.

One SQLite file (WAL) under the store root, private to the store (not the
catalog). Each thread gets its own connection: readers never wait for each
other, and a pull's pool threads look chunks up in parallel. Writes are few
and batched — one transaction per committed upload, one per block of dedup
hits — so SQLite's single writer is no bottleneck.

Durability: commits run with `synchronous=FULL` (the WAL is fsynced), so once
`commit_pack` returns its rows survive a crash and a manifest written after
them never points at an unknown chunk. Touch updates run with NORMAL: losing
the last few of them in a power cut only makes gc's grace period shorter for
chunks whose upload died with the machine anyway.

Concurrency with gc (possibly another process) is settled inside write
transactions, which SQLite serialises: a dedup hit is only a hit if its
`touched` update found the row (`RETURNING`), gc deletes a row only if it is
still untouched since the cutoff, and a pack with no rows is deleted by gc
and committed by its writer only under the write lock (see `write_lock`).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    digest BLOB PRIMARY KEY,
    pack TEXT NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    stored INTEGER NOT NULL,
    compressed INTEGER NOT NULL,
    touched REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_pack ON chunks (pack);
"""
_BATCH = 500  # parameters per statement stay far below SQLite's limit


@dataclass(frozen=True, slots=True)
class Location:
    """Where one chunk's stored bytes are: `stored` bytes at `offset` of `pack`."""

    pack: str
    offset: int
    length: int  # the chunk's own length
    stored: int  # bytes in the pack (compressed or not)
    compressed: bool


class _ThreadConnection:
    """A thread's connection, closed when the thread ends: the HTTP server runs a thread
    per client connection, and connections kept past their thread would pile up,
    each with its page cache and file handles."""

    __slots__ = ("__weakref__", "db")

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db


def _close_here(pid: int, db: sqlite3.Connection) -> None:
    # Not in a forked child: `fork` + `preexec_fn` (rain.formats.tool) drops the other
    # threads' states there, and closing could wait forever on a SQLite mutex some
    # parent thread held at fork time.
    if os.getpid() == pid:
        db.close()


def _close_all(closers: list[weakref.finalize]) -> None:
    for close in closers:
        close()
    closers.clear()


class ChunkIndex:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._all: list[weakref.finalize] = []  # one per connection: closes it
        self._guard = threading.Lock()
        # Closing the last connection checkpoints the WAL into the database and
        # removes it: at exit too, so a stopped server leaves one compact file.
        weakref.finalize(self, _close_all, self._all)
        with self.write_lock() as db:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    def _db(self) -> sqlite3.Connection:
        held: _ThreadConnection | None = getattr(self._local, "held", None)
        if held is None:
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA journal_size_limit=8388608")  # WAL shrinks back after bursts
            held = self._local.held = _ThreadConnection(db)
            with self._guard:
                self._all[:] = [c for c in self._all if c.alive]
                self._all.append(weakref.finalize(held, _close_here, os.getpid(), db))
        return held.db

    def close(self) -> None:
        with self._guard:
            _close_all(self._all)
        self._local = threading.local()

    @contextmanager
    def write_lock(self, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: holds SQLite's write lock throughout)."""
        db = self._db()
        if durable:
            db.execute("PRAGMA synchronous=FULL")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            if durable:
                db.execute("PRAGMA synchronous=NORMAL")

    # -- reads ---------------------------------------------------------------
    def lookup(self, digest: bytes) -> Location | None:
        row = self._db().execute(
            "SELECT pack, offset, length, stored, compressed FROM chunks WHERE digest = ?",
            (digest,)).fetchone()
        return None if row is None else Location(row[0], row[1], row[2], row[3], bool(row[4]))

    def present(self, digests: Sequence[bytes]) -> set[bytes]:
        """Which of `digests` have a row (no lock, no refresh: see `refresh`)."""
        found: set[bytes] = set()
        db = self._db()
        for i in range(0, len(digests), _BATCH):
            part = digests[i : i + _BATCH]
            marks = ",".join("?" * len(part))
            found.update(r[0] for r in db.execute(
                f"SELECT digest FROM chunks WHERE digest IN ({marks})", part))
        return found

    def rows(self) -> Iterator[tuple[bytes, Location, float]]:
        for d, pack, off, length, stored, comp, touched in self._db().execute(
                "SELECT digest, pack, offset, length, stored, compressed, touched FROM chunks"):
            yield d, Location(pack, off, length, stored, bool(comp)), touched

    def rows_in_pack(self, pack: str) -> list[tuple[bytes, Location]]:
        return [(d, Location(pack, off, length, stored, bool(comp)))
                for d, off, length, stored, comp in self._db().execute(
                    "SELECT digest, offset, length, stored, compressed FROM chunks "
                    "WHERE pack = ? ORDER BY offset", (pack,))]

    def pack_usage(self) -> dict[str, tuple[int, int]]:
        """pack → (rows, stored bytes) for every pack that has rows."""
        return {p: (n, b) for p, n, b in self._db().execute(
            "SELECT pack, COUNT(*), SUM(stored) FROM chunks GROUP BY pack")}

    @staticmethod
    def pack_rows(db: sqlite3.Connection, pack: str) -> int:
        """Rows in `pack`, inside the caller's transaction."""
        return int(db.execute("SELECT COUNT(*) FROM chunks WHERE pack = ?",
                              (pack,)).fetchone()[0])

    # -- writes --------------------------------------------------------------
    def refresh(self, digests: Sequence[bytes], now: float | None = None) -> set[bytes]:
        """Set `touched` on the rows of `digests` and return those that exist.

        Atomic against gc's delete: a digest returned here was refreshed before
        gc could judge it, so it stays for a whole grace period from now.
        """
        now = time.time() if now is None else now
        found: set[bytes] = set()
        with self.write_lock() as db:
            for i in range(0, len(digests), _BATCH):
                part = digests[i : i + _BATCH]
                marks = ",".join("?" * len(part))
                found.update(r[0] for r in db.execute(
                    f"UPDATE chunks SET touched = ? WHERE digest IN ({marks}) RETURNING digest",
                    (now, *part)))
        return found

    @staticmethod
    def insert(db: sqlite3.Connection, rows: Iterable[tuple[bytes, Location]],
               now: float) -> None:
        """Add rows inside the caller's transaction.

        A digest another upload committed first keeps its location (the copy in
        this pack becomes dead space for repack) but is touched: this upload's
        manifest is about to reference it.
        """
        db.executemany(
            "INSERT INTO chunks (digest, pack, offset, length, stored, compressed, touched) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (digest) DO UPDATE SET touched = excluded.touched",
            ((d, loc.pack, loc.offset, loc.length, loc.stored, int(loc.compressed), now)
             for d, loc in rows))

    def move(self, old_pack: str, rows: Sequence[tuple[bytes, Location]]) -> int:
        """Point rows still in `old_pack` at their copies (repack); returns rows moved."""
        moved = 0
        with self.write_lock(durable=True) as db:
            for d, loc in rows:
                moved += db.execute(
                    "UPDATE chunks SET pack = ?, offset = ? WHERE digest = ? AND pack = ?",
                    (loc.pack, loc.offset, d, old_pack)).rowcount
        return moved

    def delete_untouched(self, digests: Sequence[bytes], cutoff: float) -> int:
        """Delete rows of `digests` not touched since `cutoff`; returns rows deleted."""
        deleted = 0
        for i in range(0, len(digests), _BATCH):  # short transactions: uploads keep going
            part = digests[i : i + _BATCH]
            marks = ",".join("?" * len(part))
            with self.write_lock() as db:
                deleted += db.execute(
                    f"DELETE FROM chunks WHERE touched < ? AND digest IN ({marks})",
                    (cutoff, *part)).rowcount
        return deleted

    def delete(self, digest: bytes) -> None:
        with self.write_lock() as db:
            db.execute("DELETE FROM chunks WHERE digest = ?", (digest,))
