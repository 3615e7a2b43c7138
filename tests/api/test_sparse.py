"""The sparse transfer encoding end to end: a real server on loopback, real files with holes.

Covers the client's zero scan, both directions, that holes stay holes, that
the plain encoding is still what curl and Range requests get, bad sparse
bodies (one-line 400, no image left behind), and a client that refuses a
segment whose bytes do not match its digest.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rain.client import Client
from rain.client.sparse import SEGMENT, runs, scan
from rain.model import Conflict, InvalidImage
from rain.model.sparse import DIGESTS, MEDIA_TYPE, SparseHeader, bitmap
from tests.conftest import Server
from tests.support.images import sha256
from tests.support.servers import serve_http

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


def holey(path: Path, size: int = 8 * MiB, seed: int = 5) -> Path:
    """Data at a few places, written zeros (allocated, not holes), holes, a partial last segment."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(0)
        f.write(rnd.randbytes(SEGMENT + 100))  # segments 0 and 1
        f.seek(3 * SEGMENT)
        f.write(bytes(2 * SEGMENT))  # allocated zeros: segments 3, 4 absent
        f.seek(6 * SEGMENT + 7)
        f.write(b"x")  # one byte makes segment 6 present
        f.seek(size - 10)
        f.write(rnd.randbytes(10))  # last segment
    return path


def test_scan_finds_exactly_the_nonzero_segments(tmp_path: Path) -> None:
    img = holey(tmp_path / "h.raw", size=8 * MiB + 4096)
    header = scan(img)
    last = header.count - 1
    assert header.present_indices() == [0, 1, 6, last]
    assert header.segment_length(last) == 4096
    assert runs(header) == [(0, 2 * SEGMENT), (6 * SEGMENT, SEGMENT), (last * SEGMENT, 4096)]
    assert header.data_length() == 3 * SEGMENT + 4096


def test_push_and_pull_sparse_keep_bytes_and_holes(server: Server, tmp_path: Path) -> None:
    c = Client(server.url, server.token)
    img = holey(tmp_path / "h.raw", size=16 * MiB + 512)
    pushed = c.push(img, name="holey")
    assert pushed["sha256"] == sha256(img) and pushed["size"] == img.stat().st_size
    out = tmp_path / "out.raw"
    got = c.pull(pushed["id"], out)
    assert got["sha256"] == sha256(out) == sha256(img)
    assert out.stat().st_size == img.stat().st_size
    # Only the four present segments were written: the copy is sparse.
    assert out.stat().st_blocks * 512 <= 4 * SEGMENT + 64 * 1024
    # The plain path is unchanged for clients that do not ask for sparse.
    plain = Client(server.url, server.token, sparse=False)
    plain.pull(pushed["id"], tmp_path / "plain.raw")
    assert sha256(tmp_path / "plain.raw") == sha256(img)
    assert c.get_range(pushed["id"], SEGMENT + 90, SEGMENT + 110) == \
        img.read_bytes()[SEGMENT + 90 : SEGMENT + 110]


def test_sparse_response_is_what_its_headers_say(server: Server, tmp_path: Path) -> None:
    c = Client(server.url, server.token)
    img = holey(tmp_path / "h.raw")
    image = c.push(img, name="holey-headers")
    conn = http.client.HTTPConnection(server.url.split("//")[1])
    conn.request("GET", f"/v1/images/{image['id']}/file",
                 headers={"Authorization": f"Bearer {server.token}", "Accept": MEDIA_TYPE})
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 200 and resp.getheader("Content-Type") == MEDIA_TYPE
    assert int(resp.getheader("Content-Length") or 0) == len(body)
    assert resp.getheader("X-Rain-Sha256") == image["sha256"]
    assert resp.getheader("ETag") != f'"{image["sha256"]}"'  # another representation
    magic, segment, size, flags, map_len = struct.unpack(">8sIQII", body[:28])
    assert (magic, size, flags) == (b"RAINSPv1", img.stat().st_size, DIGESTS)
    present = [i for i in range(-(-size // segment))
               if body[28 + i // 8] >> (i % 8) & 1]
    data = body[28 + map_len + 32 * len(present):]
    raw = img.read_bytes()
    assert data == b"".join(raw[i * segment:(i + 1) * segment] for i in present)
    conn.close()


def _put(server: Server, ref: str, body: bytes, length: int | None = None) -> tuple[int, dict]:  # type: ignore[type-arg]
    conn = http.client.HTTPConnection(server.url.split("//")[1])
    conn.putrequest("PUT", f"/v1/images/{ref}/file")
    conn.putheader("Authorization", f"Bearer {server.token}")
    conn.putheader("Content-Type", MEDIA_TYPE)
    conn.putheader("Content-Length", str(len(body) if length is None else length))
    conn.endheaders()
    try:
        conn.send(body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def _head(size: int, present: list[bool], segment: int = 65536, flags: int = 0) -> bytes:
    return SparseHeader(segment, size, flags, bitmap(present)).pack()


@pytest.mark.parametrize(("body", "message"), [
    (b"NOTRAIN!" + bytes(20), "bad magic"),
    (struct.pack(">8sIQII", b"RAINSPv1", 1000, 65536, 0, 1) + b"\x00", "power of two"),
    (struct.pack(">8sIQII", b"RAINSPv1", 65536, 65536 * 4, 0, 9) + bytes(9), "map of 9 bytes"),
    (_head(65536 * 3, [True, False, False])[:-1] + b"\x0f" + bytes(65536), "past the end"),
    (_head(65536 * 2, [True, False]) + bytes(100), "map says"),
    (_head(65536 * 2, [False, False], flags=DIGESTS), "computes digests"),
])
def test_bad_sparse_bodies_are_refused(server: Server, body: bytes, message: str) -> None:
    c = Client(server.url, server.token)
    image = c.create_image(name="bad-sparse")
    status, reply = _put(server, image["id"], body)
    assert status == 400, reply
    assert message in reply["error"]["message"] and "\n" not in reply["error"]["message"]
    assert c.show(image["id"])["status"] != "active"


def test_sparse_upload_cut_off_leaves_no_image(server: Server, tmp_path: Path) -> None:
    c = Client(server.url, server.token)
    image = c.create_image(name="cut-sparse")
    head = _head(65536 * 4, [True, True, True, True])
    # Promise four segments, send one and a bit, hang up.
    conn = http.client.HTTPConnection(server.url.split("//")[1])
    conn.putrequest("PUT", f"/v1/images/{image['id']}/file")
    conn.putheader("Authorization", f"Bearer {server.token}")
    conn.putheader("Content-Type", MEDIA_TYPE)
    conn.putheader("Content-Length", str(len(head) + 4 * 65536))
    conn.endheaders()
    conn.send(head + random.Random(1).randbytes(65536 + 10))
    conn.close()
    for _ in range(200):
        if c.show(image["id"])["status"] not in ("queued", "saving"):
            break
        threading.Event().wait(0.05)
    assert c.show(image["id"])["status"] == "killed"
    with pytest.raises(Conflict):
        c.pull(image["id"], tmp_path / "never")
    assert not (tmp_path / "never").exists()


class _LyingServer(BaseHTTPRequestHandler):
    """Sends a well-formed sparse body whose second segment does not match its digest."""

    segments = [b"a" * 4096, b"b" * 4096]

    def do_GET(self) -> None:
        digests = [hashlib.sha256(s).digest() for s in self.segments]
        data = [self.segments[0], b"c" * 4096]  # tampered in transit
        body = SparseHeader(4096, 8192, DIGESTS, bitmap([True, True])).pack() + \
            b"".join(digests) + b"".join(data)
        self.send_response(200)
        self.send_header("Content-Type", MEDIA_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Rain-Sha256", hashlib.sha256(b"".join(self.segments)).hexdigest())
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def lying_server() -> Iterator[str]:
    yield from serve_http(ThreadingHTTPServer(("127.0.0.1", 0), _LyingServer))


def test_client_refuses_a_segment_that_does_not_match_its_digest(lying_server: str,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "out.raw"
    with pytest.raises(InvalidImage, match=r"chunk 1 \(offset 4096\) does not match"):
        Client(lying_server, "t").pull("x", out)
    assert not out.exists() and not list(tmp_path.iterdir())
