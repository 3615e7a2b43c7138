"""Streaming an upload into the store: detect, vet, chunk, digest, commit.

Memory stays bounded (the writer holds a few chunks). Raw images — the bulk of
bytes — are never spooled: their header is cross-checked with qemu-img and the
rest only chunked. Formats with metadata (qcow2, vmdk, ...) are also spooled to
a temporary file so qemu-img can inspect and check the whole thing before the
image may become active. Any failure leaves the image `killed`, invisible to
users, and its chunks for gc.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rain.formats import HEADER_BYTES, ToolLimits, inspect_file, inspect_header
from rain.model import DiskFormat, InvalidImage, QuotaExceeded
from rain.store import ChunkStore, ImageManifest, ImageWriter

BLOCK = 4 * 1024 * 1024
NEEDS_SPOOL = {DiskFormat.QCOW2, DiskFormat.VMDK, DiskFormat.VPC, DiskFormat.VHDX, DiskFormat.VDI}


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


async def stream_into_store(store: ChunkStore, body: AsyncIterator[bytes], *,
                            declared: DiskFormat | None, limits: UploadLimits,
                            spool_dir: Path, image_id: str,
                            on_progress: Callable[[int], None] | None = None) -> UploadResult:
    header = bytearray()
    writer: ImageWriter | None = None
    spool: BinaryIO | None = None
    fmt = DiskFormat.RAW
    try:
        async for piece in body:
            if writer is None:
                header += piece
                if len(header) < HEADER_BYTES:
                    continue
                fmt, writer, spool = _start(store, bytes(header), declared, limits, spool_dir)
                piece = bytes(header)
            await _feed(writer, piece)
            if writer.size % BLOCK < len(piece):  # about every BLOCK bytes
                _check(writer, limits, fmt)
                if on_progress:
                    on_progress(writer.size)
        if writer is None:
            if not header:
                raise InvalidImage("the upload is empty")
            fmt, writer, spool = _start(store, bytes(header), declared, limits, spool_dir)
            await _feed(writer, bytes(header))
        _check(writer, limits, fmt)
        manifest = await asyncio.to_thread(writer.finish)
        virtual_size = manifest.size
        if spool is not None:
            spool.flush()
            info = await asyncio.to_thread(
                inspect_file, Path(spool.name), declared=fmt,
                max_virtual_size=limits.max_virtual_size, limits=limits.tool)
            virtual_size = info.virtual_size
        manifest_id = await asyncio.to_thread(store.put_manifest, manifest)
        return UploadResult(manifest, manifest_id, fmt, virtual_size, writer.stored_bytes)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if spool is not None:
            spool.close()


def _start(store: ChunkStore, header: bytes, declared: DiskFormat | None, limits: UploadLimits,
           spool_dir: Path) -> tuple[DiskFormat, ImageWriter, BinaryIO | None]:
    # For raw and ISO this also has qemu-img probe the header: no spool needed for them.
    fmt = inspect_header(header, None, declared=declared,
                         max_virtual_size=limits.max_virtual_size, limits=limits.tool)
    spool: BinaryIO | None = None
    if fmt not in (DiskFormat.RAW, DiskFormat.ISO):
        spool_dir.mkdir(parents=True, exist_ok=True)
        # Closed (and so deleted) by stream_into_store's finally.
        spool = tempfile.NamedTemporaryFile(  # noqa: SIM115
            dir=spool_dir, prefix="upload-")  # type: ignore[assignment]
    return fmt, ImageWriter(store, spool=spool), spool


async def _feed(writer: ImageWriter, piece: bytes) -> None:
    # Wait (without blocking the event loop) until the writer has a free buffer.
    while (fut := writer.backpressure()) is not None:
        with contextlib.suppress(Exception):  # errors surface again in finish()
            await asyncio.wrap_future(fut)
    writer.write(piece)


def _check(writer: ImageWriter, limits: UploadLimits, fmt: DiskFormat) -> None:
    if fmt in (DiskFormat.RAW, DiskFormat.ISO) and writer.size > limits.max_virtual_size:
        raise InvalidImage(f"image is larger than the limit of {limits.max_virtual_size} bytes")
    if limits.quota_left is not None and writer.stored_bytes > limits.quota_left:
        raise QuotaExceeded(
            f"upload stopped: it would exceed the storage quota of user {limits.quota_owner!r}")
