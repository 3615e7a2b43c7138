"""What one upload may cost the server: size cap, client gone, uploads per user, SIGTERM.

Real `rain serve` processes on loopback, driven over raw sockets so a test
controls exactly what the client sends and when it goes away. No wall-clock
assertions: "refused before any hashing" is shown by the server answering
before the body (or the sparse map) was even sent; "stops promptly" by the
image reaching `killed` and the worker's slot being free again, within a
generous liveness bound.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from rain.api.sparse import SparseBodyReader
from rain.client import Client
from rain.model.errors import ImageTooLarge
from rain.model.sparse import MEDIA_TYPE, SparseHeader, map_length
from rain.repo import Repository
from rain.repo.config import RepoConfig
from tests.conftest import Server, start_server, stop_server

pytestmark = pytest.mark.integration
MiB = 1024 * 1024
TiB = 1024**4
LIVENESS = 60.0  # seconds: a bound on "eventually", never a speed claim


# -- raw HTTP ----------------------------------------------------------------------------------

def connect(server: Server) -> socket.socket:
    parts = urlsplit(server.url)
    return socket.create_connection((parts.hostname, parts.port), timeout=LIVENESS)


def put_head(sock: socket.socket, ref: str, token: str, length: int | None,
             content_type: str = "application/octet-stream") -> None:
    lines = [f"PUT /v1/images/{ref}/file HTTP/1.1", "Host: rain",
             f"Authorization: Bearer {token}", f"Content-Type: {content_type}"]
    lines.append(f"Content-Length: {length}" if length is not None
                 else "Transfer-Encoding: chunked")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())


def read_reply(sock: socket.socket) -> tuple[int, dict[str, str], dict]:  # type: ignore[type-arg]
    """Status, headers and JSON body of one response (Content-Length framed)."""
    f = sock.makefile("rb")
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline().strip()):
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    body = f.read(int(headers.get("content-length", "0")))
    return status, headers, json.loads(body or b"{}")


def all_zeros(size: int, segment: int = 4 * MiB) -> bytes:
    """The whole sparse body of an image of `size` zeros: header and an empty map."""
    return SparseHeader(segment, size, 0, bytes(map_length(size, segment))).pack()


def wait_status(server: Server, ref: str, wanted: str) -> str:
    """The image's status once it is `wanted` (or the last seen); as admin, who sees killed."""
    c = Client(server.url, server.token)
    deadline = time.monotonic() + LIVENESS
    status = c.show(ref)["status"]
    while status != wanted and time.monotonic() < deadline:
        time.sleep(0.1)
        status = c.show(ref)["status"]
    return str(status)


def user(server: Server, name: str) -> str:
    return str(Client(server.url, server.token).create_user(name)["token"])


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One upload at a time per user, two on the server, images up to 4 MiB."""
    s = start_server(tmp_path_factory.mktemp("rain-capped"), extra_env={
        "RAIN_REPO__MAX_UPLOADS_PER_USER": "1", "RAIN_REPO__MAX_UPLOADS": "2",
        "RAIN_REPO__MAX_IMAGE_SIZE": str(4 * MiB)})
    try:
        yield s
    finally:
        stop_server(s.proc)


# -- max_image_size ----------------------------------------------------------------------------

def test_sparse_upload_declaring_over_the_cap_is_refused_before_its_map(server: Server) -> None:
    """2 TiB of declared zeros (over the default 1 TiB cap): 413 from the 28-byte header alone —
    the map and data are never sent, so the server cannot have hashed anything."""
    c = Client(server.url, server.token)
    image = c.create_image(name="huge-sparse")
    size = 2 * TiB
    head = all_zeros(size)
    with connect(server) as sock:
        put_head(sock, image["id"], server.token, len(head), MEDIA_TYPE)
        sock.sendall(head[:28])  # the fixed header; the 64 KiB map never follows
        status, _, reply = read_reply(sock)
    assert status == 413, reply
    assert reply["error"]["code"] == "image_too_large"
    message = reply["error"]["message"]
    assert "max_image_size" in message and "2.0 TiB" in message and "\n" not in message
    assert wait_status(server, image["id"], "killed") == "killed"


def test_plain_upload_declaring_over_the_cap_is_refused_before_its_body(server: Server) -> None:
    c = Client(server.url, server.token)
    image = c.create_image(name="huge-plain")
    with connect(server) as sock:
        put_head(sock, image["id"], server.token, 2 * TiB)  # and not one byte of it
        status, _, reply = read_reply(sock)
    assert status == 413 and reply["error"]["code"] == "image_too_large", reply
    assert wait_status(server, image["id"], "killed") == "killed"


def test_uvicorn_front_end_applies_the_cap_declared_and_as_bytes_arrive(tmp_path: Path) -> None:
    s = start_server(tmp_path / "uv", args=("--server", "uvicorn"),
                     extra_env={"RAIN_REPO__MAX_IMAGE_SIZE": str(4 * MiB)})
    try:
        c = Client(s.url, s.token)
        image = c.create_image(name="huge-uvicorn")
        with connect(s) as sock:
            put_head(sock, image["id"], s.token, 2 * TiB)
            status, _, reply = read_reply(sock)
        assert status == 413 and reply["error"]["code"] == "image_too_large", reply
        assert wait_status(s, image["id"], "killed") == "killed"
        grows = c.create_image(name="grows-uvicorn")
        with connect(s) as sock:
            put_head(sock, grows["id"], s.token, None)  # chunked: nothing declared
            piece = os.urandom(MiB)
            for _ in range(8):
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sock.sendall(b"0\r\n\r\n")
            status, _, reply = read_reply(sock)
        assert status == 413 and reply["error"]["code"] == "image_too_large", reply
        assert wait_status(s, grows["id"], "killed") == "killed"
    finally:
        stop_server(s.proc)


def test_an_image_over_the_cap_is_stopped_as_its_bytes_arrive(capped: Server,
                                                              tmp_path: Path) -> None:
    """Chunked (no declared size): the cap holds as bytes arrive; exactly the cap is fine."""
    token = user(capped, "grower")
    c = Client(capped.url, token)
    image = c.create_image(name="grows")
    with connect(capped) as sock:
        put_head(sock, image["id"], token, None)
        piece = os.urandom(MiB)
        for _ in range(8):  # twice the cap
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        sock.sendall(b"0\r\n\r\n")
        status, _, reply = read_reply(sock)
    assert status == 413 and reply["error"]["code"] == "image_too_large", reply
    assert wait_status(capped, image["id"], "killed") == "killed"
    exact = tmp_path / "exact.raw"
    exact.write_bytes(os.urandom(4 * MiB))
    assert c.push(exact, name="exactly-the-cap")["size"] == 4 * MiB
    over = tmp_path / "over.raw"
    over.write_bytes(os.urandom(4 * MiB + 1))
    with pytest.raises(ImageTooLarge, match="max_image_size"):
        c.push(over, name="one-byte-over")


def test_upload_file_refuses_a_file_over_the_cap_before_reading_it(tmp_path: Path) -> None:
    """The builders' path: the file's size is the declared size."""
    repo = Repository.open(tmp_path / "data", f"sqlite:///{tmp_path / 'c.db'}",
                           config=RepoConfig(max_image_size=MiB))
    try:
        owner, _ = repo.local_create_user("builder")
        image = repo.create(owner, {"name": "built"})
        disk = tmp_path / "disk.raw"
        with open(disk, "wb") as f:
            f.truncate(TiB)  # a sparse terabyte: reading it would take minutes
        with pytest.raises(ImageTooLarge, match=r"1\.0 TiB"):
            repo.upload_file(owner, image.id, disk)
        assert repo.catalog.get_image(image.id).status == "killed"
        assert repo.upload_slots.active() == 0
    finally:
        repo.close()


def test_a_build_upload_is_not_held_up_by_the_users_pushes(tmp_path: Path) -> None:
    """Builds are bounded by `[build] max_concurrent`: one must not fail at its end because
    its owner's pushes hold every upload slot."""
    repo = Repository.open(tmp_path / "data", f"sqlite:///{tmp_path / 'c.db'}",
                           config=RepoConfig(max_uploads_per_user=1))
    try:
        owner, _ = repo.local_create_user("builder")
        pushing, _ = repo.begin_upload(owner, repo.create(owner, {"name": "pushed"}).id)
        assert repo.upload_slots.active("builder") == 1
        disk = tmp_path / "disk.raw"
        disk.write_bytes(os.urandom(MiB))
        built = repo.upload_file(owner, repo.create(owner, {"name": "built"}).id, disk)
        assert built.status == "active"
        assert repo.upload_slots.active("builder") == 1  # the push still holds its own
        repo.end_upload(pushing, None)
        assert repo.upload_slots.active() == 0
    finally:
        repo.close()


def test_a_huge_hole_is_skipped_without_walking_its_segments() -> None:
    """1 TiB in 4 KiB segments is 268 million of them: finding the end of a run of absent
    ones scans the map's bytes (in C), it does not loop over segments in Python."""
    size, segment = TiB, 4096
    count = size // segment
    present = bytearray(map_length(size, segment))
    present[-1] = 0x80  # only the last segment holds data
    data = os.urandom(segment)
    body = _Body(SparseHeader(segment, size, 0, bytes(present)).pack() + data)
    reader = SparseBodyReader(body, max_size=size, max_map=len(present))  # over the server's
    got: list[int] = []

    def walk() -> None:
        zeros = reader.zero_run()
        reader.skip(zeros)
        got.append(zeros)
        buf = memoryview(bytearray(segment))
        got.append(reader.readinto(buf))

    t = threading.Thread(target=walk, daemon=True)
    t.start()
    t.join(LIVENESS)
    assert not t.is_alive(), "skipping the hole walked its segments"
    assert got == [(count - 1) * segment, segment] and reader.done


class _Body:
    def __init__(self, data: bytes) -> None:
        self.view = memoryview(data)
        self.remaining: int | None = len(data)
        self.done = False

    def readinto(self, view: memoryview) -> int:
        n = min(len(view), len(self.view))
        view[:n] = self.view[:n]
        self.view = self.view[n:]
        self.remaining = len(self.view)
        self.done = not self.view
        return n


# -- uploads in progress per user and on the server --------------------------------------------

def test_per_user_and_server_upload_caps(capped: Server, tmp_path: Path) -> None:
    ann, ben, cat = (user(capped, n) for n in ("ann", "ben", "cat"))
    imgs = {who: [Client(capped.url, tok).create_image(name=f"{who}-{i}")["id"] for i in range(2)]
            for who, tok in (("ann", ann), ("ben", ben), ("cat", cat))}
    with connect(capped) as first:
        put_head(first, imgs["ann"][0], ann, 2 * MiB)
        first.sendall(os.urandom(MiB + 1))  # past the header: the upload is under way
        assert wait_status(capped, imgs["ann"][0], "saving") == "saving"
        with connect(capped) as second:  # ann again: over her cap of 1
            put_head(second, imgs["ann"][1], ann, 2 * MiB)
            status, headers, reply = read_reply(second)
        assert status == 429, reply
        assert reply["error"]["code"] == "too_many_requests"
        assert "max_uploads_per_user = 1" in reply["error"]["message"]
        assert int(headers["retry-after"]) > 0
        assert Client(capped.url, ann).show(imgs["ann"][1])["status"] == "queued"  # untouched
        with connect(capped) as same:  # the same image twice: 409, and her slot stays taken
            put_head(same, imgs["ann"][0], ann, 2 * MiB)
            assert read_reply(same)[0] == 409
        with connect(capped) as again:
            put_head(again, imgs["ann"][1], ann, 2 * MiB)
            assert read_reply(again)[0] == 429
        with connect(capped) as other:  # ben is not held up by ann ...
            put_head(other, imgs["ben"][0], ben, 2 * MiB)
            other.sendall(os.urandom(MiB + 1))
            assert wait_status(capped, imgs["ben"][0], "saving") == "saving"
            with connect(capped) as third:  # ... but the server's cap of 2 holds cat up
                put_head(third, imgs["cat"][0], cat, 2 * MiB)
                status, _, reply = read_reply(third)
            assert status == 429 and "max_uploads = 2" in reply["error"]["message"], reply
            other.sendall(os.urandom(MiB - 1))
            assert read_reply(other)[0] == 200
        first.sendall(os.urandom(MiB - 1))
        assert read_reply(first)[0] == 200
    small = tmp_path / "small.raw"
    small.write_bytes(os.urandom(MiB))
    assert Client(capped.url, ann).upload(imgs["ann"][1], small)["status"] == "active"


def test_rain_client_waits_for_a_free_slot_when_told_to_retry(capped: Server,
                                                             tmp_path: Path) -> None:
    """429 carries Retry-After; rain's client waits and pushes again by itself."""
    token = user(capped, "patient")
    c = Client(capped.url, token)
    held, waiting = (c.create_image(name=n)["id"] for n in ("held", "waiting"))
    small = tmp_path / "small.raw"
    small.write_bytes(os.urandom(MiB))
    outcome: list[object] = []
    with connect(capped) as sock:
        put_head(sock, held, token, 2 * MiB)
        sock.sendall(os.urandom(MiB + 1))
        assert wait_status(capped, held, "saving") == "saving"
        t = threading.Thread(target=lambda: outcome.append(Client(capped.url, token).upload(
            waiting, small)), daemon=True)
        t.start()
        time.sleep(1)
        assert not outcome and Client(capped.url, token).show(waiting)["status"] == "queued"
        sock.sendall(os.urandom(MiB - 1))
        assert read_reply(sock)[0] == 200
    t.join(LIVENESS)
    assert outcome and outcome[0]["status"] == "active", outcome  # type: ignore[index]


# -- the client goes away ----------------------------------------------------------------------

@pytest.mark.parametrize("how", ["close", "reset"])
def test_client_gone_while_declared_zeros_hash_kills_the_image_and_frees_the_worker(
        tmp_path: Path, how: str) -> None:
    """512 GiB of declared zeros would be minutes of SHA-256; the client leaves after sending
    its whole (small) body: the hashing must notice, the image end killed, and the user's
    only upload slot be free for the next push."""
    s = start_server(tmp_path / "srv", extra_env={"RAIN_REPO__MAX_UPLOADS_PER_USER": "1"})
    try:
        token = user(s, "leaver")
        c = Client(s.url, token)
        image = c.create_image(name="left")
        size = 512 * 1024**3
        body = all_zeros(size)
        sock = connect(s)
        put_head(sock, image["id"], token, len(body), MEDIA_TYPE)
        sock.sendall(body)
        assert wait_status(s, image["id"], "saving") == "saving"
        time.sleep(2)  # let the server get into the zeros
        if how == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        assert wait_status(s, image["id"], "killed") == "killed"
        small = tmp_path / "next.raw"
        small.write_bytes(os.urandom(MiB))
        again = c.create_image(name="next")
        with connect(s) as sock2:  # raw: a 429 must fail here, not be retried
            put_head(sock2, again["id"], token, MiB)
            sock2.sendall(small.read_bytes())
            status, _, reply = read_reply(sock2)
        assert status == 200 and reply["status"] == "active", reply
        assert "interrupted" in s.log.read_text()
    finally:
        stop_server(s.proc)


def test_client_gone_mid_body_kills_the_image_and_frees_the_worker(capped: Server) -> None:
    token = user(capped, "quitter")
    c = Client(capped.url, token)
    image = c.create_image(name="half")
    with connect(capped) as sock:
        put_head(sock, image["id"], token, 3 * MiB)
        sock.sendall(os.urandom(MiB + 10))
        assert wait_status(capped, image["id"], "saving") == "saving"
    assert wait_status(capped, image["id"], "killed") == "killed"
    again = c.create_image(name="whole")
    with connect(capped) as sock:
        put_head(sock, again["id"], token, MiB)
        sock.sendall(os.urandom(MiB))
        status, _, reply = read_reply(sock)
    assert status == 200, reply


def test_clients_gone_mid_way_through_large_uploads_never_use_up_the_slots(
        tmp_path: Path) -> None:
    """Past the first buffers (over 8 MiB: the pool then unmaps spare blocks while the
    interrupted read still holds a view of one), a client leaving must still free its slot.
    One slot on the whole server: any leak and the next push is 429."""
    s = start_server(tmp_path / "srv", extra_env={
        "RAIN_REPO__MAX_UPLOADS_PER_USER": "1", "RAIN_REPO__MAX_UPLOADS": "1"})
    try:
        token = user(s, "flaky")
        c = Client(s.url, token)
        for i in range(3):
            image = c.create_image(name=f"cut-{i}")
            with connect(s) as sock:
                put_head(sock, image["id"], token, 200 * MiB)
                for _ in range(40):
                    sock.sendall(os.urandom(MiB))
                assert wait_status(s, image["id"], "saving") == "saving"
            assert wait_status(s, image["id"], "killed") == "killed"
        whole = c.create_image(name="whole")
        with connect(s) as sock:
            put_head(sock, whole["id"], token, MiB)
            sock.sendall(os.urandom(MiB))
            status, _, reply = read_reply(sock)
        assert status == 200 and reply["status"] == "active", reply
        log = s.log.read_text()
        assert "BufferError" not in log and "Traceback" not in log, log[-2000:]
    finally:
        stop_server(s.proc)


def test_a_sparse_map_too_large_for_its_image_is_refused_before_it_is_read(
        server: Server) -> None:
    """1 TiB in 4 KiB segments is a 32 MiB map: 28 bytes must not buy that buffer."""
    c = Client(server.url, server.token)
    image = c.create_image(name="fine-grained")
    head = struct.pack(">8sIQII", b"RAINSPv1", 4096, TiB, 0, map_length(TiB, 4096))
    assert map_length(TiB, 4096) == 32 * MiB
    with connect(server) as sock:
        put_head(sock, image["id"], server.token, 28 + 32 * MiB, MEDIA_TYPE)
        sock.sendall(head)  # the map never follows
        status, _, reply = read_reply(sock)
    assert status == 400, reply
    message = reply["error"]["message"]
    assert "segments of at least 131072 bytes" in message and "\n" not in message
    assert wait_status(server, image["id"], "killed") == "killed"


# -- SIGTERM -----------------------------------------------------------------------------------

def test_sigterm_stops_the_server_while_declared_zeros_hash(tmp_path: Path) -> None:
    """3.5 TiB of declared zeros (under a cap raised to 4 TiB) is an hour of hashing; SIGTERM
    must still end the process, the image killed and the client told why (503)."""
    s = start_server(tmp_path / "srv", extra_env={"RAIN_REPO__MAX_IMAGE_SIZE": str(4 * TiB)})
    try:
        c = Client(s.url, s.token)
        image = c.create_image(name="endless")
        size = 3 * TiB + TiB // 2
        body = all_zeros(size)
        with connect(s) as sock:
            put_head(sock, image["id"], s.token, len(body), MEDIA_TYPE)
            sock.sendall(body)
            assert wait_status(s, image["id"], "saving") == "saving"
            time.sleep(2)  # into the zeros (before that, the old code exited too)
            s.proc.send_signal(signal.SIGTERM)
            try:
                code = s.proc.wait(LIVENESS)
            except subprocess.TimeoutExpired:
                pytest.fail("rain serve kept running after SIGTERM")
            status, headers, reply = read_reply(sock)
        assert code == 0
        assert status == 503 and "shutting down" in reply["error"]["message"], reply
        assert "retry-after" in headers
    finally:
        stop_server(s.proc)
    restarted = start_server(tmp_path / "srv")
    try:
        assert Client(restarted.url, restarted.token).show(image["id"])["status"] == "killed"
    finally:
        stop_server(restarted.proc)
