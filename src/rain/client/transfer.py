"""Bulk transfers over plain `http.client`, the shortest path from socket to disk.

httpx is right for the JSON API, but it moves a body in 64 KiB pieces through
several layers; for multi-GiB images that costs more CPU than the SHA-256.
Uploads here go out with `sendfile` (page cache to socket, no copies in
Python); downloads `readinto` a few reused buffers, hash them in a second
thread and write zero blocks as holes.

`progress(n)` counts bytes of the image (zero stretches a sparse transfer
skips count when they are passed), as they go. `phase(name, total)` says what
the transfer is doing when it is not moving bytes the caller could count:
scanning the file for zeros, waiting while the server checks and stores an
upload or converts an image before the first byte of a download — so a bar
can say so instead of sitting at 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import select
import socket
import ssl
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from rain.client.connection import open_connection
from rain.client.sparse import receive, runs, scan
from rain.model.sparse import MEDIA_TYPE as SPARSE_TYPE
from rain.model.sparse import SparseHeader

BUFFER = 4 * 1024 * 1024
SEGMENT = 256 * 1024  # zero detection granularity when writing sparse files
# Bytes per sendfile call: large enough to cost nothing, small enough that the
# progress bar moves every few hundred milliseconds on a slow link.
SENDFILE_STEP = 2 * BUFFER
Progress = Callable[[int], None]
Phase = Callable[[str, int | None], None]  # (what is happening, bytes it will count or None)

SCANNING = "scanning for zeros"
SENDING = "sending"
STORING = "the server checks and stores it"
WAITING = "waiting for the server"
CONVERTING = "converting on the server"
RECEIVING = "receiving"
BUSY = "the server is at its limit of uploads: waiting to push again"


class ServerAnswered(Exception):
    """The server answered before the body was all sent (a refusal): stop sending."""


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def upload_file(url: str, path: Path, headers: dict[str, str], *, timeout: float,
                progress: Progress | None = None, sparse: bool = True,
                context: ssl.SSLContext | None = None, phase: Phase | None = None) -> Reply:
    """PUT a file; if the server answers early (an error) the answer is still read.

    With `sparse` the body leaves out all-zero segments (rain.model.sparse); a
    server that does not take that encoding (415) gets the plain bytes.
    """
    size = Path(path).stat().st_size
    if sparse:
        if phase:
            phase(SCANNING, size)
        header = scan(path, progress=progress)
        reply = _put(url, path, headers, timeout, progress, header, context, phase)
        if reply.status != 415:
            return reply
    return _put(url, path, headers, timeout, progress, None, context, phase)


def _put(url: str, path: Path, headers: dict[str, str], timeout: float,
         progress: Progress | None, sparse: SparseHeader | None,
         context: ssl.SSLContext | None = None, phase: Phase | None = None) -> Reply:
    conn, target = open_connection(url, timeout, context)
    size = Path(path).stat().st_size
    if phase:
        phase(SENDING, size)
    if sparse is None:
        extra = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
    else:
        extra = {"Content-Length": str(sparse.body_length()), "Content-Type": SPARSE_TYPE}
    try:
        conn.putrequest("PUT", target, skip_accept_encoding=True)
        for key, value in {**headers, **extra}.items():
            conn.putheader(key, value)
        conn.endheaders()
        # If the server refuses mid-way its reply (if any) says why.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, ServerAnswered), \
                open(path, "rb") as f:
            if sparse is None:
                _send_range(conn, f, 0, size, progress)
            else:
                assert conn.sock is not None
                conn.sock.sendall(sparse.pack())
                done = 0
                for off, length in runs(sparse):
                    if progress and off > done:
                        progress(off - done)  # the zeros before this run: skipped
                    _send_range(conn, f, off, length, progress)
                    done = off + length
                if progress and size > done:
                    progress(size - done)
        if phase:
            phase(STORING, None)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def _send_range(conn: http.client.HTTPConnection, f: BinaryIO, offset: int, length: int,
                progress: Progress | None) -> None:
    sock = conn.sock
    assert sock is not None
    # TLS: no sendfile, and no early answer to look for — a readable socket may only
    # hold the server's session tickets (TLS 1.3 sends them after the handshake).
    plain = isinstance(sock, socket.socket) and not hasattr(sock, "context")
    sent = 0
    while sent < length:
        if plain and select.select([sock], [], [], 0)[0]:  # an early answer is a refusal
            raise ServerAnswered
        if plain:
            n = sock.sendfile(f, offset + sent, min(SENDFILE_STEP, length - sent))
        else:
            f.seek(offset + sent)
            data = f.read(min(BUFFER, length - sent))
            sock.sendall(data)
            n = len(data)
        if n == 0:
            raise ConnectionResetError("the file ended early or the connection closed")
        sent += n
        if progress:
            progress(n)


@dataclass
class Downloaded:
    reply: Reply
    sha256: str  # of what was written (plain), or the image digest the chunks proved (sparse)
    size: int  # bytes of image written
    complete: bool  # every byte the server promised arrived (and was verified, if sparse)


def download_file(url: str, out: Path, headers: dict[str, str], *, timeout: float,
                  progress: Progress | None = None, sparse: bool = True,
                  context: ssl.SSLContext | None = None, phase: Phase | None = None,
                  converting: bool = False) -> Downloaded:
    """GET into `out` (created sparse).

    With `sparse`, a server that speaks rain's sparse encoding sends only the
    non-zero chunks with their digests, each verified here; otherwise the
    whole body's SHA-256 is computed while writing. On an error status nothing
    is written and the reply carries the body. `converting`: the server makes
    the image in another format before it answers (the phase says so).
    """
    conn, target = open_connection(url, timeout, context)
    try:
        accept = {"Accept": f"{SPARSE_TYPE}, application/octet-stream"} if sparse else {}
        if phase:
            phase(CONVERTING if converting else WAITING, None)
        conn.request("GET", target, headers={**headers, **accept})
        resp = conn.getresponse()
        reply = Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, b"")
        if resp.status >= 300:
            reply.body = resp.read()
            return Downloaded(reply, "", 0, False)
        if reply.headers.get("content-type", "").startswith(SPARSE_TYPE):
            with open(out, "wb") as f:
                header = receive(resp, f, progress=progress,
                                 started=(lambda total: phase(RECEIVING, total)) if phase
                                 else None)
            return Downloaded(reply, reply.headers.get("x-rain-sha256", ""), header.size, True)
        if phase:
            declared = reply.headers.get("content-length", "")
            phase(RECEIVING, int(declared) if declared.isdigit() else None)
        hasher = hashlib.sha256()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rain-pull-sha")
        buffers = [bytearray(BUFFER) for _ in range(3)]
        pending: list[Future[None] | None] = [None] * len(buffers)
        total = 0
        try:
            with open(out, "wb") as f:
                i = 0
                while True:
                    if pending[i] is not None:
                        pending[i].result()  # type: ignore[union-attr]
                    view = memoryview(buffers[i])
                    n = _fill(resp, view)
                    if n == 0:
                        break
                    pending[i] = pool.submit(hasher.update, view[:n])
                    _write_sparse(f, view[:n])
                    total += n
                    if progress:
                        progress(n)
                    i = (i + 1) % len(buffers)
                f.truncate(total)
            for p in pending:
                if p is not None:
                    p.result()
        finally:
            pool.shutdown()
        length = int(reply.headers.get("content-length", total))
        return Downloaded(reply, hasher.hexdigest(), total, total == length)
    finally:
        conn.close()


def _fill(resp: http.client.HTTPResponse, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = resp.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _write_sparse(f: object, view: memoryview) -> None:
    """Write non-zero segments, seek over zero ones (the file stays sparse)."""
    fd = f.fileno()  # type: ignore[attr-defined]
    pos = os.lseek(fd, 0, os.SEEK_CUR)
    n = len(view)
    words = np.frombuffer(view, dtype=np.uint8, count=n)
    for off in range(0, n, SEGMENT):
        seg = words[off : off + SEGMENT]
        if np.count_nonzero(seg):
            os.pwrite(fd, view[off : off + SEGMENT], pos + off)
    os.lseek(fd, pos + n, os.SEEK_SET)
