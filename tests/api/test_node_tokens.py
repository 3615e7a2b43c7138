"""Node tokens through a real `rain serve`: a node agent's credential registers and reports
its own node, reads the images of running deployments sent to that node, and nothing else."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from rain.api.app import create_app
from rain.client import Client
from rain.deploy.records import DeploymentRecords
from rain.model import DeploymentStatus
from rain.model.errors import Forbidden
from rain.repo import Repository
from tests.conftest import Server
from tests.support.images import make_raw
from tests.support.nodes import report

pytestmark = pytest.mark.integration


@dataclass
class Setup:
    server: Server
    node_a: str  # node token of node nt-a
    node_b: str  # node token of node nt-b
    deployed: dict[str, Any]  # alice's private image, deployed to nt-a
    other: dict[str, Any]  # bob's private image, deployed nowhere
    deployed_bytes: bytes


@pytest.fixture(scope="module")
def setup(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    tmp = tmp_path_factory.mktemp("node-tokens")
    with Client(server.url, server.token) as admin:
        alice, bob = (Client(server.url, admin.create_user(n)["token"]) for n in ("nt-alice",
                                                                                 "nt-bob"))
        node_a = admin.create_token(node="nt-a", label="rack 1")
        node_b = admin.create_token(node="nt-b")["token"]
    assert node_a["node"] == "nt-a" and node_a["user"] is None
    path = make_raw(tmp / "a.raw", 1 << 20, seed=11)
    deployed = alice.push(path, name="nt-private")
    other = bob.push(make_raw(tmp / "b.raw", 1 << 20, seed=12), name="nt-secret")
    return Setup(server, node_a["token"], node_b, deployed, other, path.read_bytes())


def call(s: Setup, token: str, method: str, path: str, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}", **kw.pop("headers", {})}
    return httpx.request(method, s.server.url + path, headers=headers, timeout=30, **kw)


def refused(r: httpx.Response, phrase: str = "node") -> None:
    assert r.status_code == 403, (r.status_code, r.text)
    message = r.json()["error"]["message"]
    assert phrase in message and "\n" not in message, message


def server_repo(server: Server) -> Repository:
    return Repository.open(server.data_dir, f"sqlite:///{server.data_dir / 'catalog.db'}")


def deployment(s: Setup, image: dict[str, Any], owner: str, nodes: list[str],
               status: DeploymentStatus = DeploymentStatus.RUNNING) -> str:
    """A deployment record in the server's catalog (no coordinator runs it)."""
    repo = server_repo(s.server)
    records = DeploymentRecords(repo.catalog)
    try:
        user = repo.catalog.get_user(owner)
        d = records.new_deployment(user, repo.get(user, image["id"]), method="http", count=1,
                                nodes=nodes, options={})
        if status != DeploymentStatus.RUNNING:
            records.save_deployment(d.id, status=status)
        return d.id
    finally:
        repo.close()


def test_a_node_token_registers_and_reports_its_own_node_only(setup: Setup) -> None:
    with Client(setup.server.url, setup.node_a) as agent:
        node = agent.register_node(report("nt-a"))
        assert node["name"] == "nt-a" and node["up"]
        assert agent.heartbeat("nt-a", {"running_instances": 2})["running_instances"] == 2
        with pytest.raises(Forbidden, match="cannot act as node nt-b"):
            agent.register_node(report("nt-b"))
        with pytest.raises(Forbidden, match="cannot act as node nt-b"):
            agent.heartbeat("nt-b", {"running_instances": 1})
        with pytest.raises(Forbidden, match="cannot act as node nt-b"):
            agent.heartbeat("nt-b", {"name": "nt-a"})
    nodes = Client(setup.server.url, setup.server.token).nodes()
    assert "nt-b" not in [n["name"] for n in nodes]
    # The node was registered by its token, not by a user.
    assert Client(setup.server.url, setup.server.token).node("nt-a")["running_instances"] == 2


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/v1/images", {"name": "pushed-by-a-node"}),
    ("PUT", "/v1/images/nt-private/file", None),
    ("GET", "/v1/images", None),
    ("GET", "/v1/images/nt-private", None),
    ("GET", "/v1/users", None),
    ("GET", "/v1/users/me", None),
    ("POST", "/v1/users", {"name": "made-by-a-node"}),
    ("PATCH", "/v1/users/nt-alice", {"disabled": True}),
    ("GET", "/v1/groups", None),
    ("GET", "/v1/tokens", None),
    ("POST", "/v1/tokens", {"node": "nt-b"}),
    ("GET", "/v1/nodes", None),
    ("GET", "/v1/nodes/nt-b", None),
    ("DELETE", "/v1/nodes/nt-b", None),
    ("POST", "/v1/deployments", {"image": "nt-private", "nodes": ["nt-a"], "count": 1}),
    ("GET", "/v1/deployments", None),
    ("GET", "/v1/instances", None),
    ("POST", "/v1/gc", None),
    ("GET", "/v1/builds", None),
    ("GET", "/v1/usage", None),
])
def test_a_node_token_is_refused_everywhere_else(setup: Setup, method: str, path: str,
                                                 body: dict[str, Any] | None) -> None:
    kw: dict[str, Any] = {"json": body} if body is not None else {}
    if method == "PUT":
        kw = {"content": b"\0" * 4096}
    refused(call(setup, setup.node_a, method, path, **kw), "node nt-a's token")


def test_a_node_token_reads_only_the_images_deployed_to_its_node(setup: Setup) -> None:
    image_id = setup.deployed["id"]
    manifest, data = f"/v1/images/{image_id}/manifest", f"/v1/images/{image_id}/file"
    rng = {"Range": "bytes=0-65535"}
    # No deployment: not even an image of someone who deploys it elsewhere.
    refused(call(setup, setup.node_a, "GET", manifest), "no X-Rain-Deployment")
    refused(call(setup, setup.node_a, "GET", data, headers=rng), "no X-Rain-Deployment")
    refused(call(setup, setup.node_a, "GET", manifest,
                 headers={"X-Rain-Deployment": "0" * 36}))

    running = deployment(setup, setup.deployed, "nt-alice", ["nt-a"])
    dep = {"X-Rain-Deployment": running}
    got = call(setup, setup.node_a, "GET", manifest, headers=dep)
    assert got.status_code == 200 and got.json()["sha256"] == setup.deployed["sha256"]
    part = call(setup, setup.node_a, "GET", data, headers={**rng, **dep})
    assert part.status_code == 206 and part.content == setup.deployed_bytes[:65536]
    whole = call(setup, setup.node_a, "GET", data, headers=dep)
    assert hashlib.sha256(whole.content).hexdigest() == setup.deployed["sha256"]

    # Another node, another image under the same deployment, another user's private image.
    refused(call(setup, setup.node_b, "GET", manifest, headers=dep), "node nt-b's token")
    for path in (f"/v1/images/{setup.other['id']}/manifest",
                 f"/v1/images/{setup.other['id']}/file", "/v1/images/nt-private/manifest"):
        refused(call(setup, setup.node_a, "GET", path, headers={**rng, **dep}))
    # The deployment's image, by the deployment of someone who may not see it.
    bobs = deployment(setup, setup.other, "nt-bob", ["nt-a"])
    refused(call(setup, setup.node_a, "GET", manifest, headers={"X-Rain-Deployment": bobs}))
    # Once the deployment is over, the grant is over.
    done = deployment(setup, setup.deployed, "nt-alice", ["nt-a"], DeploymentStatus.READY)
    refused(call(setup, setup.node_a, "GET", data, headers={**rng, "X-Rain-Deployment": done}))


def test_the_asgi_download_route_applies_the_same_grant(setup: Setup) -> None:
    """`rain serve --server uvicorn` streams image data through the FastAPI route."""
    running = deployment(setup, setup.deployed, "nt-alice", ["nt-a"])
    repo = server_repo(setup.server)
    try:
        with TestClient(create_app(repo, catalog=repo.catalog)) as http:
            path = f"/v1/images/{setup.deployed['id']}/file"
            auth = {"Authorization": f"Bearer {setup.node_a}", "Range": "bytes=0-1023"}
            ok = http.get(path, headers={**auth, "X-Rain-Deployment": running})
            assert ok.status_code == 206 and ok.content == setup.deployed_bytes[:1024]
            refused(http.get(path, headers=auth))
            refused(http.get(f"/v1/images/{setup.other['id']}/file",
                             headers={**auth, "X-Rain-Deployment": running}))
            refused(http.put(path, headers=auth, content=b"x"), "node nt-a's token")
    finally:
        repo.close()


def test_a_revoked_node_token_is_401(setup: Setup) -> None:
    with Client(setup.server.url, setup.server.token) as admin:
        made = admin.create_token(node="nt-c")
        assert [t["id"] for t in admin.tokens(node="nt-c")] == [made["id"]]
        with Client(setup.server.url, made["token"]) as agent:
            agent.register_node(report("nt-c"))
            admin.revoke_token(made["id"])
            r = call(setup, made["token"], "PUT", "/v1/nodes/nt-c", json={})
            assert r.status_code == 401
        # Only admins make node tokens.
        user = admin.create_user("nt-carol")["token"]
    refused(call(setup, user, "POST", "/v1/tokens", json={"node": "nt-c"}), "only an admin")
