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
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

BUFFER = 4 * 1024 * 1024
SEGMENT = 256 * 1024  # zero detection granularity when writing sparse files
Progress = Callable[[int], None]


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def _connect(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(host, parts.port, timeout=timeout)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return conn, path


def upload_file(url: str, path: Path, headers: dict[str, str], *, timeout: float,
                progress: Progress | None = None) -> Reply:
    """PUT a file; if the server answers early (an error) the answer is still read."""
    conn, target = _connect(url, timeout)
    size = Path(path).stat().st_size
    try:
        conn.putrequest("PUT", target, skip_accept_encoding=True)
        for key, value in {**headers, "Content-Length": str(size),
                           "Content-Type": "application/octet-stream"}.items():
            conn.putheader(key, value)
        conn.endheaders()
        # If the server refuses mid-way its reply (if any) says why.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            _send_file(conn, path, size, progress)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def _send_file(conn: http.client.HTTPConnection, path: Path, size: int,
               progress: Progress | None) -> None:
    sock = conn.sock
    assert sock is not None
    with open(path, "rb") as f:
        sent = 0
        while sent < size:
            if isinstance(sock, socket.socket) and not hasattr(sock, "context"):
                n = sock.sendfile(f, sent, min(BUFFER * 16, size - sent))
            else:  # TLS: no sendfile
                data = f.read(BUFFER)
                sock.sendall(data)
                n = len(data)
            if n == 0:
                break
            sent += n
            if progress:
                progress(n)


def download_file(url: str, out: Path, headers: dict[str, str], *, timeout: float,
                  progress: Progress | None = None) -> tuple[Reply, str, int]:
    """GET into `out` (created sparse); returns the reply, the body's SHA-256 and its length.

    On an error status nothing is written and the reply carries the body.
    """
    conn, target = _connect(url, timeout)
    try:
        conn.request("GET", target, headers=headers)
        resp = conn.getresponse()
        reply = Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, b"")
        if resp.status >= 300:
            reply.body = resp.read()
            return reply, "", 0
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
        return reply, hasher.hexdigest(), total
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
