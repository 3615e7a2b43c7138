"""Deployments through the API: in-flight placement, prefetch, the popularity
prefetcher, and TLS all the way (server, agents, client)."""

from __future__ import annotations

import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rain.client import Client
from tests.conftest import RAIN, Server, free_port, start_server, stop_server
from tests.distribute.conftest import AgentProc, mixed_image, start_agent, stop_agent

pytestmark = pytest.mark.integration


def push(c: Client, tmp_path: Path, name: str, size: int = 4 << 20) -> dict:
    path = tmp_path / f"{name}.raw"
    mixed_image(path, size, seed=name.encode())
    return c.push(path, name=name, disk_format="raw")


@pytest.fixture(scope="module")
def prefetching(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server,
                                                                           list[AgentProc]]]:
    """A server whose popularity prefetcher runs every second, and three agents."""
    root = tmp_path_factory.mktemp("prefetching")
    s = start_server(root / "repo", extra_env={
        "RAIN_PREFETCH__ENABLED": "true", "RAIN_PREFETCH__INTERVAL_SECONDS": "1",
        "RAIN_PREFETCH__TOP_K": "1"})
    agents: list[AgentProc] = []
    try:
        for name in ("p1", "p2", "p3"):
            agents.append(start_agent(s, name, root, capacity=8))
        yield s, agents
    finally:
        for a in agents:
            stop_agent(a)
        stop_server(s.proc)


def cached(c: Client, node: str) -> set[str]:
    return set(c.node(node)["cached"])


def wait_for(predicate, timeout: float = 60.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.3)
    return False


def test_images_in_flight_attract_the_next_request(prefetching: tuple[Server, list[AgentProc]],
                                                  tmp_path: Path) -> None:
    server, _ = prefetching
    with Client(server.url, server.token) as c:
        image = push(c, tmp_path, "inflight", size=8 << 20)
        # Slow, so the first deployment is still moving the image when the second comes.
        first = c.deploy(image["id"], nodes=["p1", "p2", "p3"], count=1, method="http",
                         options={"max_rate": 2e6})
        assert wait_for(lambda: (c.deployment(first["id"])["report"].get("per_node") or {}))
        node = next(iter(c.deployment(first["id"])["report"]["per_node"]))
        second = c.deploy(image["id"], nodes=["p1", "p2", "p3"], count=1, method="http")
        done = [c.follow_deployment(d["id"], timeout=60) for d in (first, second)]
    assert all(d["status"] == "ready" for d in done)
    # Without the in-flight credit the second would go to an emptier node (free slots).
    assert list(done[1]["report"]["per_node"]) == [node]


def test_prefetch_and_the_popularity_prefetcher(prefetching: tuple[Server, list[AgentProc]],
                                                tmp_path: Path) -> None:
    server, _ = prefetching
    with Client(server.url, server.token) as c:
        # An explicit prefetch: no instances, the image lands in the named caches.
        image = push(c, tmp_path, "pre")
        dep = c.follow_deployment(c.prefetch(image["id"], nodes=["p2"])["id"], timeout=60)
        assert dep["status"] == "ready" and dep["prefetch"] and dep["count"] == 0
        assert dep["report"]["per_node"]["p2"]["instances"] == []
        assert wait_for(lambda: image["id"] in cached(c, "p2"))
        assert c.instances(deployment=dep["id"]) == []
        # A popular image (deployed most in the window) is copied to the nodes that lack it.
        hot = push(c, tmp_path, "hot")
        for _ in range(2):
            d = c.follow_deployment(c.deploy(hot["id"], nodes=["p1"], count=1)["id"],
                                    timeout=60)
            assert d["status"] == "ready"
        assert wait_for(lambda: all(hot["id"] in cached(c, n) for n in ("p2", "p3")), 60)
        prefetches = [d for d in c.deployments(image=hot["id"])["deployments"]
                      if d["prefetch"]]
        assert prefetches and {n for d in prefetches for n in d["nodes"]} >= {"p2", "p3"}


def test_auto_moves_only_the_difference_over_a_cached_base(
        prefetching: tuple[Server, list[AgentProc]], tmp_path: Path) -> None:
    server, agents = prefetching
    base = tmp_path / "base.raw"
    mixed_image(base, 8 << 20, seed=b"base")
    data = bytearray(base.read_bytes())
    data[3 << 20 : (3 << 20) + 300_000] = os.urandom(300_000)  # touches 2 chunks
    derived = tmp_path / "derived.raw"
    derived.write_bytes(bytes(data))
    with Client(server.url, server.token) as c:
        b = c.push(base, name="auto-base", disk_format="raw")
        assert c.follow_deployment(c.prefetch(b["id"], nodes=["p3"])["id"], timeout=60)[
            "status"] == "ready"
        assert wait_for(lambda: b["id"] in cached(c, "p3"))
        d = c.push(derived, name="auto-derived", disk_format="raw", parent=b["id"])
        dep = c.follow_deployment(c.deploy(d["id"], nodes=["p3"], count=1)["id"], timeout=60)
    assert dep["status"] == "ready", dep
    r = dep["report"]
    assert r["method"] == "chunks" and "holds" in r["method_reason"]
    node = r["per_node"]["p3"]
    assert node["repo_bytes"] <= 3 * 256 * 1024  # the changed chunks (2), not 8 MiB
    assert node["local_bytes"] > 6 << 20
    p3 = next(a for a in agents if a.name == "p3")
    assert (p3.cache_dir / "cache" / "images" / f"{d['id']}.raw").read_bytes() == bytes(data)


# -- TLS ---------------------------------------------------------------------------------
def make_certs(root: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and one certificate for 127.0.0.1, signed by it (openssl)."""
    ca_key, ca, key, csr, cert = (root / n for n in ("ca.key", "ca.pem", "tls.key",
                                                      "tls.csr", "tls.pem"))
    ext = root / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out",
        str(ca), "-days", "1", "-subj", "/CN=rain test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", "/CN=127.0.0.1")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "1", "-extfile", str(ext))
    return ca, cert, key


def test_tls_between_repository_agents_and_client(tmp_path: Path) -> None:
    ca, cert, key = make_certs(tmp_path)
    port = free_port()
    data = tmp_path / "repo"
    data.mkdir()
    env = {**os.environ, "RAIN_DISTRIBUTE__AGENT_CA": str(ca)}
    log = open(data / "server.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([*RAIN, "serve", "--port", str(port), "--data-dir", str(data),
                             "--tls-cert", str(cert), "--tls-key", str(key)], stdout=log,
                            stderr=log, env=env, start_new_session=True)
    url = f"https://127.0.0.1:{port}"
    agents: list[AgentProc] = []
    try:
        assert wait_for(lambda: _up(url, ca), 30), (data / "server.log").read_text()
        token = (data / "admin.token").read_text().strip()
        # Plain HTTP to a TLS server gets nowhere.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=3)
        server = Server(url, token, data, proc, data / "server.log")
        for name in ("t1", "t2"):
            agents.append(start_agent(
                server, name, tmp_path / "agents", capacity=1,
                extra=("--ca", str(ca), "--tls-cert", str(cert), "--tls-key", str(key)),
                verify=ssl.create_default_context(cafile=str(ca))))
        with Client(url, token, ca=str(ca)) as c:
            assert c.node("t1")["address"].startswith("https://")
            image = push(c, tmp_path, "secret")
            # A tree: the nodes also read from each other over HTTPS.
            dep = c.follow_deployment(c.deploy(image["id"], nodes=["t1", "t2"], count=2,
                                               method="tree")["id"], timeout=60)
        assert dep["status"] == "ready", dep
        assert dep["report"]["peer_bytes_received"] > 0
        for agent in agents:
            copy = agent.cache_dir / "cache" / "images" / f"{image['id']}.raw"
            assert copy.read_bytes() == (tmp_path / "secret.raw").read_bytes()
            assert not dep["report"]["per_node"][agent.name]["fallback"]
        # Without the CA the client refuses the server's certificate.
        with Client(url, token) as c, pytest.raises(Exception, match="certificate"):
            c.nodes()
    finally:
        for agent in agents:
            stop_agent(agent)
        stop_server(proc)
        log.close()


def _up(url: str, ca: Path) -> bool:
    try:
        return httpx.get(f"{url}/v1/health", verify=ssl.create_default_context(cafile=str(ca)),
                         timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_slots_count_at_once(prefetching: tuple[Server, list[AgentProc]],
                             tmp_path: Path) -> None:
    """The scheduler counts the instances it made or removed before the node's next
    heartbeat says so (this agent reports only every 30 s): no overcommit, no stale refusal."""
    from rain.model.errors import Conflict

    server, _ = prefetching
    slow = start_agent(server, "slowbeat", tmp_path / "slow", capacity=2,
                       extra=("--heartbeat", "30"))
    try:
        with Client(server.url, server.token) as c:
            image = push(c, tmp_path, "slots")
            for _ in range(2):
                dep = c.follow_deployment(c.deploy(image["id"], nodes=["slowbeat"],
                                                   count=2)["id"], timeout=60)
                assert dep["status"] == "ready", dep
                # Full now, though the node's last report still says 0 running.
                assert c.node("slowbeat")["running_instances"] == 0
                with pytest.raises(Conflict, match="not enough capacity"):
                    c.deploy(image["id"], nodes=["slowbeat"], count=1)
                for inst in c.instances(deployment=dep["id"]):
                    c.delete_instance(inst["id"])
    finally:
        stop_agent(slow)


def test_a_method_that_cannot_start_falls_back_to_http(tmp_path: Path) -> None:
    """A repository whose udp-sender fails at once (a stand-in script earlier on its
    PATH): the multicast deployment still completes, over http, and says why."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "udp-sender"
    fake.write_text("#!/bin/sh\necho 'udp-sender: no multicast here' >&2\nexit 1\n")
    fake.chmod(0o755)
    s = start_server(tmp_path / "repo",
                     extra_env={"PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"})
    agent = None
    try:
        agent = start_agent(s, "m1", tmp_path / "agents")
        with Client(s.url, s.token) as c:
            image = push(c, tmp_path, "nocast")
            dep = c.follow_deployment(c.deploy(image["id"], nodes=["m1"], count=1,
                                               method="multicast")["id"], timeout=60)
        assert dep["status"] == "ready", dep
        r = dep["report"]
        assert r["method"] == "http" and r["method_asked"] == "multicast"
        assert "multicast could not start" in r["method_reason"]
    finally:
        if agent is not None:
            stop_agent(agent)
        stop_server(s.proc)
