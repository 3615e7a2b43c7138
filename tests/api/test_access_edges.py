"""What the edges of the API show to whom, through a real `rain serve`: node caches list
only what the viewer may see, anonymous requests are 401 wherever the docs say so, and
methods a path does not take are a JSON 405 (not the stdlib's 501 HTML page)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rain.client import Client
from rain.repo import Repository
from tests.conftest import Server, start_server, stop_server
from tests.support.images import make_raw

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tokens(server: Server) -> dict[str, str]:
    admin = Client(server.url, server.token)
    return {"admin": server.token, **{n: admin.create_user(n)["token"] for n in ("eve", "fay")}}


def test_node_caches_show_each_viewer_only_their_images(server: Server, tokens: dict[str, str],
                                                        tmp_path: Path) -> None:
    eve, fay = Client(server.url, tokens["eve"]), Client(server.url, tokens["fay"])
    private = eve.push(make_raw(tmp_path / "a.raw", size=1 << 20, seed=80), name="eve-secret")
    public = eve.push(make_raw(tmp_path / "b.raw", size=1 << 20, seed=81), name="eve-pub",
                      visibility="public")
    fays = fay.push(make_raw(tmp_path / "c.raw", size=1 << 20, seed=82), name="fay-secret")
    admin = Client(server.url, tokens["admin"])
    admin.register_node({"name": "vis-n1", "address": "http://127.0.0.1:9", "agent_key": "v" * 20,
                         "cached": [private["id"], public["id"]], "in_flight": [fays["id"]]})

    def seen(c: Client) -> tuple[list[str], list[str]]:
        listed = {n["name"]: n for n in c.nodes()}["vis-n1"]
        one = c.node("vis-n1")
        assert (one["cached"], one["in_flight"]) == (listed["cached"], listed["in_flight"])
        return listed["cached"], listed["in_flight"]

    assert seen(eve) == ([private["id"], public["id"]], [])
    assert seen(fay) == ([public["id"]], [fays["id"]])
    assert seen(admin) == ([private["id"], public["id"]], [fays["id"]])
    raw = httpx.get(f"{server.url}/v1/nodes", headers={"Authorization": f"Bearer {tokens['fay']}"})
    assert private["id"] not in raw.text


ANONYMOUS_401 = [
    ("GET", "/v1/builds/{id}"), ("GET", "/v1/builds"), ("POST", "/v1/builds/{id}/cancel"),
    ("GET", "/v1/images"), ("GET", "/v1/images/{id}"), ("GET", "/v1/images/{id}/file"),
    ("HEAD", "/v1/images/{id}/file"), ("GET", "/v1/images/{id}/manifest"),
    ("GET", "/v1/images/{id}/pedigree"), ("GET", "/v1/nodes"), ("GET", "/v1/nodes/n1"),
    ("GET", "/v1/deployments"), ("GET", "/v1/deployments/{id}"), ("GET", "/v1/instances"),
    ("GET", "/v1/instances/{id}"), ("GET", "/v1/usage"), ("GET", "/v1/users/me"),
    ("POST", "/v1/match"), ("DELETE", "/v1/images/{id}"), ("PATCH", "/v1/images/{id}"),
]


@pytest.mark.parametrize(("method", "path"), ANONYMOUS_401)
def test_anonymous_requests_are_401(server: Server, method: str, path: str) -> None:
    body = {} if method in ("POST", "PATCH") else None
    resp = httpx.request(method, server.url + path.format(id=uuid.uuid4()), json=body)
    assert resp.status_code == 401, (resp.status_code, resp.text)
    assert resp.headers["www-authenticate"] == "Bearer"
    if method != "HEAD":
        assert resp.json()["error"]["code"] == "unauthorized"


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("anon-read"),
                     extra_env={"RAIN_REPO__ANONYMOUS_READ": "true"})
    try:
        yield s
    finally:
        stop_server(s.proc)


def test_anonymous_read_shows_builds_of_public_images_only(open_server: Server,
                                                           tmp_path: Path) -> None:
    admin = Client(open_server.url, open_server.token)
    public = admin.push(make_raw(tmp_path / "p.raw", size=1 << 20, seed=90), name="open",
                        visibility="public")["id"]
    private = admin.push(make_raw(tmp_path / "q.raw", size=1 << 20, seed=91), name="closed")["id"]
    repo = Repository.open(open_server.data_dir,
                           f"sqlite:///{open_server.data_dir / 'catalog.db'}")
    try:
        owner = repo.catalog.get_user("admin")
        ids = [repo.catalog.create_build(owner, template_digest="f" * 64, template="name: x\n",
                                         image_id=image_id).id for image_id in (public, private)]
    finally:
        repo.close()
    assert httpx.get(f"{open_server.url}/v1/builds/{ids[0]}").status_code == 200
    assert httpx.get(f"{open_server.url}/v1/builds/{ids[1]}").status_code == 404
    assert httpx.get(f"{open_server.url}/v1/builds/{ids[0][:8]}").json()["id"] == ids[0]
    assert httpx.get(f"{open_server.url}/v1/builds/{ids[1][:8]}").status_code == 404
    assert httpx.get(f"{open_server.url}/v1/images/{public}").status_code == 200
    # still no lists of builds or nodes without a token
    assert httpx.get(f"{open_server.url}/v1/builds").status_code == 401
    assert httpx.get(f"{open_server.url}/v1/nodes").status_code == 401


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("PROPFIND", "/v1/images", "GET, POST"),
    ("BREW", "/v1/health", "GET"),
    ("BREW", "/v1/images/x/file", "GET, HEAD, PUT"),
    ("PROPFIND", "/v1/images/x", "GET, PATCH, DELETE"),
    ("PUT", "/v1/builds", "GET, POST"),
    ("DELETE", "/v1/nodes", "GET, POST"),
])
def test_methods_a_path_does_not_take_are_json_405(server: Server, method: str, path: str,
                                                   allow: str) -> None:
    resp = httpx.request(method, server.url + path,
                         headers={"Authorization": f"Bearer {server.token}"})
    assert resp.status_code == 405
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["allow"] == allow
    err = resp.json()["error"]
    assert err["code"] == "method_not_allowed" and method in err["message"]
    assert allow in err["message"]


def test_unknown_method_on_an_unknown_path_is_json_404(server: Server) -> None:
    resp = httpx.request("BREW", server.url + "/coffee")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    # and the connection stays usable for the next request
    with httpx.Client(base_url=server.url) as c:
        assert c.request("BREW", "/v1/health").status_code == 405
        assert c.get("/v1/health").status_code == 200
