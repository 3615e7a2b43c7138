"""Local filesystem backend.

Objects live at `root/<key>`; keys use `/` to fan out directories. A put writes
a temporary file in the same directory and renames it into place, so a reader
or a crash never sees half an object; `sync=True` fsyncs file and directory.
Pack files are written in ranges through `open_writer` (see `fs_ranges`) and
made durable by their writer's `commit`: fdatasync of the pack plus fsync of
the directories a new pack's name lives in — no filesystem-wide barrier.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from rain.store.backend import ObjectInfo
from rain.store.backends.fs_ranges import (
    DIRECT_ALIGN,
    FdCache,
    FileRangeWriter,
    fsync_dir,
    start_writeback,
)

_libc = ctypes.CDLL(None, use_errno=True)


def _write_all(fd: int, data: bytes | memoryview | Sequence[bytes | memoryview]) -> None:
    """writev without copying, looping over short writes."""
    parts = [memoryview(data)] if isinstance(data, bytes | memoryview) else [
        memoryview(p) for p in data]
    remaining = sum(len(p) for p in parts)
    while remaining:
        written = os.writev(fd, parts)
        remaining -= written
        while parts and written >= len(parts[0]):
            written -= len(parts[0])
            parts.pop(0)
        if parts and written:
            parts[0] = parts[0][written:]


def _aligned(view: memoryview) -> bool:
    """O_DIRECT needs the buffer address and length aligned to the block size."""
    if view.readonly or len(view) % DIRECT_ALIGN:
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % DIRECT_ALIGN == 0


class FilesystemBackend:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._root = str(self.root)
        self._tmp_seq = itertools.count()
        self._dirs: set[str] = set()
        self._durable_dirs: set[str] = set()
        self._direct_ok = True
        self._readers = FdCache()

    def _path(self, key: str) -> Path:
        return Path(self._str(key))

    def _str(self, key: str) -> str:
        if key.startswith("/") or ".." in key:
            raise ValueError(f"bad object key {key!r}")
        return f"{self._root}/{key}"

    def _ensure_dir(self, directory: str) -> None:
        if directory not in self._dirs:
            os.makedirs(directory, exist_ok=True)
            self._dirs.add(directory)

    def put(self, key: str, data: bytes | memoryview | Sequence[bytes | memoryview], *,
            sync: bool = False, direct: bool = False) -> None:
        path = self._str(key)
        directory = path.rsplit("/", 1)[0]
        self._ensure_dir(directory)
        tmp = f"{directory}/.{os.getpid()}.{threading.get_ident()}.{next(self._tmp_seq)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        direct = direct and self._direct_ok and isinstance(data, memoryview) and _aligned(data)
        try:
            fd = os.open(tmp, flags | (os.O_DIRECT if direct else 0), 0o644)
        except OSError:
            if not direct:
                raise
            self._direct_ok = False  # e.g. tmpfs: no O_DIRECT here
            direct = False
            fd = os.open(tmp, flags, 0o644)
        try:
            _write_all(fd, data)
            if sync:
                os.fsync(fd)
            elif not direct:
                start_writeback(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, path)
        if sync:
            dfd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def open_writer(self, key: str, *, direct: bool = False, sync_each: bool = False
                    ) -> FileRangeWriter:
        path = self._str(key)
        self._ensure_dir(path.rsplit("/", 1)[0])
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        direct = direct and self._direct_ok
        try:
            fd = os.open(path, flags | (os.O_DIRECT if direct else 0), 0o644)
        except OSError:
            if not direct:
                raise
            self._direct_ok = False  # e.g. tmpfs: no O_DIRECT here
            direct = False
            fd = os.open(path, flags, 0o644)
        return FileRangeWriter(key, path, fd, direct=direct, sync_each=sync_each,
                               on_commit=self._sync_new_entry,
                               on_direct_refused=self._refuse_direct)

    def _refuse_direct(self) -> None:
        self._direct_ok = False

    def _sync_new_entry(self, path: str) -> None:
        """Make a new file's name durable: its directory, and once per process each
        ancestor up to the root (directories are never removed, so once is enough)."""
        directory = path.rsplit("/", 1)[0]
        fsync_dir(directory)
        while directory != self._root and directory not in self._durable_dirs:
            parent = directory.rsplit("/", 1)[0]
            fsync_dir(parent)
            self._durable_dirs.add(directory)
            directory = parent

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        try:
            return self._readers.pread(self._str(key), length, offset)
        except FileNotFoundError:
            raise KeyError(key) from None

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def close(self) -> None:
        """Close cached read fds."""
        self._readers.close()

    def get(self, key: str) -> bytes:
        try:
            with open(self._str(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise KeyError(key) from None

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            st = os.stat(self._str(key))
        except FileNotFoundError:
            return None
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def touch(self, key: str) -> bool:
        try:
            os.utime(self._str(key))
        except FileNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        path = self._str(key)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._readers.forget(path)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if not base.exists():
            return
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                full = os.path.join(dirpath, name)
                try:
                    st = os.stat(full)
                except FileNotFoundError:
                    continue
                key = os.path.relpath(full, self.root)
                yield ObjectInfo(key, st.st_size, st.st_mtime)

    def sync(self) -> None:
        fd = os.open(self.root, os.O_RDONLY)
        try:
            if _libc.syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        finally:
            os.close(fd)

    def remove_stale_temporaries(self, older_than: float) -> int:
        """Delete temp files left by crashed writers (gc calls this)."""
        removed = 0
        for info in self.list(""):
            name = info.key.rsplit("/", 1)[-1]
            if name.startswith(".") and name.endswith(".tmp") and info.mtime < older_than:
                self.delete(info.key)
                removed += 1
        return removed
