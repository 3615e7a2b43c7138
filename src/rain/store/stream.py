"""Streaming an image into and out of the chunk store with bounded memory.

Writing: the caller hands over blocks as they arrive. The whole-image SHA-256
runs in one thread (it must see bytes in order) while chunk hashing and object
writes run in a small pool; hashlib and file I/O release the GIL, so on two
cores the two digests overlap instead of adding up. A writer holds at most a
few blocks, whatever the image size, and all writers together share one
buffer budget (`BlockPool`). New chunks go into one pack per writer
(`rain.store.packs`), committed by `finish`. A writer can be stopped from
any thread (`stop`), and its waits call an `interrupt` callback, so an upload
whose client left or whose server is stopping ends within a fraction of a
second — even while it hashes a terabyte of declared zeros.

Reading: chunks are fetched and verified ahead of the consumer by the same
kind of pool, as deep as the number of concurrent readers allows (`ReadAhead`);
runs of zero chunks are produced without touching the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import mmap
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, BinaryIO, TypeVar

from rain.store.chunks import ChunkStore
from rain.store.manifest import ZERO_DIGEST, ImageManifest

ZERO_BLOCK_MAX = 4 * 1024 * 1024
WATCH_SECONDS = 0.2  # how often a waiting writer calls its interrupt callback
_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rain-chunk")
T = TypeVar("T")


class WriterStopped(Exception):
    """The writer was stopped (`ImageWriter.stop` or `abort`) before it finished."""


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
                 blocks: int = 6, block_chunks: int = 16,
                 interrupt: Callable[[], None] | None = None) -> None:
        self.store = store
        self.chunk_size = store.config.chunk_size
        # Up to `blocks` buffers of up to `block_chunks` chunks, taken as needed; their
        # size is this writer's share of the pool's budget (BlockPool.block_size).
        self._max_blocks = blocks
        self._block_chunks = block_chunks
        self._held = 0
        self._free: deque[mmap.mmap] = deque()
        # Called (from the writing thread) every WATCH_SECONDS while it waits: raising
        # there ends the upload (its client left, the server is stopping).
        self._interrupt = interrupt
        self._stop = threading.Event()
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
        BLOCKS.join()  # left in _close

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

    def _wait(self, fut: Future[T]) -> T:
        """`fut.result()`, watching for `stop` and calling `interrupt` while it waits."""
        while True:
            if self._stop.is_set():
                raise WriterStopped("the upload was stopped")
            done, _ = wait([fut], timeout=WATCH_SECONDS, return_when=FIRST_COMPLETED)
            if done:
                return fut.result()
            if self._interrupt is not None:
                self._interrupt()

    def _wait_oldest(self) -> None:
        _, hfut, cfuts = self._inflight[0]
        self._wait(hfut)
        for f in cfuts:
            self._wait(f)

    def _next_block(self) -> mmap.mmap:
        """A free block of this writer's current share, waiting for its own work if it
        holds all it may (never for other writers: no writer can starve another)."""
        want = BLOCKS.block_size(self.chunk_size, self._block_chunks, self._max_blocks)
        while True:
            while self._free:
                block = self._free.popleft()
                if len(block) == want:
                    return block
                self._held -= 1  # the share changed (uploads came or went): back to the pool
                BLOCKS.give(block)
            if self._held < self._max_blocks:
                self._held += 1
                return BLOCKS.take(want)
            self._wait_oldest()
            self._reap()

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
            self._cur = self._next_block()
        return memoryview(self._cur)[self._fill :]

    def commit(self, n: int) -> None:
        """`n` bytes of the last `buffer()` are filled."""
        assert self._cur is not None
        self._fill += n
        self.size += n
        if self._fill == len(self._cur):
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
            # A declared hole can be a terabyte (minutes of SHA-256): stop when told to.
            if self._stop.is_set():
                raise WriterStopped("the upload was stopped")
            take = min(step, n)
            self._whole.update(_ZEROS_VIEW[:take])
            if self._spool is not None:
                self._spool.seek(take, 1)  # a hole; finish() fixes the length
            n -= take

    def backpressure(self) -> Future[object] | None:
        """Work to wait for before the next write would block, for async callers."""
        self._reap()
        if self._free or self._held < self._max_blocks or not self._inflight:
            return None
        _, hfut, cfuts = self._inflight[0]
        futures: list[Future[Any]] = [hfut, *cfuts]
        pending = [f for f in futures if not f.done()]
        return pending[0] if pending else None

    def wait(self) -> None:
        """Synchronous callers: block until a buffer is free."""
        while (fut := self.backpressure()) is not None:
            self._wait(fut)

    def drain(self) -> None:
        """Wait until every whole chunk handed over so far is stored."""
        if self._cur is not None and self._fill and self._fill % self.chunk_size == 0:
            self._dispatch()
        for _, hfut, cfuts in list(self._inflight):
            self._wait(hfut)
            for f in cfuts:
                self._wait(f)
        self._reap()

    def stop(self) -> None:
        """Make the writer's work end soon, from any thread: waits raise WriterStopped and
        the zero hashing breaks off; the thread that owns the writer then aborts it."""
        self._stop.set()

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
        self._stop.set()
        for _, hfut, cfuts in self._inflight:
            hfut.cancel()
            for f in cfuts:
                f.cancel()
        try:
            self._close()
        finally:
            self._pack.abort()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
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
            self._held = 0
        finally:
            BLOCKS.leave()  # whatever happened above, this writer no longer shares the budget


class BlockPool:
    """Upload buffers, shared by every writer of the process within one budget.

    Each writer holds up to 6 blocks (receiving, whole-image hashing and chunk
    work overlap, with slack). A block's size is the writer's share of
    `budget`: 4 MiB for one or two uploads (a single stream runs exactly as
    before), halving as more start, down to one chunk — so all uploads'
    buffers together stay within the budget (or 6 chunks per writer, if that
    is more) however many there are. Writers resize at their next block, so
    the share follows uploads coming and going.

    Fresh memory is expensive where page faults are (in VMs, notably): a block
    is reused for the whole upload, and up to `keep` bytes of idle blocks stay
    mapped for the next one while uploads come and go; the rest are unmapped
    at once, and `release_idle` (the server, once idle) unmaps those too.
    """

    def __init__(self, budget: int = 48 * 1024 * 1024, keep: int = 8 * 1024 * 1024) -> None:
        self._idle: dict[int, list[mmap.mmap]] = {}
        self._lock = threading.Lock()
        self.budget = budget
        self.keep = keep
        self.writers = 0
        self.in_use = 0  # bytes of blocks handed out and not given back

    def join(self) -> None:
        with self._lock:
            self.writers += 1

    def leave(self) -> None:
        with self._lock:
            self.writers = max(self.writers - 1, 0)

    def block_size(self, chunk_size: int, max_chunks: int, blocks: int) -> int:
        """The size of the next block for a writer that may hold `blocks` of them."""
        with self._lock:
            share = self.budget // (max(self.writers, 1) * blocks)
        k = max_chunks
        while k > 1 and k * chunk_size > share:
            k //= 2
        return k * chunk_size

    def take(self, size: int) -> mmap.mmap:
        """A page-aligned buffer (anonymous mmap), so chunks can go out with O_DIRECT."""
        with self._lock:
            self.in_use += size
            idle = self._idle.get(size)
            if idle:
                return idle.pop()
        return mmap.mmap(-1, size)

    def give(self, block: mmap.mmap) -> None:
        with self._lock:
            self.in_use -= len(block)
            if self.idle_bytes() + len(block) <= self.keep:
                self._idle.setdefault(len(block), []).append(block)
                return
        _unmap(block)

    def idle_bytes(self) -> int:
        return sum(len(b) for blocks in self._idle.values() for b in blocks)

    def release_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for blocks in idle.values():
            for block in blocks:
                _unmap(block)


def _unmap(block: mmap.mmap) -> None:
    """Unmap now, or, while a view still points into it (the exception of an upload cut
    off mid-read holds one), when the last view goes: never fail a writer's cleanup."""
    with contextlib.suppress(BufferError):
        block.close()


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


class ReadAhead:
    """How many chunks a reader fetches ahead: `most` while few read, fewer as more do.

    Every download's chunks in flight are bytes on the heap; forty streams at
    eight chunks each were the largest part of the server's memory after the
    upload buffers. Readers share `budget` (at least 2 chunks each).
    """

    def __init__(self, budget: int = 16 * 1024 * 1024) -> None:
        self.budget = budget
        self.readers = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def reading(self, chunk_size: int, most: int) -> Iterator[int]:
        with self._lock:
            self.readers += 1
            depth = self.budget // (self.readers * max(chunk_size, 1))
        try:
            yield max(2, min(most, depth))
        finally:
            with self._lock:
                self.readers -= 1


READ_AHEAD = ReadAhead()


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
        with READ_AHEAD.reading(m.chunk_size, self.readahead) as depth:
            yield from self._planned(start, end, depth)

    def _planned(self, start: int, end: int, depth: int) -> Iterator[Future[bytes] | int]:
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
            while inflight >= depth:
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
        with READ_AHEAD.reading(m.chunk_size, self.readahead) as depth:
            for i, digest in enumerate(m.chunks):
                if digest == ZERO_DIGEST:
                    continue
                window.append(_POOL.submit(self.store.get_chunk, digest, m.chunk_length(i),
                                           image=self.image))
                if len(window) >= depth:
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
