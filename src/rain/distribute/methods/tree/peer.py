"""How nodes send chunks to each other: a stream of framed, individually verified chunks.

A node serves `GET /v1/peer/images/{image_id}/chunks?stripe=S&of=K&from=I`
to the other nodes of a deployment (bearer: the deployment's peer token):
the chunks of the image whose index i has i % K == S (all chunks for K=1),
from index I on, in index order, each sent as soon as the serving node has
it verified — so a tree of nodes forwards data while it is still receiving
it. Zero chunks are never sent (everyone knows them). The body is

    frame* with frame = u32 index | u32 length | length bytes   (big-endian)

and ends after the last chunk of the stripe; a serving node that loses the
image closes the connection early. The receiver checks every chunk against
the manifest (PartialImage.put) and drops a peer that sends a bad one.

`GET /v1/peer/chunks/{hex digest}` returns one chunk by its digest, from any
image the node holds (the `chunks` method: rain.distribute.methods.chunks).
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import struct
from collections.abc import Callable, Iterator

from rain.distribute.partial import PartialImage

FRAME = struct.Struct(">II")
CHUNKS_PATH = "/v1/peer/images/{image_id}/chunks"
WAIT_STEP = 1.0  # seconds between checks for a cancelled stream while a chunk is awaited


def stripe_indices(partial: PartialImage, stripe: int, of: int, start: int = 0) -> list[int]:
    """Non-zero chunk indices of one stripe, from `start` on."""
    return [i for i in range(start, partial.count)
            if i % of == stripe and not partial.is_zero(i)]


def serve_stripe(partial: PartialImage, stripe: int, of: int, start: int,
                 write: Callable[[bytes], object], *, idle_timeout: float = 120.0,
                 on_sent: Callable[[int], None] | None = None,
                 sock: socket.socket | None = None) -> None:
    """Write the frames of one stripe as its chunks become present (TransferAborted if the
    image stops arriving; TimeoutError after `idle_timeout` seconds without a new chunk).

    With a plain (non-TLS) `sock`, chunk bytes go from the page cache to the socket
    with sendfile: a relaying node never copies them through Python."""
    if sock is not None and isinstance(sock, ssl.SSLSocket):
        sock = None  # TLS encrypts in user space: no sendfile
    with os.fdopen(os.dup(partial.fileno()), "rb") as f:
        for i in stripe_indices(partial, stripe, of, start):
            waited = 0.0
            while not partial.wait(i, WAIT_STEP):
                waited += WAIT_STEP
                if waited >= idle_timeout:
                    raise TimeoutError(f"chunk {i} did not arrive within {idle_timeout:.0f} s")
            n = partial.chunk_length(i)
            if sock is not None:
                sock.sendall(FRAME.pack(i, n))
                # socket.sendfile waits for the socket itself (it may be non-blocking).
                if sock.sendfile(f, i * partial.chunk_size, n) != n:
                    raise ConnectionError("the image file ended early")
            else:
                write(FRAME.pack(i, n) + partial.read(i))
            if on_sent is not None:
                on_sent(n)


def read_frames(resp: http.client.HTTPResponse, max_length: int) -> Iterator[tuple[int, bytes]]:
    """(index, data) of each frame of a stripe response; ConnectionError if cut mid-frame."""
    while True:
        head = _read_exact(resp, FRAME.size, allow_eof=True)
        if head is None:
            return
        index, length = FRAME.unpack(head)
        if length > max_length:
            raise ConnectionError(f"peer sent a frame of {length} bytes (chunks are at most "
                                  f"{max_length})")
        data = _read_exact(resp, length, allow_eof=False)
        assert data is not None
        yield index, data


def _read_exact(resp: http.client.HTTPResponse, n: int, *, allow_eof: bool) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = resp.readinto(view[got:])
        if not k:
            if got == 0 and allow_eof:
                return None
            raise ConnectionError(f"peer closed the stream {got} bytes into a {n}-byte read")
        got += k
    return bytes(buf)
