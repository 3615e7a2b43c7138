"""Nodes, manifests, deployments and instances: through a real `rain serve` process, and
the Repository methods behind them in-process."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from rain.client import Client
from rain.deploy.nodes import NodeRegistry
from rain.deploy.records import DeploymentRecords
from rain.model import (
    DeploymentStatus,
    Image,
    ImageStatus,
    InstanceStatus,
    NodeState,
)
from rain.model.errors import (
    Forbidden,
    InvalidRequest,
    NotFound,
    RainError,
    Unauthorized,
    Unsupported,
)
from rain.repo import RepoConfig, Repository
from rain.store.manifest import ZERO_DIGEST
from tests.conftest import Server, start_server, stop_server
from tests.support.images import make_raw
from tests.support.nodes import KEY, report

pytestmark = pytest.mark.integration
def chunk_digests(path: Path, chunk_size: int) -> list[bytes]:
    out = []
    with open(path, "rb") as f:
        while piece := f.read(chunk_size):
            out.append(ZERO_DIGEST if piece.count(0) == len(piece)
                       else hashlib.sha256(piece).digest())
    return out


@pytest.fixture(scope="module")
def tokens(server: Server) -> dict[str, str]:
    admin = Client(server.url, server.token)
    return {"admin": server.token,
            **{n: admin.create_user(n)["token"] for n in ("alice", "bob")}}


def as_(server: Server, tokens: dict[str, str], who: str | None) -> Client:
    return Client(server.url, tokens[who] if who else "")


# -- nodes over HTTP -------------------------------------------------------------------
def test_register_heartbeat_list_remove(server: Server, tokens: dict[str, str]) -> None:
    admin, alice = as_(server, tokens, "admin"), as_(server, tokens, "alice")
    node = admin.register_node(report("reg-1"))
    assert node["name"] == "reg-1" and node["address"] == "http://198.18.0.11:8481"
    assert node["up"] is True and node["capacity_instances"] == 8
    assert node["registered"] and node["last_heartbeat"]
    assert "agent_key" not in node

    beat = admin.heartbeat("reg-1", {"running_instances": 3, "cache_used": 1 << 30,
                                     "cached": ["img-a"], "in_flight": ["img-b"]})
    assert beat["running_instances"] == 3 and beat["capacity_instances"] == 8
    assert beat["last_heartbeat"] >= node["last_heartbeat"]
    listed = {n["name"]: n for n in alice.nodes()}  # any user may look
    # ... but only at the cached images she may see (these ids are no image of hers)
    assert listed["reg-1"]["cached"] == [] and listed["reg-1"]["in_flight"] == []
    seen = {n["name"]: n for n in admin.nodes()}["reg-1"]
    assert seen["cached"] == ["img-a"] and seen["in_flight"] == ["img-b"]
    assert listed["reg-1"]["cache_used"] == 1 << 30 and listed["reg-1"]["up"] is True
    assert alice.node("reg-1") == listed["reg-1"]

    # re-registered on another port (a restarted agent): address replaced, still one node
    again = admin.register_node(report("reg-1", address="http://198.18.0.11:9001"))
    assert again["address"] == "http://198.18.0.11:9001"
    assert again["registered"] == node["registered"]
    assert [n["name"] for n in admin.nodes()].count("reg-1") == 1

    with pytest.raises(Forbidden):
        alice.remove_node("reg-1")
    assert admin.remove_node("reg-1")["name"] == "reg-1"
    with pytest.raises(NotFound):
        admin.node("reg-1")
    with pytest.raises(NotFound):
        admin.heartbeat("reg-1", {"running_instances": 1})
    with pytest.raises(NotFound):
        admin.remove_node("reg-1")


def test_only_admins_register_and_report(server: Server, tokens: dict[str, str]) -> None:
    alice, anon = as_(server, tokens, "alice"), as_(server, tokens, None)
    with pytest.raises(Forbidden):
        alice.register_node(report("perm-1"))
    with pytest.raises(Unauthorized):
        anon.register_node(report("perm-1"))
    with pytest.raises(Unauthorized):
        anon.nodes()
    with pytest.raises(Unauthorized):
        anon.node("perm-1")
    as_(server, tokens, "admin").register_node(report("perm-1"))
    with pytest.raises(Forbidden):
        alice.heartbeat("perm-1", {"running_instances": 1})
    with pytest.raises(Unauthorized):
        anon.heartbeat("perm-1", {"running_instances": 1})
    assert as_(server, tokens, "admin").node("perm-1")["running_instances"] == 0


@pytest.mark.parametrize(("body", "phrase"), [
    ({"name": "-bad"}, "bad node name"),
    ({"name": "a" * 65}, "bad node name"),
    ({"name": "a/b"}, "bad node name"),
    ({"name": 7}, "bad node name"),
    ({"address": "ftp://h:21"}, "bad node address"),
    ({"address": "http://198.18.0.11"}, "bad node address"),  # no port
    ({"address": "http://:8481"}, "bad node address"),
    ({"address": "http://h:99999"}, "bad node address"),
    ({"address": "http://h:1/\nx"}, "bad node address"),
    ({"agent_key": "short"}, "bad agent_key"),
    ({"agent_key": "has spaces in it, which are not url-safe"}, "bad agent_key"),
    ({"agent_key": "k" * 129}, "bad agent_key"),
    ({"capacity_instances": -1}, "bad capacity_instances"),
    ({"cache_capacity": 1.5}, "bad cache_capacity"),
    ({"cache_used": True}, "bad cache_used"),
    ({"running_instances": 2**40}, "bad running_instances"),
    ({"cached": "img-a"}, "bad cached"),
    ({"in_flight": [1, 2]}, "bad in_flight"),
    ({"version": ["1"]}, "bad node version"),
    ({"colour": "blue"}, "unknown node fields: colour"),
    ({"address": None}, "registering a node needs address"),
])
def test_bad_reports_are_400_with_one_line(server: Server, body: dict[str, Any],
                                           phrase: str) -> None:
    resp = httpx.post(f"{server.url}/v1/nodes", json={**report("bad-1"), **body},
                      headers={"Authorization": f"Bearer {server.token}"})
    assert resp.status_code == 400, resp.text
    message = resp.json()["error"]["message"]
    assert phrase in message and "\n" not in message, message
    assert "has spaces" not in message  # a key, even a bad one, is not echoed
    # nothing was registered
    assert httpx.get(f"{server.url}/v1/nodes/bad-1",
                     headers={"Authorization": f"Bearer {server.token}"}).status_code == 404


def test_bad_heartbeats_and_bodies_are_400(server: Server, tokens: dict[str, str]) -> None:
    admin = as_(server, tokens, "admin")
    admin.register_node(report("beat-1"))
    for body, phrase in [({"running_instances": -3}, "bad running_instances"),
                         ({"name": "beat-2"}, "names node 'beat-2'"),
                         ({"address": "nope"}, "bad node address")]:
        with pytest.raises(InvalidRequest, match=phrase):
            admin.heartbeat("beat-1", body)
    headers = {"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"}
    for content in (b"[1, 2]", b"{not json", b""):
        resp = httpx.post(f"{server.url}/v1/nodes", content=content, headers=headers)
        assert resp.status_code == 400, (content, resp.text)
    assert admin.node("beat-1")["address"] == "http://198.18.0.11:8481"


def test_agent_key_never_leaves_the_server(server: Server, tokens: dict[str, str]) -> None:
    secret = "Sekrit-agent-key-" + "x" * 20
    headers = {"Authorization": f"Bearer {server.token}"}
    bodies = [httpx.post(f"{server.url}/v1/nodes", json=report("key-1", agent_key=secret),
                         headers=headers),
              httpx.put(f"{server.url}/v1/nodes/key-1", json={"agent_key": secret + "2"},
                        headers=headers),
              httpx.get(f"{server.url}/v1/nodes", headers=headers),
              httpx.get(f"{server.url}/v1/nodes/key-1", headers=headers),
              httpx.get(f"{server.url}/openapi.json"),
              httpx.delete(f"{server.url}/v1/nodes/key-1", headers=headers)]
    assert [b.status_code for b in bodies] == [201, 200, 200, 200, 200, 200]
    for resp in bodies:
        assert "Sekrit" not in resp.text
    for resp in bodies[:4] + bodies[5:]:
        assert "agent_key" not in resp.text


def test_node_is_down_once_its_heartbeat_is_older_than_the_timeout(tmp_path: Path) -> None:
    s = start_server(tmp_path / "srv", extra_env={"RAIN_REPO__NODE_TIMEOUT_SECONDS": "1"})
    try:
        admin = Client(s.url, s.token)
        assert admin.register_node(report("late-1"))["up"] is True
        deadline = time.monotonic() + 30
        while admin.node("late-1")["up"]:
            assert time.monotonic() < deadline, "the node never went down"
            time.sleep(0.2)
        assert [n["up"] for n in admin.nodes() if n["name"] == "late-1"] == [False]
        # a heartbeat brings it back
        assert admin.heartbeat("late-1", {"running_instances": 1})["up"] is True
    finally:
        stop_server(s.proc)


# -- manifests over HTTP -----------------------------------------------------------------
def test_manifest_lists_each_chunks_digest(server: Server, tokens: dict[str, str],
                                           tmp_path: Path) -> None:
    alice, bob = as_(server, tokens, "alice"), as_(server, tokens, "bob")
    img = make_raw(tmp_path / "disk.raw", size=5 * (1 << 20) + 12345, data_fraction=0.4)
    pushed = alice.push(img, name="manifest-web")
    got = alice.manifest(pushed["id"])
    assert got["image_id"] == pushed["id"] and got["sha256"] == pushed["sha256"]
    assert got["size"] == img.stat().st_size and got["disk_format"] == "raw"
    expected = chunk_digests(img, got["chunk_size"])
    assert got["count"] == len(expected) and got["chunks"] == expected
    assert ZERO_DIGEST in expected and expected[0] != ZERO_DIGEST
    assert alice.manifest("manifest-web") == got  # by name too

    # another user's private image does not exist for them; shared, it does
    with pytest.raises(NotFound):
        bob.manifest(pushed["id"])
    alice.share(pushed["id"], user="bob")
    assert bob.manifest(pushed["id"])["chunks"] == expected
    with pytest.raises(Unauthorized):
        as_(server, tokens, None).manifest(pushed["id"])

    # deactivated: the data (and so its manifest) is for admins only
    alice.update(pushed["id"], deactivated=True)
    with pytest.raises(Forbidden):
        alice.manifest(pushed["id"])
    assert as_(server, tokens, "admin").manifest(pushed["id"])["chunks"] == expected
    with pytest.raises(NotFound):
        alice.manifest("no-such-image")


# -- deployments and instances over HTTP ---------------------------------------------------
def _server_repo(server: Server) -> Repository:
    """The server's own database, opened beside it (SQLite in WAL mode)."""
    return Repository.open(server.data_dir, f"sqlite:///{(server.data_dir / 'catalog.db')}")


def test_deployments_and_instances_are_their_owners(server: Server, tokens: dict[str, str],
                                                    tmp_path: Path) -> None:
    alice, bob = as_(server, tokens, "alice"), as_(server, tokens, "bob")
    admin = as_(server, tokens, "admin")
    web = alice.push(make_raw(tmp_path / "web.raw", size=1 << 20), name="dep-web")
    db = bob.push(make_raw(tmp_path / "db.raw", size=1 << 20, seed=2), name="dep-db")
    repo = _server_repo(server)
    records = DeploymentRecords(repo.catalog)
    try:
        a, b = repo.catalog.get_user("alice"), repo.catalog.get_user("bob")
        d1 = records.new_deployment(a, repo.get(a, web["id"]), method="tree", count=2,
                                 nodes=["n1", "n2"], options={"fanout": 2})
        d2 = records.new_deployment(b, repo.get(b, db["id"]), method="http", count=1,
                                 nodes=["n1"], options={})
        records.add_instances(d1, [(f"{d1.id}-0", "n1", web["id"]),
                                (f"{d1.id}-1", "n2", web["id"])])
        records.add_instances(d2, [(f"{d2.id}-0", "n1", db["id"])])
        records.set_instance(f"{d1.id}-0", status=InstanceStatus.READY, disk="/x/0.qcow2")
        records.set_instance(f"{d1.id}-1", status=InstanceStatus.DELETED)
        records.save_deployment(d1.id, status=DeploymentStatus.READY,
                             report={"makespan_s": 1.25})
    finally:
        repo.close()

    mine = alice.deployments()
    assert [d["id"] for d in mine["deployments"]] == [d1.id] and mine["total"] == 1
    shown = alice.deployment(d1.id)
    assert shown["status"] == "ready" and shown["report"] == {"makespan_s": 1.25}
    assert shown["finished"] and shown["method"] == "tree" and shown["owner"] == "alice"
    with pytest.raises(NotFound):
        bob.deployment(d1.id)
    assert admin.deployment(d1.id)["id"] == d1.id
    everyone = admin.deployments()
    assert {d1.id, d2.id} <= {d["id"] for d in everyone["deployments"]}
    assert [d["id"] for d in admin.deployments(image="dep-db")["deployments"]] == [d2.id]
    assert alice.deployments(image="dep-db")["total"] == 0  # not hers to see
    assert admin.deployments(limit=1)["total"] == everyone["total"]
    assert len(admin.deployments(limit=1)["deployments"]) == 1
    with pytest.raises(InvalidRequest):
        admin.deployments(limit=0)
    with pytest.raises(Unauthorized):
        as_(server, tokens, None).deployments()

    assert [i["id"] for i in alice.instances()] == [f"{d1.id}-0"]
    assert [i["id"] for i in alice.instances(all=True)] == [f"{d1.id}-0", f"{d1.id}-1"]
    assert alice.instance(f"{d1.id}-0")["disk"] == "/x/0.qcow2"
    assert alice.instance(f"{d1.id}-0")["status"] == "ready"
    with pytest.raises(NotFound):
        bob.instance(f"{d1.id}-0")
    assert [i["id"] for i in bob.instances()] == [f"{d2.id}-0"]
    assert [i["id"] for i in admin.instances(node="n1")] == [f"{d1.id}-0", f"{d2.id}-0"]
    assert [i["id"] for i in admin.instances(deployment=d2.id)] == [f"{d2.id}-0"]
    with pytest.raises(NotFound):
        admin.instance("nope")


# -- the Repository in-process --------------------------------------------------------------
@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    r = Repository.open(tmp_path / "data", f"sqlite:///{tmp_path / 'c.db'}",
                        config=RepoConfig(node_timeout_seconds=15))
    yield r
    r.close()


def test_activation_hooks_see_the_active_image(repo: Repository, tmp_path: Path) -> None:
    alice, _ = repo.local_create_user("alice")
    seen: list[tuple[Image, ImageStatus]] = []

    def hook(image: Image) -> None:
        seen.append((image, repo.catalog.get_image(image.id).status))

    def broken(image: Image) -> None:
        raise RuntimeError("a hook that fails")

    repo.activation_hooks += [broken, hook]
    img = make_raw(tmp_path / "a.raw", size=1 << 20)
    first = repo.create(alice, {"name": "hooked"})
    pushed = repo.upload_file(alice, first.id, img)  # the broken hook fails nothing
    assert pushed.status == ImageStatus.ACTIVE
    assert [(i.id, i.status, s) for i, s in seen] == [
        (first.id, ImageStatus.ACTIVE, ImageStatus.ACTIVE)]
    assert seen[0][0].sha256 == pushed.sha256

    async def body() -> AsyncIterator[bytes]:
        yield img.read_bytes()

    second = repo.create(alice, {"name": "hooked-async"})
    asyncio.run(repo.upload(alice, second.id, body()))
    assert [i.id for i, _ in seen] == [first.id, second.id]

    # a failed upload activates nothing
    third = repo.create(alice, {"name": "hooked-empty"})
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(RainError):
        repo.upload_file(alice, third.id, tmp_path / "empty")
    assert len(seen) == 2

    # a rebuild makes a purged image active again: the hooks hear of it, and the old
    # content's torrent is gone before they do
    repo.catalog.update_image(first.id, template_text="name: hooked\nfrom: debian/12\n")
    repo.save_torrent(first.id, "a" * 40, 1 << 18, b"old torrent")
    repo.purge(alice, first.id)
    rebuilt = repo.restore_file(alice, first.id, make_raw(tmp_path / "b.raw", size=1 << 20,
                                                          seed=9))
    assert rebuilt.status == ImageStatus.ACTIVE and rebuilt.sha256 != pushed.sha256
    assert [(i.id, s) for i, s in seen[2:]] == [(first.id, ImageStatus.ACTIVE)]
    assert seen[2][0].sha256 == rebuilt.sha256
    assert repo.catalog.get_torrent(first.id) is None


def test_torrents_and_manifests_need_pullable_images(repo: Repository, tmp_path: Path) -> None:
    alice, _ = repo.local_create_user("alice")
    bob, _ = repo.local_create_user("bob")
    image = repo.create(alice, {"name": "tor"})
    repo.upload_file(alice, image.id, make_raw(tmp_path / "t.raw", size=1 << 20))
    with pytest.raises(NotFound, match="has no torrent yet"):
        repo.torrent_for(alice, image.id)
    repo.save_torrent(image.id, "c" * 40, 1 << 18, b"d8:announce...e")
    got, info_hash, piece, data = repo.torrent_for(alice, "tor")
    assert (got.id, info_hash, piece, data) == (image.id, "c" * 40, 1 << 18, b"d8:announce...e")
    with pytest.raises(NotFound):
        repo.torrent_for(bob, image.id)
    with pytest.raises(Unauthorized):
        repo.torrent_for(None, image.id)
    # purged (on a server without a build queue): the same answer as a pull
    repo.catalog.update_image(image.id, template_text="name: tor\nfrom: debian/12\n")
    repo.purge(alice, image.id)
    for call in (repo.torrent_for, repo.image_manifest, repo.open_download):
        with pytest.raises(Unsupported, match="was purged"):
            call(alice, image.id)


def test_node_states_and_agent_endpoint(repo: Repository) -> None:
    nodes = NodeRegistry(repo.catalog, repo.config)
    admin, _ = repo.local_create_user("root", admin=True)
    alice, _ = repo.local_create_user("alice")
    node = nodes.register_node(admin, report("s1", cache_used=6 << 30, cache_pinned=4 << 30,
                                            cached=["a", "b", "a"],
                                            in_flight=["c"], running_instances=3))
    assert node.cached == ["a", "b"]  # duplicates dropped
    assert nodes.agent_endpoint("s1") == ("http://198.18.0.11:8481", KEY)
    with pytest.raises(NotFound):
        nodes.agent_endpoint("s2")
    assert node.last_heartbeat is not None
    timeout = timedelta(seconds=repo.config.node_timeout_seconds)
    later = node.last_heartbeat + timeout + timedelta(seconds=1)
    assert nodes.node_up(node, node.last_heartbeat)
    assert nodes.node_up(node, node.last_heartbeat + timeout)
    assert not nodes.node_up(node, later)
    (state,) = nodes.node_states(node.last_heartbeat)
    assert state == NodeState(name="s1", address="http://198.18.0.11:8481", up=True,
                              capacity_instances=8, running_instances=3,
                              free_cache_bytes=6 << 30, cached=frozenset({"a", "b"}),
                              in_flight=frozenset({"c"}), last_heartbeat=node.last_heartbeat)
    assert [s.up for s in nodes.node_states(later)] == [False]
    with pytest.raises(Forbidden):
        nodes.register_node(alice, report("s2"))
    with pytest.raises(Forbidden):
        nodes.node_heartbeat(alice, "s1", {})
    with pytest.raises(Unauthorized):
        nodes.list_nodes(None)
    assert [n.name for n in nodes.list_nodes(alice)] == ["s1"]


def test_new_deployment_checks(repo: Repository, tmp_path: Path) -> None:
    records = DeploymentRecords(repo.catalog)
    alice, _ = repo.local_create_user("alice")
    admin, _ = repo.local_create_user("root", admin=True)
    image = repo.create(alice, {"name": "d"})
    image = repo.upload_file(alice, image.id, make_raw(tmp_path / "d.raw", size=1 << 20))
    for kw, phrase in [({"method": "carrier-pigeon"}, "unknown transfer method"),
                       ({"count": -1}, "bad count"), ({"count": True}, "bad count"),
                       ({"nodes": [1]}, "nodes must be")]:
        args: dict[str, Any] = {"method": "http", "count": 1, "nodes": ["n1"], "options": {},
                                **kw}
        with pytest.raises(InvalidRequest, match=phrase):
            records.new_deployment(alice, image, **args)
    with pytest.raises(Unauthorized):
        records.new_deployment(None, image, method="http", count=1, nodes=[], options={})
    pre = records.new_deployment(admin, image, method="auto", count=0, nodes=["n1"], options={},
                              prefetch=True)
    d = records.new_deployment(alice, image, method="http", count=2, nodes=["n1"], options={})
    assert d.status == DeploymentStatus.RUNNING and d.method == "http"
    assert [x.id for x in records.list_deployments(alice)[0]] == [d.id]
    assert [x.id for x in records.list_deployments(admin)[0]] == [d.id, pre.id]
    assert d.created is not None
    assert repo.catalog.deployment_times(d.created - timedelta(hours=1)) == [
        (image.id, d.created)]
    # deactivated images are deployed by admins only
    repo.update(alice, image.id, {"deactivated": True})
    image = repo.get(alice, image.id)
    with pytest.raises(Forbidden):
        records.new_deployment(alice, image, method="http", count=1, nodes=[], options={})
    records.new_deployment(admin, image, method="http", count=1, nodes=[], options={})
