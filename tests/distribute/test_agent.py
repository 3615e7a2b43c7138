"""The node agent and the coordinator end to end on loopback: real `rain serve`, real
`rain agent` processes, real qemu-img overlays."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rain.client import Client
from rain.model.errors import Conflict, InvalidRequest, NotFound, RainError
from tests.conftest import Server, run_cli
from tests.distribute.conftest import (
    AgentProc,
    manifest_of_file,
    mixed_image,
    start_agent,
    stop_agent,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def agents(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[AgentProc]]:
    root = tmp_path_factory.mktemp("agents")
    started: list[AgentProc] = []
    try:
        for name in ("a1", "a2", "a3"):
            started.append(start_agent(server, name, root, capacity=4))
        yield started
    finally:
        for a in started:
            stop_agent(a)


def push(c: Client, tmp_path: Path, name: str, size: int = 4 << 20) -> tuple[dict, Path]:
    path = tmp_path / f"{name}.raw"
    mixed_image(path, size, seed=name.encode())
    return c.push(path, name=name, disk_format="raw"), path


def free_slots(c: Client) -> None:
    """Delete what earlier tests left on the module's agents (only theirs: other tests'
    nodes may be dead by now)."""
    for inst in c.instances():
        if inst["node"] in ("a1", "a2", "a3"):
            c.delete_instance(inst["id"])


def cached_file(agent: AgentProc, image_id: str) -> Path:
    return agent.cache_dir / "cache" / "images" / f"{image_id}.raw"


def test_agents_register_and_report(server: Server, agents: list[AgentProc]) -> None:
    with Client(server.url, server.token) as c:
        nodes = {n["name"]: n for n in c.nodes()}
    assert {"a1", "a2", "a3"} <= set(nodes)
    a1 = nodes["a1"]
    assert a1["up"] and a1["capacity_instances"] == 4 and a1["address"] == agents[0].url
    assert a1["cache_capacity"] == 1 << 30
    assert "agent_key" not in a1


def test_agent_api_needs_its_key(agents: list[AgentProc]) -> None:
    a = agents[0]
    assert httpx.get(f"{a.url}/v1/health").json()["name"] == "a1"
    r = httpx.get(f"{a.url}/v1/state")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = httpx.get(f"{a.url}/v1/state", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 403
    r = httpx.get(f"{a.url}/v1/state", headers={"Authorization": f"Bearer {a.key}"})
    assert r.status_code == 200 and r.json()["name"] == "a1"
    # Peer endpoints take a deployment's peer token, and no random one.
    r = httpx.get(f"{a.url}/v1/peer/chunks/{'00' * 32}",
                  headers={"Authorization": "Bearer not-a-peer-token"})
    assert r.status_code == 403
    r = httpx.post(f"{a.url}/v1/fetch", headers={"Authorization": f"Bearer {a.key}"},
                   content=b"[1, 2]")
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]


def test_http_deployment_makes_overlays_over_verified_copies(
        server: Server, agents: list[AgentProc], tmp_path: Path) -> None:
    with Client(server.url, server.token) as c:
        image, path = push(c, tmp_path, "web")
        dep = c.deploy(image["id"], nodes=["a1", "a2"], count=6, method="http",
                       policy="pack")
        assert dep["status"] == "running" and dep["method"] == "http"
        final = c.follow_deployment(dep["id"], timeout=60)
    assert final["status"] == "ready", final
    r = final["report"]
    for key in ("makespan_s", "first_ready_s", "per_node", "repo_bytes_sent",
                "peer_bytes_sent", "method"):
        assert key in r
    assert r["method"] == "http" and r["instances_ready"] == 6
    assert 0 < r["first_ready_s"] <= r["makespan_s"]
    # Packed where the image is (or is on its way): a1 fills up (capacity 4), the rest
    # go to a2.
    assert {n: p["count"] for n, p in r["per_node"].items()} == {"a1": 4, "a2": 2}
    data = manifest_of_file(path)
    data_bytes = sum(data.chunk_length(i) for i, d in enumerate(data.chunks) if any(d))
    # Counted by the server per deployment: each node got the data chunks once, no zeros.
    assert r["repo_bytes_sent"] == 2 * data_bytes
    for a in agents[:2]:
        copy = cached_file(a, image["id"])
        assert copy.read_bytes() == path.read_bytes()
        node = r["per_node"][a.name]
        assert node["state"] == "ready" and node["source"] == "http"
        for inst in node["instances"]:
            info = json.loads(subprocess.run(
                ["qemu-img", "info", "--output=json", inst["disk"]], capture_output=True,
                check=True, text=True).stdout)
            assert info["format"] == "qcow2"
            assert info["backing-filename"] == str(copy)
            assert info["backing-filename-format"] == "raw"  # never guessed
    with Client(server.url, server.token) as c:
        listed = c.instances(deployment=dep["id"])
    assert len(listed) == 6 and all(i["status"] == "ready" for i in listed)


def test_second_deployment_uses_the_cache_and_instances_can_be_removed(
        server: Server, agents: list[AgentProc], tmp_path: Path) -> None:
    with Client(server.url, server.token) as c:
        image, _ = push(c, tmp_path, "db")
        first = c.follow_deployment(c.deploy(image["id"], nodes=["a3"], count=1)["id"],
                                    timeout=60)
        assert first["status"] == "ready"
        assert first["report"]["method"] == "http"  # auto, one node: nobody to share with
        again = c.follow_deployment(c.deploy(image["id"], nodes=["a3"], count=1)["id"],
                                    timeout=60)
        assert again["status"] == "ready"
        # "cache" either way: from the node's last heartbeat (the method) or, when that
        # predates the first deployment, from the agent's answer (the node's source).
        assert again["report"]["per_node"]["a3"]["source"] == "cache"
        assert again["report"]["repo_bytes_sent"] == 0
        insts = c.instances(deployment=again["id"])
        disk = Path(insts[0]["disk"])
        assert disk.exists()
        gone = c.delete_instance(insts[0]["id"])
        assert gone["status"] == "deleted" and not disk.exists()
        assert c.instance(insts[0]["id"])["status"] == "deleted"


def test_bad_deployment_requests(server: Server, agents: list[AgentProc],
                                 tmp_path: Path) -> None:
    with Client(server.url, server.token) as c:
        image, _ = push(c, tmp_path, "bad-req")
        with pytest.raises(NotFound, match="no such node: nope"):
            c.deploy(image["id"], nodes=["nope"], count=1)
        with pytest.raises(InvalidRequest, match="count"):
            c.deploy(image["id"], nodes=["a1"], count=0)
        with pytest.raises(InvalidRequest, match="unknown method"):
            c.deploy(image["id"], nodes=["a1"], count=1, method="carrier-pigeon")
        with pytest.raises(InvalidRequest, match="unknown options: colour"):
            c.deploy(image["id"], nodes=["a1"], count=1, options={"colour": "red"})
        with pytest.raises(InvalidRequest, match="name the nodes"):
            c.deploy(image["id"], count=1)
        with pytest.raises(RainError, match="not enough capacity"):
            c.deploy(image["id"], nodes=["a1"], count=50)
        # Another user cannot deploy (or see) the admin's private image.
        bob = c.create_user("bob-deploy")["token"]
    with Client(server.url, bob) as other, pytest.raises(NotFound):
        other.deploy(image["id"], nodes=["a1"], count=1)
    with Client(server.url, "wrong-token") as anon, pytest.raises(RainError):
        anon.deploy(image["id"], nodes=["a1"], count=1)


def test_a_node_that_dies_does_not_stop_the_others(
        server: Server, tmp_path: Path) -> None:
    # Own agents: one of them is killed.
    root = tmp_path / "dying"
    live, doomed = start_agent(server, "d1", root), start_agent(server, "d2", root)
    try:
        with Client(server.url, server.token) as c:
            image, path = push(c, tmp_path, "slow", size=16 << 20)
            # Throttled to ~4 MB/s per node so the transfer lasts long enough to kill one.
            dep = c.deploy(image["id"], nodes=["d1", "d2"], count=16, method="http",
                           options={"max_rate": 4e6, "stall_seconds": 3})
            seen = threading.Event()

            def watch(d: dict) -> None:
                node = (d.get("report") or {}).get("per_node", {}).get("d2", {})
                if node.get("progress", 0) > 0.1 and not seen.is_set():
                    seen.set()
                    stop_agent(doomed, signal.SIGKILL)

            final = c.follow_deployment(dep["id"], watch, interval=0.2, timeout=120)
        assert seen.is_set()
        assert final["status"] == "partial", final
        r = final["report"]
        assert r["per_node"]["d1"]["state"] == "ready"
        assert r["per_node"]["d2"]["state"] == "failed"
        assert "d2" in r["errors"] and "d2" in (final["error"] or "")
        assert cached_file(live, image["id"]).read_bytes() == path.read_bytes()
    finally:
        stop_agent(live)
        stop_agent(doomed)
    # Both nodes are gone now: removing their instances needs --forget.
    with Client(server.url, server.token) as c:
        left = c.instances(deployment=dep["id"])
        assert left and {i["node"] for i in left} == {"d1"}
        with pytest.raises(RainError, match=r"node d1 .* did not answer"):
            c.delete_instance(left[0]["id"])
        assert c.instance(left[0]["id"])["status"] != "deleted"  # nothing lost
    out = run_cli("instance", "rm", "--forget", *(i["id"] for i in left), env=server.env())
    assert out.stderr.count("deleted ") == len(left)
    with Client(server.url, server.token) as c:
        assert c.instances(deployment=dep["id"]) == []


def test_a_cache_full_of_unused_images_still_takes_new_ones(server: Server,
                                                             tmp_path: Path) -> None:
    """Placement counts only what live disks pin; the agent evicts the rest to make room."""
    import os
    import time

    agent = start_agent(server, "c1", tmp_path / "small", cache_size="20M")
    try:
        with Client(server.url, server.token) as c:
            images = []
            for k in range(5):
                path = tmp_path / f"full-{k}.raw"
                path.write_bytes(os.urandom(8 << 20))  # no zero chunks: 8 MiB allocated
                images.append(c.push(path, name=f"full-{k}", disk_format="raw"))

            def deploy(image: dict) -> dict:
                d = c.follow_deployment(c.deploy(image["id"], nodes=["c1"], count=1,
                                                 method="http")["id"], timeout=60)
                assert d["status"] == "ready", d
                return d

            for image in images[:3]:  # two fit: the third evicts the first
                for inst in c.instances(deployment=deploy(image)["id"]):
                    c.delete_instance(inst["id"])
            assert not cached_file(agent, images[0]["id"]).exists()
            deploy(images[3])
            deploy(images[2])  # from the cache
            deadline = time.time() + 10  # the next heartbeat reports the pins
            while time.time() < deadline:
                node = {n["name"]: n for n in c.nodes()}["c1"]
                if node["cache_pinned"] >= 16 << 20:
                    break
                time.sleep(0.2)
            assert node["cache_pinned"] >= 16 << 20, node
            with pytest.raises(Conflict, match="not enough capacity"):
                c.deploy(images[4]["id"], nodes=["c1"], count=1, method="http")
            assert {p.name for p in (agent.cache_dir / "cache" / "images").iterdir()} == {
                f"{images[2]['id']}.raw", f"{images[3]['id']}.raw"}
            for inst in c.instances(node="c1"):
                c.delete_instance(inst["id"])
    finally:
        stop_agent(agent)


def test_auto_knows_a_prefetched_image_before_the_next_heartbeat(server: Server,
                                                                tmp_path: Path) -> None:
    """The agent beats every 30 s: only the repository's own note says the image is there."""
    agent = start_agent(server, "p1", tmp_path / "slow", extra=("--heartbeat", "30"))
    try:
        with Client(server.url, server.token) as c:
            image, _ = push(c, tmp_path, "noted")
            pre = c.follow_deployment(c.prefetch(image["id"], nodes=["p1"])["id"], timeout=60)
            assert pre["status"] == "ready", pre
            assert image["id"] in {n["name"]: n for n in c.nodes()}["p1"]["cached"]
            dep = c.follow_deployment(c.deploy(image["id"], nodes=["p1"], count=1)["id"],
                                      timeout=60)
        assert dep["status"] == "ready" and dep["report"]["method"] == "cache", dep
        assert dep["report"]["repo_bytes_sent"] == 0
        with Client(server.url, server.token) as c:
            for inst in c.instances(deployment=dep["id"]):
                c.delete_instance(inst["id"])
    finally:
        stop_agent(agent)


def test_cli_deploy_json_and_nodes(server: Server, agents: list[AgentProc],
                                   tmp_path: Path) -> None:
    with Client(server.url, server.token) as c:
        image, _ = push(c, tmp_path, "cli")
    out = run_cli("deploy", image["id"], "--nodes", "a2,a3", "--count", "2", "--method",
                  "http", "--json", env=server.env())
    report = json.loads(out.stdout)
    assert report["status"] == "ready" and report["method"] == "http"
    assert set(report["per_node"]) <= {"a2", "a3"}
    assert all(p["ready_s"] is not None for p in report["per_node"].values())
    nodes = run_cli("nodes", env=server.env()).stdout
    assert "a1" in nodes and "a3" in nodes
    bad = run_cli("deploy", image["id"], "--nodes", "ghost", env=server.env(), check=False)
    assert bad.returncode == 1 and bad.stderr.strip() == "rain: error: no such node: ghost"
    listed = run_cli("instance", "ls", "--json", env=server.env()).stdout
    assert any(i["image_id"] == image["id"] for i in json.loads(listed))


def test_deploy_spreads_by_default_and_packs_when_asked(server: Server,
                                                        agents: list[AgentProc],
                                                        tmp_path: Path) -> None:
    """`deploy --nodes a2,a3 --count 2`: one instance on each node by default (the report
    says spread placed them), both on one with --pack; --spread --pack is refused."""
    with Client(server.url, server.token) as c:
        free_slots(c)
        spread_image, _ = push(c, tmp_path, "spread")
        pack_image, _ = push(c, tmp_path, "pack")
    out = run_cli("deploy", spread_image["id"], "--nodes", "a2,a3", "--count", "2",
                  "--method", "http", env=server.env())
    assert "placed by spread (the server's default)" in out.stdout
    dep = json.loads(run_cli("deployments", "--json", env=server.env()).stdout)
    report = next(d for d in dep["deployments"] if d["image_id"] == spread_image["id"])["report"]
    assert {n: p["count"] for n, p in report["per_node"].items()} == {"a2": 1, "a3": 1}
    assert report["placement"]["policy"] == "spread" and report["placement"]["asked"] is None
    out = run_cli("deploy", pack_image["id"], "--nodes", "a2,a3", "--count", "2",
                  "--method", "http", "--pack", "--json", env=server.env())
    report = json.loads(out.stdout)
    assert report["status"] == "ready"
    assert [p["count"] for p in report["per_node"].values()] == [2]
    assert report["placement"]["policy"] == report["placement"]["asked"] == "pack"
    assert report["placement"]["multipliers"]["siblings"] < 0
    bad = run_cli("deploy", pack_image["id"], "--nodes", "a2", "--spread", "--pack",
                  env=server.env(), check=False)
    assert bad.returncode == 2  # a usage error: tests/cli/test_exit_status.py
    assert bad.stderr.strip() == ("rain: error: give --spread or --pack, not both "
                                  "(see 'rain deploy --help')")
    with Client(server.url, server.token) as c:
        with pytest.raises(InvalidRequest, match="unknown placement policy 'stack'"):
            c.deploy(pack_image["id"], nodes=["a2"], policy="stack")
        free_slots(c)


def test_tree_deployment_relays_between_agents(server: Server, agents: list[AgentProc],
                                               tmp_path: Path) -> None:
    """Real agents relay a striped tree to each other (their stripe endpoint sends chunks
    straight from the page cache); every copy is exact and nobody fell back."""
    with Client(server.url, server.token) as c:
        free_slots(c)  # the tree must span all three nodes
        image, path = push(c, tmp_path, "treed", size=12 << 20)
        dep = c.follow_deployment(c.deploy(image["id"], nodes=["a1", "a2", "a3"], count=12,
                                           method="tree")["id"], timeout=120)
    assert dep["status"] == "ready", dep
    r = dep["report"]
    assert r["method"] == "tree" and r["peer_bytes_received"] > 0
    assert r["peer_bytes_sent"] == r["peer_bytes_received"]
    data = manifest_of_file(path)
    data_bytes = sum(data.chunk_length(i) for i, d in enumerate(data.chunks) if any(d))
    assert r["repo_bytes_sent"] == data_bytes  # each stripe left the repository once
    for a in agents:
        assert cached_file(a, image["id"]).read_bytes() == path.read_bytes()
        assert not r["per_node"][a.name]["fallback"] and not r["per_node"][a.name]["dropped"]
    with Client(server.url, server.token) as c:
        for inst in c.instances(deployment=dep["id"]):
            c.delete_instance(inst["id"])


def test_deploy_draws_a_progress_bar_on_a_terminal(server: Server, agents: list[AgentProc],
                                                  tmp_path: Path) -> None:
    import re
    import shlex

    from tests.conftest import RAIN

    with Client(server.url, server.token) as c:
        free_slots(c)
        image, _ = push(c, tmp_path, "bar", size=8 << 20)
    cmd = (f"{shlex.join(RAIN)} deploy {image['id']} --nodes a1 --count 1 --method http "
           "--max-rate 4MB/s")
    tty = subprocess.run(["script", "-qfec", cmd, "/dev/null"],
                         env={**server.env(), "COLUMNS": "120"}, capture_output=True,
                         text=True, timeout=120)
    assert tty.returncode == 0, tty.stdout
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", tty.stdout)  # colours off
    m = re.search(r"deployment ([0-9a-f-]{36}) started", text)
    assert m, text
    assert f"deploy {m.group(1)[:8]}" in text and "1/1 nodes ready" in text  # the bar
    assert "ready: 1 instance on 1 node," in text  # the summary after it


def test_copies_grown_disks_and_ephemeral_disks(server: Server, agents: list[AgentProc],
                                                tmp_path: Path) -> None:
    with Client(server.url, server.token) as c:
        free_slots(c)
        image, path = push(c, tmp_path, "shapes", size=4 << 20)
        over = c.follow_deployment(c.deploy(image["id"], nodes=["a2"], count=1, options={
            "size": "64M", "ephemeral_size": "1G"})["id"], timeout=60)
        copy = c.follow_deployment(c.deploy(image["id"], nodes=["a2"], count=1, options={
            "copy": True})["id"], timeout=60)
        with pytest.raises(InvalidRequest, match="bad size"):
            c.deploy(image["id"], nodes=["a2"], count=1, options={"size": "huge"})
    assert over["status"] == copy["status"] == "ready"
    disk = Path(over["report"]["per_node"]["a2"]["instances"][0]["disk"])
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(disk)],
                                     capture_output=True, check=True, text=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 64 << 20
    eph = disk.parent / "ephemeral.raw"
    assert eph.stat().st_size == 1 << 30 and eph.stat().st_blocks == 0  # sparse
    full = Path(copy["report"]["per_node"]["a2"]["instances"][0]["disk"])
    assert full.name == "disk.raw" and full.read_bytes() == path.read_bytes()  # no backing
