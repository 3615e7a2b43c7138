"""Bulk transfers over plain `http.client`, the shortest path from socket to disk.

httpx is right for the JSON API, but it moves a body in 64 KiB pieces through
several layers; for multi-GiB images that costs more CPU than the SHA-256.
Uploads here go out with `sendfile` (page cache to socket, no copies in
Python); downloads `readinto` a few reused buffers, hash them in a second
thread and write zero blocks as holes.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import socket
import ssl
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import numpy as np

from rain.client.sparse import receive, runs, scan
from rain.model.sparse import MEDIA_TYPE as SPARSE_TYPE
from rain.model.sparse import SparseHeader

BUFFER = 4 * 1024 * 1024
SEGMENT = 256 * 1024  # zero detection granularity when writing sparse files
Progress = Callable[[int], None]


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def _connect(url: str, timeout: float,
             context: ssl.SSLContext | None = None) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(host, parts.port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(host, parts.port, timeout=timeout)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return conn, path


def upload_file(url: str, path: Path, headers: dict[str, str], *, timeout: float,
                progress: Progress | None = None, sparse: bool = True,
                context: ssl.SSLContext | None = None) -> Reply:
    """PUT a file; if the server answers early (an error) the answer is still read.

    With `sparse` the body leaves out all-zero segments (rain.model.sparse); a
    server that does not take that encoding (415) gets the plain bytes.
    """
    if sparse:
        reply = _put(url, path, headers, timeout, progress, scan(path), context)
        if reply.status != 415:
            return reply
    return _put(url, path, headers, timeout, progress, None, context)


def _put(url: str, path: Path, headers: dict[str, str], timeout: float,
         progress: Progress | None, sparse: SparseHeader | None,
         context: ssl.SSLContext | None = None) -> Reply:
    conn, target = _connect(url, timeout, context)
    size = Path(path).stat().st_size
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
        with contextlib.suppress(BrokenPipeError, ConnectionResetError), open(path, "rb") as f:
            if sparse is None:
                _send_range(conn, f, 0, size, progress)
            else:
                assert conn.sock is not None
                conn.sock.sendall(sparse.pack())
                done = 0
                for off, length in runs(sparse):
                    _send_range(conn, f, off, length, None)
                    if progress:
                        progress(off + length - done)
                        done = off + length
                if progress and size > done:
                    progress(size - done)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def _send_range(conn: http.client.HTTPConnection, f: BinaryIO, offset: int, length: int,
                progress: Progress | None) -> None:
    sock = conn.sock
    assert sock is not None
    sent = 0
    while sent < length:
        if isinstance(sock, socket.socket) and not hasattr(sock, "context"):
            n = sock.sendfile(f, offset + sent, min(BUFFER * 16, length - sent))
        else:  # TLS: no sendfile
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
                  context: ssl.SSLContext | None = None) -> Downloaded:
    """GET into `out` (created sparse).

    With `sparse`, a server that speaks rain's sparse encoding sends only the
    non-zero chunks with their digests, each verified here; otherwise the
    whole body's SHA-256 is computed while writing. On an error status nothing
    is written and the reply carries the body.
    """
    conn, target = _connect(url, timeout, context)
    try:
        accept = {"Accept": f"{SPARSE_TYPE}, application/octet-stream"} if sparse else {}
        conn.request("GET", target, headers={**headers, **accept})
        resp = conn.getresponse()
        reply = Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, b"")
        if resp.status >= 300:
            reply.body = resp.read()
            return Downloaded(reply, "", 0, False)
        if reply.headers.get("content-type", "").startswith(SPARSE_TYPE):
            with open(out, "wb") as f:
                header = receive(resp, f, progress=progress)
            return Downloaded(reply, reply.headers.get("x-rain-sha256", ""), header.size, True)
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
