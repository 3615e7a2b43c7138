"""Streaming an upload into the store: detect, vet, chunk, digest, commit.

Memory stays bounded (the writer holds a few chunks). Raw images — the bulk of
bytes — are never spooled: their header is cross-checked with qemu-img and the
rest only chunked. Formats with metadata (qcow2, vmdk, ...) are also spooled to
a temporary file so qemu-img can inspect and check the whole thing before the
image may become active. Any failure leaves the image `killed`, invisible to
users, and its chunks for gc.

What one upload can cost is bounded by `max_image_size`: checked against the
size a front end declares before any byte is hashed (`expect_size`), and
again as bytes — or declared zeros — arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rain.formats import HEADER_BYTES, ToolLimits, inspect_file, inspect_header
from rain.model import DiskFormat, InvalidImage, QuotaExceeded
from rain.model.errors import ImageTooLarge
from rain.model.units import format_bytes
from rain.store import ChunkStore, ImageManifest, ImageWriter

BLOCK = 4 * 1024 * 1024


@dataclass
class UploadResult:
    manifest: ImageManifest
    manifest_id: str
    disk_format: DiskFormat
    virtual_size: int
    stored_bytes: int


@dataclass
class UploadLimits:
    max_virtual_size: int
    quota_left: int | None  # bytes this upload may add to the store; None = unlimited
    quota_owner: str
    tool: ToolLimits
    max_image_size: int = 1024**4


class UploadSession:
    """One upload in progress, fed synchronously by whichever front end receives it.

    Either `feed(bytes)` pieces as they come, or — the fast path — ask for
    `buffer()` space, read the socket straight into it and `commit(n)`: the
    bytes then land in the writer's block without a single copy in Python.
    """

    def __init__(self, store: ChunkStore, *, declared: DiskFormat | None,
                 limits: UploadLimits, spool_dir: Path,
                 interrupt: Callable[[], None] | None = None) -> None:
        self.store = store
        # Called while the upload waits for its own work (see ImageWriter): raise to end it.
        self.interrupt = interrupt
        self.declared = declared
        self.limits = limits
        self.spool_dir = spool_dir
        self.header = bytearray()
        self.writer: ImageWriter | None = None
        self.spool: BinaryIO | None = None
        self.fmt = DiskFormat.RAW
        self._checked_at = 0

    @property
    def wants_header(self) -> bool:
        """Still collecting the first HEADER_BYTES (use `feed` until False)."""
        return self.writer is None

    @property
    def header_missing(self) -> int:
        return max(HEADER_BYTES - len(self.header), 0)

    def expect_size(self, size: int) -> None:
        """The size the client declares (Content-Length, a sparse header, a file's size):
        refused at once when over the cap, before any byte is read or hashed."""
        if size > self.limits.max_image_size:
            raise too_large(size, self.limits.max_image_size)

    def feed(self, data: bytes | memoryview) -> None:
        if self.writer is None:
            self._grow(len(data), len(self.header))
            self.header += data
            if len(self.header) >= HEADER_BYTES:
                self._start()
            return
        self._grow(len(data), self.writer.size)
        self.writer.write(data)
        self._check()

    def buffer(self) -> memoryview:
        assert self.writer is not None, "feed the header first"
        return self.writer.buffer()

    def commit(self, n: int) -> None:
        assert self.writer is not None
        self.writer.commit(n)
        self._check()

    def zeros(self, n: int) -> None:
        """`n` bytes known to be zero (a hole in a sparse upload): nothing to copy or store."""
        assert self.writer is not None, "feed the header first"
        self._grow(n, self.writer.size)  # before a terabyte of zeros is queued for hashing
        self.writer.write_zeros(n)
        self._check()

    def backpressure(self) -> Future[object] | None:
        return self.writer.backpressure() if self.writer is not None else None

    def stop(self) -> None:
        """From another thread: make the upload's work end soon (see ImageWriter.stop)."""
        if self.writer is not None:
            self.writer.stop()

    def finish(self) -> UploadResult:
        if self.writer is None:
            if not self.header:
                raise InvalidImage("the upload is empty")
            self._start()
        assert self.writer is not None
        manifest = self.writer.finish()
        self._check(force=True)  # now that every chunk's stored size is known
        virtual_size = manifest.size
        if self.spool is not None:
            self.spool.flush()
            info = inspect_file(Path(self.spool.name), declared=self.fmt,
                                max_virtual_size=self.limits.max_virtual_size,
                                limits=self.limits.tool)
            virtual_size = info.virtual_size
        manifest_id = self.store.put_manifest(manifest)
        self.close()
        return UploadResult(manifest, manifest_id, self.fmt, virtual_size,
                            self.writer.stored_bytes)

    def abort(self) -> None:
        try:
            if self.writer is not None:
                self.writer.abort()
        finally:
            self.close()

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()  # deletes the temporary file
            self.spool = None

    def _start(self) -> None:
        header = bytes(self.header)
        # For raw and ISO this also has qemu-img probe the header: no spool needed for them.
        self.fmt = inspect_header(header, None, declared=self.declared,
                                  max_virtual_size=self.limits.max_virtual_size,
                                  limits=self.limits.tool)
        if self.fmt not in (DiskFormat.RAW, DiskFormat.ISO):
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            # Closed (and so deleted) by close().
            self.spool = tempfile.NamedTemporaryFile(  # noqa: SIM115
                dir=self.spool_dir, prefix="upload-")  # type: ignore[assignment]
        self.writer = ImageWriter(self.store, spool=self.spool, interrupt=self.interrupt)
        self.writer.write(header)

    def _check(self, force: bool = False) -> None:
        w = self.writer
        assert w is not None
        if w.size > self.limits.max_image_size:
            raise too_large(None, self.limits.max_image_size)
        if not force and w.size - self._checked_at < BLOCK:
            return
        self._checked_at = w.size
        if self.fmt in (DiskFormat.RAW, DiskFormat.ISO) and w.size > self.limits.max_virtual_size:
            raise InvalidImage("image is larger than the limit of "
                               f"{self.limits.max_virtual_size} bytes")
        if self.limits.quota_left is not None and w.stored_bytes > self.limits.quota_left:
            raise QuotaExceeded("upload stopped: it would exceed the storage quota of user "
                                f"{self.limits.quota_owner!r}")

    def _grow(self, n: int, have: int) -> None:
        if have + n > self.limits.max_image_size:
            raise too_large(None, self.limits.max_image_size)


def too_large(size: int | None, cap: int) -> ImageTooLarge:
    """`size` as declared, or None for an image found too large as its bytes arrived."""
    what = f"an image of {format_bytes(size)} ({size} bytes)" if size is not None else \
        "the image"
    return ImageTooLarge(f"{what} is larger than this server's limit of {format_bytes(cap)} "
                         f"({cap} bytes, [repo] max_image_size)",
                         details={"max_image_size": cap})


async def stream_into_store(session: UploadSession, body: AsyncIterator[bytes]) -> UploadResult:
    """The ASGI front end: pieces from an async body, waits without blocking the loop."""
    try:
        async for piece in body:
            while (fut := session.backpressure()) is not None:
                with contextlib.suppress(Exception):  # errors surface again in finish()
                    await asyncio.wrap_future(fut)
            session.feed(piece)
    except BaseException:
        session.abort()
        raise
    try:
        return await asyncio.to_thread(_finish_or_abort, session)
    except asyncio.CancelledError:
        # The server is stopping: finish() runs on in its thread and aborts there once it
        # sees the stop (aborting from here would race with it).
        session.stop()
        raise


def _finish_or_abort(session: UploadSession) -> UploadResult:
    try:
        return session.finish()
    except BaseException:
        session.abort()
        raise
