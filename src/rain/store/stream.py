"""Streaming an image into and out of the chunk store with bounded memory.

Writing: the caller hands over blocks as they arrive. The whole-image SHA-256
runs in one thread (it must see bytes in order) while chunk hashing and object
writes run in a small pool; hashlib and file I/O release the GIL, so on two
cores the two digests overlap instead of adding up. At most `max_inflight`
chunks are held at once, whatever the image size. New chunks go into one pack
per writer (`rain.store.packs`), committed by `finish`.

Reading: chunks are fetched and verified ahead of the consumer by the same
kind of pool; runs of zero chunks are produced without touching the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import mmap
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

from rain.store.chunks import ChunkStore
from rain.store.manifest import ZERO_DIGEST, ImageManifest

ZERO_BLOCK_MAX = 4 * 1024 * 1024
_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rain-chunk")


class ImageWriter:
    """Cuts a byte stream into chunks, stores them and builds the manifest.

    Incoming bytes are copied once, into one of a few preallocated blocks
    (a multiple of the chunk size); the whole-image hasher and the chunk
    workers then read that block through memoryviews, and the block is reused
    when they are done. No per-chunk allocation, no further copies: in a VM
    every fresh page costs a fault, and allocation churn was the largest cost
    of an upload after hashing (docs/benchmarks.md).
    """

    def __init__(self, store: ChunkStore, *, spool: BinaryIO | None = None,
                 blocks: int = 6, block_chunks: int = 16) -> None:
        self.store = store
        self.chunk_size = store.config.chunk_size
        self._block_size = self.chunk_size * block_chunks
        self._free: deque[mmap.mmap] = deque(BLOCKS.take(self._block_size) for _ in range(blocks))
        self._cur: mmap.mmap | None = None
        self._fill = 0
        self._whole = hashlib.sha256()
        self._spool = spool
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rain-sha")
        # per dispatched block, in order: (block, its hash future, its chunks' future)
        self._inflight: deque[tuple[mmap.mmap | None, Future[None],
                                    list[Future[list[tuple[bytes, int]]]]]] = deque()
        self.size = 0
        self.stored_bytes = 0
        self.chunks: list[bytes] = []
        self._closed = False
        self._pack = store.open_pack()

    def _store_chunks(self, data: memoryview) -> list[tuple[bytes, int]]:
        """One task per block, not per chunk: the pool's overhead per task is not free,
        and a block's new chunks go into the pack as one write, its dedup hits are
        refreshed in one index transaction."""
        out: list[tuple[bytes, int]] = []
        items: list[tuple[bytes, memoryview]] = []
        cs = self.chunk_size
        for off in range(0, len(data), cs):
            chunk = data[off : off + cs]
            if is_zero(chunk):
                out.append((ZERO_DIGEST, 0))
                continue
            digest = hashlib.sha256(chunk).digest()
            out.append((digest, 0))
            items.append((digest, chunk))
        if items:
            added = iter(self.store.store_chunks(self._pack, items))
            out = [(d, 0 if d == ZERO_DIGEST else next(added)) for d, _ in out]
        return out

    def _hash_block(self, data: memoryview) -> None:
        self._whole.update(data)
        if self._spool is not None:
            self._spool.write(data)

    def _reap(self) -> None:
        while self._inflight:
            block, hfut, cfuts = self._inflight[0]
            if not (hfut.done() and all(f.done() for f in cfuts)):
                return
            self._inflight.popleft()
            hfut.result()
            for f in cfuts:
                for digest, added in f.result():
                    self.chunks.append(digest)
                    self.stored_bytes += added
            if block is not None:
                self._free.append(block)

    def _dispatch(self) -> None:
        assert self._cur is not None
        block, n = self._cur, self._fill
        view = memoryview(block)[:n]
        hfut = self._hasher.submit(self._hash_block, view)
        cfuts = [_POOL.submit(self._store_chunks, view)]
        self._inflight.append((block, hfut, cfuts))
        self._cur, self._fill = None, 0

    def buffer(self) -> memoryview:
        """Free space in the current block, for the caller to fill and `commit`.

        Blocks (waiting for the workers) only when every buffer is in use.
        """
        if self._cur is None:
            self._reap()
            while not self._free:
                _, hfut, cfuts = self._inflight[0]
                hfut.result()
                for f in cfuts:
                    f.result()
                self._reap()
            self._cur = self._free.popleft()
        return memoryview(self._cur)[self._fill :]

    def commit(self, n: int) -> None:
        """`n` bytes of the last `buffer()` are filled."""
        self._fill += n
        self.size += n
        if self._fill == self._block_size:
            self._dispatch()

    def write(self, data: bytes | memoryview) -> None:
        """Accept the next bytes of the image (one copy, into a block)."""
        view = memoryview(data)
        while view:
            space = self.buffer()
            take = min(len(view), len(space))
            space[:take] = view[:take]
            view = view[take:]
            self.commit(take)

    def write_zeros(self, n: int) -> None:
        """Accept `n` zero bytes known to be zero (a hole of a sparse upload).

        Whole zero chunks never touch a buffer: the whole-image hasher reads
        them from a static zero page and they go straight into the manifest as
        ZERO_DIGEST. Only the part that shares a chunk with data is copied.
        """
        cs = self.chunk_size
        while n > 0:
            at = self._fill % cs
            if at or n < cs:  # finish (or start) a chunk that holds data too
                take = min(n, cs - at)
                space = self.buffer()
                _memset(ctypes.addressof(ctypes.c_char.from_buffer(space)), 0, take)
                self.commit(take)
                n -= take
                continue
            if self._cur is not None and self._fill:
                self._dispatch()  # chunk-aligned: the zero run starts a new entry
            k = n // cs
            self._reap()
            done: Future[list[tuple[bytes, int]]] = Future()
            done.set_result([(ZERO_DIGEST, 0)] * k)
            self._inflight.append((None, self._hasher.submit(self._hash_zeros, k * cs), [done]))
            self.size += k * cs
            n -= k * cs

    def _hash_zeros(self, n: int) -> None:
        step = len(_ZEROS)
        while n > 0:
            take = min(step, n)
            self._whole.update(_ZEROS_VIEW[:take])
            if self._spool is not None:
                self._spool.seek(take, 1)  # a hole; finish() fixes the length
            n -= take

    def backpressure(self) -> Future[object] | None:
        """Work to wait for before the next write would block, for async callers."""
        self._reap()
        if self._free or not self._inflight:
            return None
        _, hfut, cfuts = self._inflight[0]
        futures: list[Future[Any]] = [hfut, *cfuts]
        pending = [f for f in futures if not f.done()]
        return pending[0] if pending else None

    def wait(self) -> None:
        """Synchronous callers: block until a buffer is free."""
        while (fut := self.backpressure()) is not None:
            fut.result()

    def drain(self) -> None:
        """Wait until every whole chunk handed over so far is stored."""
        if self._cur is not None and self._fill and self._fill % self.chunk_size == 0:
            self._dispatch()
        for _, hfut, cfuts in list(self._inflight):
            hfut.result()
            for f in cfuts:
                f.result()
        self._reap()

    def finish(self) -> ImageManifest:
        """Flush the last partial block, wait for everything and commit the pack
        (durable, then indexed); the manifest is not yet saved — the caller's
        `put_manifest` must come after this."""
        try:
            if self._cur is not None and self._fill:
                self._dispatch()
            self.drain()
            self._pack.commit()
        except BaseException:
            self.abort()  # nothing of a failed upload stays behind
            raise
        if self._spool is not None:
            self._spool.truncate(self.size)  # a trailing hole was only seeked over
        self._close()
        return ImageManifest(self.chunk_size, self.size, self._whole.hexdigest(), self.chunks)

    def abort(self) -> None:
        """Stop early and delete this upload's pack (unless `finish` committed it:
        then its rows may already be shared, and gc collects them if unreferenced)."""
        for _, hfut, cfuts in self._inflight:
            hfut.cancel()
            for f in cfuts:
                f.cancel()
        self._close()
        self._pack.abort()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._hasher.shutdown(wait=True, cancel_futures=True)
            for _, hfut, cfuts in self._inflight:  # after abort: wait before reusing buffers
                futures: list[Future[Any]] = [hfut, *cfuts]
                for f in futures:
                    with contextlib.suppress(BaseException):
                        f.result()
            for block, _, _ in self._inflight:
                if block is not None:
                    self._free.append(block)
            self._inflight.clear()
            if self._cur is not None:
                self._free.append(self._cur)
                self._cur = None
            while self._free:
                BLOCKS.give(self._free.popleft())


class BlockPool:
    """Upload buffers kept for the life of the process.

    Fresh memory is expensive where page faults are (in VMs, notably): a
    writer takes warm buffers here instead of allocating and zero-filling new
    ones for every upload. At most `keep` idle buffers are retained.
    """

    def __init__(self, keep: int = 24) -> None:
        self._idle: dict[int, list[mmap.mmap]] = {}
        self._lock = threading.Lock()
        self.keep = keep

    def take(self, size: int) -> mmap.mmap:
        """A page-aligned buffer (anonymous mmap), so chunks can go out with O_DIRECT."""
        with self._lock:
            idle = self._idle.get(size)
            if idle:
                return idle.pop()
        return mmap.mmap(-1, size)

    def give(self, block: mmap.mmap) -> None:
        with self._lock:
            idle = self._idle.setdefault(len(block), [])
            if sum(len(v) for v in self._idle.values()) < self.keep:
                idle.append(block)


BLOCKS = BlockPool()


def is_zero(data: memoryview | bytes) -> bool:
    """True when every byte is zero: memcmp against zeros, without the GIL."""
    n = len(data)
    view = memoryview(data)
    if view.readonly:
        return bytes(view) == bytes(n)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
    off = 0
    while off < n:
        step = min(len(_ZEROS), n - off)
        if _memcmp(addr + off, _ZEROS_ADDR, step) != 0:
            return False
        off += step
    return True


_ZEROS = bytearray(1024 * 1024)
_ZEROS_VIEW = memoryview(_ZEROS).toreadonly()
_ZEROS_ADDR = ctypes.addressof(ctypes.c_char.from_buffer(_ZEROS))
_memset = ctypes.memset
_memcmp = ctypes.CDLL(None).memcmp
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_memcmp.restype = ctypes.c_int


class ImageReader:
    """Reads a byte range of an image, verifying every chunk before it is handed out."""

    def __init__(self, store: ChunkStore, manifest: ImageManifest, *, image: str = "",
                 readahead: int = 8) -> None:
        self.store = store
        self.manifest = manifest
        self.image = image
        self.readahead = readahead
        self._zeros = bytes(min(ZERO_BLOCK_MAX, max(manifest.chunk_size, 1)))

    def _zero_run(self, n: int) -> Iterator[bytes]:
        step = len(self._zeros)
        while n > 0:
            take = min(step, n)
            yield self._zeros if take == step else self._zeros[:take]
            n -= take

    def _plan(self, start: int, end: int) -> Iterator[Future[bytes] | int]:
        """In order: futures of verified data (fetched ahead) or ints = that many zeros."""
        m = self.manifest
        cs = m.chunk_size
        window: deque[Future[bytes] | int] = deque()
        inflight = 0
        for i in range(start // cs, -(-end // cs) if end > start else start // cs):
            lo = max(start - i * cs, 0)
            hi = min(end - i * cs, m.chunk_length(i))
            digest = m.chunks[i]
            if digest == ZERO_DIGEST:
                if window and isinstance(window[-1], int):
                    window[-1] += hi - lo
                else:
                    window.append(hi - lo)
                continue
            fut = _POOL.submit(self.store.get_chunk, digest, m.chunk_length(i), image=self.image)
            window.append(fut if (lo == 0 and hi == m.chunk_length(i)) else _slice(fut, lo, hi))
            inflight += 1
            while inflight >= self.readahead:
                item = window.popleft()
                if not isinstance(item, int):
                    inflight -= 1
                yield item
        yield from window

    def iter_range(self, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        end = self.manifest.size if end is None else end
        for item in self._plan(start, end):
            if isinstance(item, int):
                yield from self._zero_run(item)
            else:
                yield item.result()

    def iter_present(self) -> Iterator[bytes]:
        """Every non-zero chunk in order, verified (the data part of a sparse transfer)."""
        m = self.manifest
        window: deque[Future[bytes]] = deque()
        for i, digest in enumerate(m.chunks):
            if digest == ZERO_DIGEST:
                continue
            window.append(_POOL.submit(self.store.get_chunk, digest, m.chunk_length(i),
                                       image=self.image))
            if len(window) >= self.readahead:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()

    async def aiter_range(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        end = self.manifest.size if end is None else end
        for item in self._plan(start, end):
            if isinstance(item, int):
                for block in self._zero_run(item):
                    yield block
            else:
                yield await asyncio.wrap_future(item)


def _slice(fut: Future[bytes], lo: int, hi: int) -> Future[bytes]:
    out: Future[bytes] = Future()

    def done(f: Future[bytes]) -> None:
        exc = f.exception()
        if exc is not None:
            out.set_exception(exc)
            return
        data = f.result()
        out.set_result(data[lo:hi])

    fut.add_done_callback(done)
    return out
