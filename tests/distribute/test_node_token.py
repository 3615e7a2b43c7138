"""A real `rain agent` run with a node token (not the admin's) serves a user's deployment
end to end; a node token lent to another node's agent gets it nowhere."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from rain.client import Client
from tests.conftest import RAIN, Server, free_port
from tests.distribute.conftest import mixed_image, node_token, start_agent, stop_agent

pytestmark = pytest.mark.integration


def test_an_agent_with_a_node_token_serves_a_private_deployment(server: Server,
                                                               tmp_path: Path) -> None:
    with Client(server.url, server.token) as admin:
        user = admin.create_user("node-token-user")["token"]
    token = node_token(server, "nk1")
    agent = start_agent(server, "nk1", tmp_path / "agents", token=token)
    try:
        with Client(server.url, user) as alice:
            path = tmp_path / "private.raw"
            mixed_image(path, 4 << 20, seed=b"node-token")
            image = alice.push(path, name="nk-private", disk_format="raw")
            assert image["visibility"] == "private"
            dep = alice.follow_deployment(alice.deploy(image["id"], nodes=["nk1"], count=2,
                                                       method="http")["id"], timeout=60)
            assert dep["status"] == "ready", dep
            assert dep["report"]["per_node"]["nk1"]["repo_bytes"] > 0
            instances = alice.instances(deployment=dep["id"])
            assert [i["node"] for i in instances] == ["nk1", "nk1"]
            assert all(i["status"] == "ready" for i in instances)
        copy = agent.cache_dir / "cache" / "images" / f"{image['id']}.raw"
        assert copy.read_bytes() == path.read_bytes()
        # The deployment is over: so is what the node token could read for it.
        r = httpx.get(f"{server.url}/v1/images/{image['id']}/manifest", headers={
            "Authorization": f"Bearer {token}", "X-Rain-Deployment": dep["id"]})
        assert r.status_code == 403 and "nk1" in r.json()["error"]["message"]
        node = Client(server.url, server.token).node("nk1")
        assert node["up"] and image["id"] in node["cached"]
    finally:
        stop_agent(agent)


@pytest.mark.parametrize("whose", ["another node's", "a wrong"])
def test_an_agent_whose_token_is_refused_stops_with_one_line(server: Server, tmp_path: Path,
                                                             whose: str) -> None:
    """A lent or mistyped token never gets better: the agent exits 1 saying why, instead of
    serving as a node nobody can use, and the repository lists neither node."""
    token = node_token(server, "nk-owner") if whose == "another node's" else "rain_not-a-token"
    cache = tmp_path / "impostor"
    argv = [*RAIN, "agent", "--name", "nk-impostor", "--repo", server.url, "--token", token,
            "--cache-dir", str(cache), "--cache-size", "64M", "--listen",
            f"127.0.0.1:{free_port()}", "--heartbeat", "0.5"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rain: error:")]
    assert len(errors) == 1 and "refused node nk-impostor" in errors[0], proc.stderr
    expected = "cannot act as node nk-impostor" if whose == "another node's" else "token"
    assert expected in errors[0]
    assert "Traceback" not in proc.stderr
    names = [n["name"] for n in Client(server.url, server.token).nodes()]
    assert "nk-impostor" not in names and "nk-owner" not in names
