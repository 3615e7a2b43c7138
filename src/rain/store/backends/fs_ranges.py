"""Ranged I/O on local files: the pack writer handle and a cache of open read fds.

A pack is written in place (no temporary name): nobody reads it before the
chunk index points into it, and that happens only after `commit` made it
durable. Several pool threads write disjoint ranges of one pack at once with
`pwritev`; with O_DIRECT the caller keeps offsets, lengths and buffer
addresses 4096-aligned (`align`), and a filesystem that accepts O_DIRECT at
open but refuses a write (EINVAL) gets the rest through a buffered fd.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DIRECT_ALIGN = 4096
_IOV_MAX = 512  # well under Linux's 1024
_SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def start_writeback(fd: int, offset: int = 0, length: int = 0) -> None:
    """Ask the kernel to start writing a range out now, without waiting.

    Batched durability ends in one fsync/fdatasync; starting writeback as data
    is written spreads the disk work over the upload instead of leaving all of
    it for the commit.
    """
    _libc.sync_file_range(fd, ctypes.c_longlong(offset), ctypes.c_longlong(length),
                          ctypes.c_uint(_SYNC_FILE_RANGE_WRITE))


def pwrite_all(fd: int, parts: Sequence[bytes | memoryview], offset: int) -> None:
    """pwritev without copying, looping over short writes and IOV_MAX."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        batch = views[:_IOV_MAX]
        written = os.pwritev(fd, batch, offset)
        if written <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += written
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileRangeWriter:
    """A new file written at chosen offsets (see `rain.store.backend.RangeWriter`)."""

    def __init__(self, key: str, path: str, fd: int, *, direct: bool, sync_each: bool,
                 on_commit: Callable[[str], None], on_direct_refused: Callable[[], None]
                 ) -> None:
        self.key = key
        self.align = DIRECT_ALIGN if direct else 1
        self._path = path
        self._fd = fd
        self._direct = direct
        self._buffered_fd: int | None = None
        self._sync_each = sync_each
        self._on_commit = on_commit
        self._on_direct_refused = on_direct_refused
        self._lock = threading.Lock()
        self._closed = False
        self._last_touch = time.monotonic()

    def _buffered(self) -> int:
        with self._lock:
            if self._buffered_fd is None:
                self._buffered_fd = os.open(self._path, os.O_WRONLY)
                self.align = 1
                self._on_direct_refused()
            return self._buffered_fd

    def write_at(self, offset: int, parts: Sequence[bytes | memoryview]) -> None:
        fd = self._fd if self._buffered_fd is None else self._buffered_fd
        direct = fd == self._fd and self._direct
        try:
            pwrite_all(fd, parts, offset)
        except OSError as exc:
            if not (direct and exc.errno == errno.EINVAL):
                raise
            fd, direct = self._buffered(), False
            pwrite_all(fd, parts, offset)
        self._last_touch = time.monotonic()
        if self._sync_each:
            os.fdatasync(fd)
        elif not direct:
            start_writeback(fd, offset, sum(len(p) for p in parts))

    def keepalive(self) -> None:
        if time.monotonic() - self._last_touch > 60:
            os.utime(self._fd)
            self._last_touch = time.monotonic()

    def commit(self) -> None:
        os.fdatasync(self._fd)  # covers data written through either fd: same inode
        self._on_commit(self._path)

    def alive(self) -> bool:
        return os.fstat(self._fd).st_nlink > 0

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)
            if self._buffered_fd is not None:
                os.close(self._buffered_fd)

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)


@dataclass
class _Entry:
    fd: int
    refs: int = 0
    evicted: bool = False


class FdCache:
    """A small LRU of read-only fds, so reading a pack chunk by chunk does not reopen it.

    Entries are reference-counted: an fd is closed only once no thread is in a
    `pread` on it (closing it under a reader could hand its number to another
    file). A cached fd of a pack that was deleted meanwhile (gc repacked it,
    maybe in another process) is noticed by its link count — when it is used,
    and by a sweep of all entries every few seconds of reading — and dropped,
    so the space is released and the caller sees the pack as gone.
    """

    def __init__(self, size: int = 32, sweep_seconds: float = 5.0) -> None:
        self.size = size
        self.sweep_seconds = sweep_seconds
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._swept = time.monotonic()

    def _sweep(self) -> None:
        """Drop fds of deleted files (caller holds the lock)."""
        self._swept = time.monotonic()
        for path, entry in list(self._entries.items()):
            if os.fstat(entry.fd).st_nlink == 0:
                del self._entries[path]
                self._drop(entry)

    def _acquire(self, path: str) -> _Entry:
        with self._lock:
            if time.monotonic() - self._swept > self.sweep_seconds:
                self._sweep()
            entry = self._entries.get(path)
            if entry is not None:
                entry.refs += 1
                self._entries.move_to_end(path)
                return entry
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # FileNotFoundError: caller's business
        with self._lock:
            entry = self._entries.get(path)
            if entry is not None:  # another thread opened it meanwhile
                os.close(fd)
            else:
                entry = self._entries[path] = _Entry(fd)
                self._evict()
            entry.refs += 1
            return entry

    def _release(self, entry: _Entry) -> None:
        with self._lock:
            entry.refs -= 1
            if entry.evicted and entry.refs == 0:
                os.close(entry.fd)

    def _evict(self) -> None:
        while len(self._entries) > self.size:
            _, old = self._entries.popitem(last=False)
            self._drop(old)

    def _drop(self, entry: _Entry) -> None:
        entry.evicted = True
        if entry.refs == 0:
            os.close(entry.fd)

    def forget(self, path: str) -> None:
        with self._lock:
            entry = self._entries.pop(path, None)
            if entry is not None:
                self._drop(entry)

    def pread(self, path: str, length: int, offset: int) -> bytes:
        """Raises FileNotFoundError when the file is gone (even if an fd was cached)."""
        for _ in range(2):
            entry = self._acquire(path)
            try:
                if os.fstat(entry.fd).st_nlink > 0:
                    return os.pread(entry.fd, length, offset)
            finally:
                self._release(entry)
            with self._lock:  # deleted behind our back: drop it and look again
                if self._entries.get(path) is entry:
                    del self._entries[path]
                    self._drop(entry)
        raise FileNotFoundError(errno.ENOENT, "deleted while open", path)

    def close(self) -> None:
        with self._lock:
            while self._entries:
                self._drop(self._entries.popitem()[1])
