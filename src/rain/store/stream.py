"""Streaming an image into and out of the chunk store with bounded memory.

Writing: the caller hands over blocks as they arrive. The whole-image SHA-256
runs in one thread (it must see bytes in order) while chunk hashing and object
writes run in a small pool; hashlib and file I/O release the GIL, so on two
cores the two digests overlap instead of adding up. At most `max_inflight`
chunks are held at once, whatever the image size.

Reading: chunks are fetched and verified ahead of the consumer by the same
kind of pool; runs of zero chunks are produced without touching the store.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

from rain.store.chunks import ChunkStore
from rain.store.manifest import ZERO_DIGEST, ImageManifest

ZERO_BLOCK_MAX = 4 * 1024 * 1024
_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rain-chunk")


class ImageWriter:
    """Cuts a byte stream into chunks, stores them and builds the manifest."""

    def __init__(self, store: ChunkStore, *, spool: BinaryIO | None = None,
                 max_inflight: int = 16) -> None:
        self.store = store
        self.chunk_size = store.config.chunk_size
        self._zero = bytes(self.chunk_size)
        self._buf = bytearray()
        self._whole = hashlib.sha256()
        self._spool = spool
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rain-sha")
        self._pending: deque[Future[tuple[bytes, int]]] = deque()
        self._hash_pending: deque[Future[None]] = deque()
        self._max_inflight = max_inflight
        self.size = 0
        self.stored_bytes = 0
        self.chunks: list[bytes] = []
        self._closed = False

    def _store_chunk(self, data: bytes) -> tuple[bytes, int]:
        if data == (self._zero if len(data) == self.chunk_size else bytes(len(data))):
            return ZERO_DIGEST, 0
        digest = hashlib.sha256(data).digest()
        return digest, self.store.put_chunk(digest, data)

    def _hash_block(self, data: bytes) -> None:
        self._whole.update(data)
        if self._spool is not None:
            self._spool.write(data)

    def _reap(self) -> None:
        while self._pending and self._pending[0].done():
            digest, added = self._pending.popleft().result()
            self.chunks.append(digest)
            self.stored_bytes += added
        while self._hash_pending and self._hash_pending[0].done():
            self._hash_pending.popleft().result()

    def write(self, data: bytes) -> None:
        """Accept the next bytes of the image; never blocks on I/O.

        Callers that pass blocks whose length is a multiple of the chunk size
        (the upload path does) avoid every copy but the one per chunk.
        """
        if not data:
            return
        data = bytes(data)  # no copy for bytes: the hasher needs an immutable object
        self.size += len(data)
        self._hash_pending.append(self._hasher.submit(self._hash_block, data))
        cs = self.chunk_size
        view = memoryview(data)
        if self._buf:
            need = cs - len(self._buf)
            self._buf += view[:need]
            view = view[need:]
            if len(self._buf) == cs:
                self._pending.append(_POOL.submit(self._store_chunk, bytes(self._buf)))
                self._buf.clear()
        whole = len(view) - len(view) % cs
        for off in range(0, whole, cs):
            self._pending.append(_POOL.submit(self._store_chunk, bytes(view[off : off + cs])))
        if whole < len(view):
            self._buf += view[whole:]
        self._reap()

    def backpressure(self) -> Future[object] | None:
        """The oldest unfinished work when too much is in flight, for the caller to wait on."""
        self._reap()
        if len(self._pending) > self._max_inflight:
            return self._pending[0]  # type: ignore[return-value]
        if len(self._hash_pending) > self._max_inflight * 4:
            return self._hash_pending[0]  # type: ignore[return-value]
        return None

    def wait(self) -> None:
        """Synchronous callers: block while too much is in flight."""
        while (fut := self.backpressure()) is not None:
            fut.result()

    def drain(self) -> None:
        """Wait until every chunk handed over so far is stored."""
        for fut in list(self._pending):
            fut.result()
        self._reap()

    def finish(self) -> ImageManifest:
        """Flush the last partial chunk and wait for everything; the manifest is not yet saved."""
        if self._buf:
            self._pending.append(_POOL.submit(self._store_chunk, bytes(self._buf)))
            self._buf.clear()
        for fut in list(self._pending):
            fut.result()
        for hfut in list(self._hash_pending):
            hfut.result()
        self._reap()
        self._close()
        return ImageManifest(self.chunk_size, self.size, self._whole.hexdigest(), self.chunks)

    def abort(self) -> None:
        """Stop early; stored chunks stay unreferenced until gc removes them."""
        for fut in self._pending:
            fut.cancel()
        for hfut in self._hash_pending:
            hfut.cancel()
        self._pending.clear()
        self._hash_pending.clear()
        self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._hasher.shutdown(wait=True, cancel_futures=True)


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
