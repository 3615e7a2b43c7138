"""Pack files: the new chunks of one upload appended to one object.

Why: a chunk per file made a first push create ~2200 files for a 2 GiB image,
and ext4 inode allocation became a quarter of the server's CPU (worse after
gc had deleted many files); reads hopped across as many small files. A pack
per upload costs one file create, one fdatasync and one index transaction.

Layout: a pack is a plain concatenation of stored chunk bytes (raw or zstd);
everything about them — digest, offset, lengths, compression — is in the
chunk index. Pool threads each reserve a region at the end under a lock and
write it with `pwritev`, concurrently. With O_DIRECT a region starts and ends
on a 4096 boundary: chunks that sit page-aligned in the writer's block buffer
go out straight from it; the rest of the region (compressed chunks, a short
last chunk, bytes from elsewhere) is packed tightly into a per-thread aligned
bounce buffer and zero-padded to the boundary.

Commit protocol (`commit`): fdatasync the pack (and fsync its directory
entry), then insert its rows in one durable index transaction; the caller
writes the manifest only after that. A crash before the index commit leaves a
pack no row points at, which gc deletes after the grace period; `abort`
deletes it at once.
"""

from __future__ import annotations

import ctypes
import mmap
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from rain.model.errors import StoreCorruption
from rain.store.backend import Backend, RangeWriter
from rain.store.index import ChunkIndex, Location

PACK_PREFIX = "packs/"
PACK_SUFFIX = ".pack"


def new_pack_id() -> str:
    return secrets.token_hex(16)


def pack_key(pack_id: str) -> str:
    """256 directories, like loose chunks had: a pack per upload, so few files in each."""
    return f"{PACK_PREFIX}{pack_id[:2]}/{pack_id}{PACK_SUFFIX}"


def pack_id_of(key: str) -> str | None:
    name = key.rsplit("/", 1)[-1]
    if name.startswith(".") or not name.endswith(PACK_SUFFIX):
        return None
    return name.removesuffix(PACK_SUFFIX)


@dataclass(frozen=True, slots=True)
class Piece:
    """One chunk to append: `data` is what goes into the pack."""

    digest: bytes
    data: bytes | memoryview
    length: int  # the chunk's own length (differs from len(data) when compressed)
    compressed: bool


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def _address_aligned(data: bytes | memoryview, align: int) -> bool:
    if len(data) % align:
        return False
    view = memoryview(data)
    if view.readonly:  # bytes objects: no fixed alignment, go through the bounce buffer
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % align == 0


_bounce = threading.local()


def _bounce_buffer(size: int) -> mmap.mmap:
    """A page-aligned scratch buffer per thread, reused: fresh memory is expensive here."""
    buf: mmap.mmap | None = getattr(_bounce, "buf", None)
    if buf is None or len(buf) < size:
        if buf is not None:
            buf.close()
        buf = _bounce.buf = mmap.mmap(-1, _round_up(size, 1024 * 1024))
    return buf


class PackWriter:
    """The pack of one upload; thread-safe, written by the upload's pool threads."""

    def __init__(self, backend: Backend, index: ChunkIndex, *, direct: bool = True,
                 sync_each: bool = False) -> None:
        self.backend = backend
        self.index = index
        self.pack_id = new_pack_id()
        self.key = pack_key(self.pack_id)
        self._direct = direct
        self._sync_each = sync_each
        self._handle: RangeWriter | None = None
        self._lock = threading.Lock()
        self._end = 0
        # digest → its location here; None while claimed but not yet written
        self._pending: dict[bytes, Location | None] = {}
        self._state = "open"

    @property
    def size(self) -> int:
        """Bytes reserved in the pack so far (including alignment padding)."""
        return self._end

    def unseen(self, digests: Sequence[bytes]) -> set[bytes]:
        """The digests not already claimed by this pack (its own dedup, no I/O)."""
        with self._lock:
            return {d for d in digests if d not in self._pending}

    def claim(self, digests: Sequence[bytes]) -> set[bytes]:
        """Reserve `digests` for writing here; returns those this caller must write.

        Another thread of the same upload may have claimed one meanwhile: then
        it is that thread's to write and this caller's is a dedup hit.
        """
        mine: set[bytes] = set()
        with self._lock:
            self._check_open()
            for d in digests:
                if d not in self._pending:
                    self._pending[d] = None
                    mine.add(d)
        return mine

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"pack {self.pack_id} is {self._state}")

    def _open(self) -> RangeWriter:
        with self._lock:
            self._check_open()
            if self._handle is None:
                self._handle = self.backend.open_writer(self.key, direct=self._direct,
                                                        sync_each=self._sync_each)
            return self._handle

    def append(self, pieces: Sequence[Piece]) -> None:
        """Write `pieces` as one region (one pwritev) and record where each landed."""
        if not pieces:
            return
        handle = self._handle or self._open()
        align = handle.align
        direct = [p for p in pieces if align == 1 or _address_aligned(p.data, align)]
        rest = [p for p in pieces if not (align == 1 or _address_aligned(p.data, align))]
        head = sum(len(p.data) for p in direct)
        tail = sum(len(p.data) for p in rest)
        region = head + _round_up(tail, align)
        with self._lock:
            self._check_open()
            start = _round_up(self._end, align)
            self._end = start + region
        parts: list[bytes | memoryview] = [p.data for p in direct]
        placed: list[tuple[Piece, int]] = []
        pos = start
        for p in direct:
            placed.append((p, pos))
            pos += len(p.data)
        if rest:
            padded = _round_up(tail, align)
            if align == 1:
                parts.extend(p.data for p in rest)
            else:
                buf = _bounce_buffer(padded)
                at = 0
                for p in rest:
                    buf[at : at + len(p.data)] = p.data
                    at += len(p.data)
                buf[at:padded] = bytes(padded - at)
                parts.append(memoryview(buf)[:padded])
            for p in rest:
                placed.append((p, pos))
                pos += len(p.data)
        handle.write_at(start, parts)
        with self._lock:
            for p, off in placed:
                self._pending[p.digest] = Location(self.pack_id, off, p.length, len(p.data),
                                                   p.compressed)

    def keepalive(self) -> None:
        """Keep the pack young for gc while the upload runs on dedup hits alone."""
        if self._handle is not None:
            self._handle.keepalive()

    def commit(self) -> None:
        """Pack durable, then its rows in one transaction; the manifest may follow."""
        with self._lock:
            self._check_open()
            self._state = "committing"
            handle = self._handle
            rows = list(self._pending.items())
        if handle is None:  # every chunk was a dedup hit (or there were none)
            self._state = "committed"
            return
        missing = [d.hex() for d, loc in rows if loc is None]
        if missing:
            raise RuntimeError(f"pack {self.pack_id}: chunks claimed but never written: "
                               f"{missing[:3]}")
        handle.commit()
        with self.index.write_lock(durable=True) as db:
            # Under the write lock, against gc removing packs without rows (see gc.py).
            if not handle.alive():
                raise StoreCorruption(
                    f"pack {self.pack_id} was deleted before its upload committed (the "
                    "upload took longer than the gc grace period); push it again")
            ChunkIndex.insert(db, ((d, loc) for d, loc in rows if loc is not None), time.time())
        self._state = "committed"
        handle.close()

    def commit_moved(self, old_pack: str) -> int:
        """Repack: pack durable, then the rows still in `old_pack` point here; returns
        how many moved (rows deleted meanwhile stay deleted, touched times stay)."""
        with self._lock:
            self._check_open()
            self._state = "committing"
            handle = self._handle
            rows = [(d, loc) for d, loc in self._pending.items() if loc is not None]
        if handle is None:
            self._state = "committed"
            return 0
        handle.commit()
        moved = self.index.move(old_pack, rows)
        self._state = "committed"
        handle.close()
        return moved

    def abort(self) -> None:
        """Delete the pack at once, unless it is committed (then its rows may be shared)."""
        with self._lock:
            if self._state == "committed":
                return
            self._state = "aborted"
            handle, self._handle = self._handle, None
        if handle is not None:
            handle.discard()
