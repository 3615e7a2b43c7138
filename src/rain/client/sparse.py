"""The client's half of the sparse transfer encoding (rain.model.sparse).

Upload: find the file's non-zero segments — holes come from SEEK_DATA/SEEK_HOLE
for free, allocated ranges are checked for zeros with numpy over an mmap (about
0.1 s per GiB) — then send the header, the map and only those segments, each
run with `sendfile`.

Download: read the header, map and digests, then every present segment into a
few reused buffers; a small pool verifies each segment's SHA-256 against its
digest and `pwrite`s it in place. Absent segments stay holes of the output
file. A bad segment is an error naming its index and offset.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import mmap
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np

from rain.model import InvalidImage, RainError
from rain.model.sparse import (
    DIGEST_LEN,
    DIGESTS,
    HEAD_LEN,
    SparseFormatError,
    SparseHeader,
    bitmap,
    check_map,
    parse_head,
)

SEGMENT = 256 * 1024
BATCH = 4 * 1024 * 1024  # bytes of segments verified and written per task
MAX_SIZE = 1 << 62
SCAN_REPORT = 64  # segments between progress reports of a scan (16 MiB)
Progress = Callable[[int], None]


def scan(path: Path, segment: int = SEGMENT,
         progress: Progress | None = None) -> SparseHeader:
    """Which segments of `path` hold a non-zero byte; `progress` gets the bytes looked at
    (a hole counts when it is passed), so a bar can move while a large file is read."""
    size = path.stat().st_size
    count = -(-size // segment)
    present = [False] * count
    if size == 0:
        return SparseHeader(segment, 0, 0, b"")
    seen = 0

    def reached(pos: int) -> None:
        nonlocal seen
        if progress and pos > seen:
            progress(pos - seen)
            seen = pos

    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm:
        for start, end in _data_extents(f.fileno(), size):
            for i in range(start // segment, -(-end // segment)):
                if not present[i]:
                    present[i] = _nonzero(mm, i * segment, min((i + 1) * segment, size))
                if i % SCAN_REPORT == 0:
                    reached(min(i * segment, size))
            reached(end)
    reached(size)
    return SparseHeader(segment, size, 0, bitmap(present))


def _nonzero(mm: mmap.mmap, lo: int, hi: int) -> bool:
    # The array must not outlive this call, or the mmap cannot be closed.
    return bool(np.count_nonzero(np.frombuffer(mm, dtype=np.uint8, count=hi - lo, offset=lo)))


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """[(start, end)] ranges that may hold data; the whole file if holes are unknown."""
    extents: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            extents.append((start, end))
            pos = end
    except OSError:
        return [(0, size)]
    return extents


def runs(header: SparseHeader) -> list[tuple[int, int]]:
    """(offset, length) of each run of consecutive present segments."""
    out: list[tuple[int, int]] = []
    seg = header.segment
    for i in header.present_indices():
        off, length = i * seg, header.segment_length(i)
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((off, length))
    return out


def receive(resp: http.client.HTTPResponse, out: BinaryIO, *,
            progress: Progress | None = None, workers: int = 2,
            started: Callable[[int], None] | None = None) -> SparseHeader:
    """Decode a sparse response body into `out`, verifying every segment; `started`
    gets the image's size once the header says it."""
    try:
        segment, size, flags, map_len = parse_head(_exact(resp, HEAD_LEN), max_size=MAX_SIZE)
        present = _exact(resp, map_len)
        check_map(segment, size, present)
    except SparseFormatError as exc:
        raise RainError(f"download failed: {exc}") from None
    header = SparseHeader(segment, size, flags, present)
    if not flags & DIGESTS:
        raise RainError("download failed: the server sent no segment digests")
    if started:
        started(size)
    digests = _exact(resp, header.digests_length())
    out.truncate(size)
    fd = out.fileno()
    indices = header.present_indices()
    per_batch = max(BATCH // segment, 1)
    buffers = [bytearray(per_batch * segment) for _ in range(workers + 2)]
    pending: list[Future[None] | None] = [None] * len(buffers)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rain-pull-verify")
    reported = 0
    try:
        for b, first in enumerate(range(0, len(indices), per_batch)):
            slot = b % len(buffers)
            if pending[slot] is not None:
                pending[slot].result()  # type: ignore[union-attr]
            batch = indices[first : first + per_batch]
            view = memoryview(buffers[slot])
            pos = 0
            for i in batch:
                n = header.segment_length(i)
                _fill(resp, view[pos : pos + n])
                pos += n
            pending[slot] = pool.submit(_verify_write, fd, header, batch, view,
                                        digests[first * DIGEST_LEN:])
            if progress:
                logical = min((batch[-1] + 1) * segment, size)
                progress(logical - reported)
                reported = logical
        for p in pending:
            if p is not None:
                p.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if progress and size > reported:
        progress(size - reported)
    return header


def _verify_write(fd: int, header: SparseHeader, batch: list[int], view: memoryview,
                  digests: bytes) -> None:
    pos = 0
    for k, i in enumerate(batch):
        n = header.segment_length(i)
        piece = view[pos : pos + n]
        if hashlib.sha256(piece).digest() != digests[k * DIGEST_LEN : (k + 1) * DIGEST_LEN]:
            raise InvalidImage(f"download is corrupt: chunk {i} (offset {i * header.segment}) "
                               "does not match its digest")
        os.pwrite(fd, piece, i * header.segment)
        pos += n


def _exact(resp: http.client.HTTPResponse, n: int) -> bytes:
    buf = bytearray(n)
    _fill(resp, memoryview(buf))
    return bytes(buf)


def _fill(resp: http.client.HTTPResponse, view: memoryview) -> None:
    got = 0
    while got < len(view):
        k = resp.readinto(view[got:])
        if not k:
            raise RainError(f"download was cut short ({got} of {len(view)} bytes of a piece)")
        got += k
