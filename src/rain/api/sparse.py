"""Both directions of the sparse transfer encoding (rain.model.sparse) for the native server.

Upload: `SparseBodyReader` turns an encoded request body back into the image's
bytes — zeros are produced locally, present segments are read from the socket
straight into the writer's buffers — so the upload path downstream (format
checks, whole-image SHA-256, chunking, quotas) is the one plain uploads take.

Download: `sparse_parts` yields the encoded body of an image straight from its
manifest: the chunk digests it already has, then the verified non-zero chunks.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from typing import Protocol

from rain.model import InvalidRequest
from rain.model.sparse import (
    DIGESTS,
    HEAD_LEN,
    MEDIA_TYPE,
    SparseFormatError,
    SparseHeader,
    SparseTooLarge,
    bitmap,
    check_map,
    map_length,
    parse_head,
)
from rain.repo.upload import too_large
from rain.store import ImageReader
from rain.store.manifest import ZERO_DIGEST, ImageManifest

__all__ = ["MEDIA_TYPE", "SparseBodyReader", "sparse_header", "sparse_parts", "wants_sparse"]

_memset = ctypes.memset
# Largest map a sparse upload may send: 8 Mi segments, 2 TiB at rain's client's 256 KiB.
MAX_UPLOAD_MAP = 1024 * 1024


def _min_segment(size: int, max_map: int) -> int:
    segment = 4096
    while map_length(size, segment) > max_map:
        segment *= 2
    return segment


class Body(Protocol):
    done: bool
    remaining: int | None

    def readinto(self, view: memoryview) -> int: ...


class SparseBodyReader:
    """The decoded image behind a sparse request body, read like a plain body.

    An image over `max_size` is refused (ImageTooLarge) from the fixed header alone,
    before its map is read. Runs of absent segments are found and skipped by
    scanning the map's bytes, never segment by segment: a terabyte in 4 KiB
    segments is 268 million of them.
    """

    def __init__(self, body: Body, *, max_size: int, max_map: int = MAX_UPLOAD_MAP) -> None:
        self.body = body
        try:
            segment, size, flags, map_len = parse_head(self._exact(HEAD_LEN), max_size=max_size)
            if map_len > max_map:
                # 28 bytes must not buy a large buffer: small segments suit small images.
                raise InvalidRequest(
                    f"sparse upload: a map of {map_len} bytes is over {max_map}; send "
                    f"{size} bytes in segments of at least {_min_segment(size, max_map)} bytes")
            present = self._exact(map_len)
            check_map(segment, size, present)
        except SparseTooLarge as exc:
            raise too_large(exc.size, max_size) from None
        except SparseFormatError as exc:
            raise InvalidRequest(str(exc)) from None
        if flags & DIGESTS:
            raise InvalidRequest("sparse upload: the server computes digests, send none")
        self.header = SparseHeader(segment, size, flags, present)
        if body.remaining is not None and body.remaining != self.header.data_length():
            raise InvalidRequest(
                f"sparse upload: body has {body.remaining} bytes of data, its map says "
                f"{self.header.data_length()}")
        self._index = 0  # current segment
        self._left = self._segment_left(0)  # bytes of it still to produce
        self.done = size == 0

    def _exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.body.readinto(view[got:])
            if k == 0:
                raise InvalidRequest("sparse upload: body ends inside its header")
            got += k
        return bytes(buf)

    def _segment_left(self, index: int) -> int:
        h = self.header
        return h.segment_length(index) if index < h.count else 0

    def readinto(self, view: memoryview) -> int:
        """Fill up to len(view) bytes of the image; 0 at its end."""
        h = self.header
        if self.done or not len(view):
            return 0
        if h.is_present(self._index):
            n = self.body.readinto(view[: self._left])
            if n == 0:
                raise EOFError("client closed the connection mid-body")
            self._advance(n)
            return n
        # A run of absent segments: zeros, written in place without reading anything.
        want = len(view)
        filled = 0
        while filled < want and not self.done and not h.is_present(self._index):
            take = min(want - filled, self._left)
            _memset(ctypes.addressof(ctypes.c_char.from_buffer(view, filled)), 0, take)
            filled += take
            self._advance(take)
        return filled

    def _position(self) -> int:
        h = self.header
        return self._index * h.segment + h.segment_length(self._index) - self._left

    def zero_run(self) -> int:
        """Bytes of zeros from here to the next present segment (0 inside a present one)."""
        h = self.header
        if self.done or h.is_present(self._index):
            return 0
        end = min(h.next_present(self._index + 1) * h.segment, h.size)
        return end - self._position()

    def skip(self, n: int) -> None:
        """Move past `n` bytes of a zero run (as `zero_run` reported) without producing them."""
        if n <= 0:
            return
        h = self.header
        pos = self._position() + n
        last = (pos - 1) // h.segment  # the segment of the last byte skipped
        self._index = last
        self._left = last * h.segment + h.segment_length(last) - pos
        self._advance(0)

    def _advance(self, n: int) -> None:
        self._left -= n
        if self._left == 0:
            self._index += 1
            self._left = self._segment_left(self._index)
            if self._index >= self.header.count:
                self.done = True
                if not self.body.done and self.body.readinto(memoryview(bytearray(1))):
                    raise InvalidRequest("sparse upload: body is longer than its map says")


def wants_sparse(accept: str | None) -> bool:
    return bool(accept) and MEDIA_TYPE in (accept or "")


def sparse_header(manifest: ImageManifest) -> SparseHeader:
    """The header of a download: segments are the manifest's chunks, with their digests."""
    present = [d != ZERO_DIGEST for d in manifest.chunks]
    return SparseHeader(manifest.chunk_size, manifest.size, DIGESTS, bitmap(present))


def sparse_parts(reader: ImageReader, header: SparseHeader) -> Iterator[bytes | memoryview]:
    """The encoded body: header and map, digests, then every non-zero chunk (verified)."""
    manifest = reader.manifest
    yield header.pack()
    yield b"".join(d for d in manifest.chunks if d != ZERO_DIGEST)
    yield from reader.iter_present()
