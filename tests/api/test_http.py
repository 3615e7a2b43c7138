"""HTTP details of the native front end, and the same API on uvicorn (pure ASGI)."""

from __future__ import annotations

import http.client
import json
import subprocess
from pathlib import Path

import pytest

from rain.client import Client
from rain.model.errors import InvalidImage
from tests.conftest import Server, start_server, stop_server
from tests.support.images import make_raw, sha256

pytestmark = pytest.mark.integration


def _conn(server: Server) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=30)


def test_chunked_upload_and_keep_alive(server: Server, tmp_path: Path) -> None:
    c = Client(server.url, server.token)
    image = c.create_image(name="chunked")
    data = make_raw(tmp_path / "c.raw", size=3 * 1024 * 1024 + 5, seed=41,
                    data_fraction=1.0).read_bytes()
    conn = _conn(server)
    auth = {"Authorization": f"Bearer {server.token}"}

    def pieces():  # type: ignore[no-untyped-def]
        for off in range(0, len(data), 100_000):
            yield data[off : off + 100_000]

    conn.request("PUT", f"/v1/images/{image['id']}/file", body=pieces(),
                 headers={**auth, "Transfer-Encoding": "chunked"}, encode_chunked=True)
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 200 and body["size"] == len(data)
    # the same connection serves more requests: API, HEAD and data
    conn.request("GET", f"/v1/images/{image['id']}", headers=auth)
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["status"] == "active"
    conn.request("HEAD", f"/v1/images/{image['id']}/file", headers=auth)
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200 and int(resp.getheader("Content-Length")) == len(data)
    conn.request("GET", f"/v1/images/{image['id']}/file", headers=auth)
    resp = conn.getresponse()
    assert resp.read() == data
    conn.close()


def test_curl_upload_with_expect_continue(server: Server, tmp_path: Path) -> None:
    img = make_raw(tmp_path / "curl.raw", size=2 * 1024 * 1024, seed=42)
    image = Client(server.url, server.token).create_image(name="curl")
    out = subprocess.run(
        ["curl", "-sS", "-f", "-T", str(img), "-H", f"Authorization: Bearer {server.token}",
         "-H", "Expect: 100-continue", f"{server.url}/v1/images/{image['id']}/file"],
        capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["sha256"] == sha256(img)
    got = subprocess.run(["curl", "-sS", "-f", "-H", f"Authorization: Bearer {server.token}",
                          "-r", "100-199", f"{server.url}/v1/images/curl/file"],
                         capture_output=True, check=True).stdout
    assert got == img.read_bytes()[100:200]


def test_same_api_on_uvicorn(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", args=("--server", "uvicorn"))
    try:
        c = Client(server.url, server.token)
        img = make_raw(tmp_path / "u.raw", size=2 * 1024 * 1024, seed=43)
        pushed = c.push(img, name="on-uvicorn")
        c.pull(pushed["id"], tmp_path / "out")
        assert sha256(tmp_path / "out") == sha256(img)
        assert c.get_range(pushed["id"], 5, 10) == img.read_bytes()[5:10]
        with pytest.raises(InvalidImage):
            c.push(img, name="lie", disk_format="qcow2")
    finally:
        stop_server(server.proc)


def test_concurrent_pushes_and_pulls(server: Server, tmp_path: Path) -> None:
    """Threads per connection share the store, the catalog and the buffer pool safely."""
    from concurrent.futures import ThreadPoolExecutor

    c = Client(server.url, server.token)
    shared = make_raw(tmp_path / "shared.raw", size=4 * 1024 * 1024, seed=50, data_fraction=1.0)
    images = [make_raw(tmp_path / f"i{i}.raw", size=6 * 1024 * 1024, seed=60 + i) for i in range(4)]

    def push(i: int) -> dict:  # type: ignore[type-arg]
        # half of the pushes race on identical content (same chunks at the same time)
        return Client(server.url, server.token).push(images[i % 4] if i % 2 else shared,
                                                     name=f"concurrent-{i}")

    with ThreadPoolExecutor(6) as pool:
        pushed = list(pool.map(push, range(6)))
    for i, image in enumerate(pushed):
        src = images[i % 4] if i % 2 else shared
        assert image["sha256"] == sha256(src)

    def pull(i: int) -> str:
        out = tmp_path / f"out{i}.raw"
        Client(server.url, server.token).pull(pushed[i]["id"], out)
        return sha256(out)

    with ThreadPoolExecutor(6) as pool:
        digests = list(pool.map(pull, range(6)))
    assert digests == [image["sha256"] for image in pushed]
    assert c.images(name="concurrent-*")["total"] == 6
