"""Deploy options from the command line to the transfer method, over the real server and
agents: what `rain deploy` asks is what the deployment records and what the chunks
method does; what the API refuses is a 400 with one line naming the option."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rain.client import Client
from tests.conftest import Server, run_cli
from tests.distribute.conftest import AgentProc, mixed_image, start_agent, stop_agent

pytestmark = pytest.mark.integration


def post_deployment(server: Server, options: object) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/deployments", timeout=30,
                      headers={"Authorization": f"Bearer {server.token}"},
                      json={"image": "anything", "all": True, "options": options})


@pytest.mark.parametrize(("options", "message"), [
    ({"max_holders": 65}, "option max_holders must be a whole number from 0 to 64, not 65"),
    ({"owner_wait_seconds": -1}, "option owner_wait_seconds must be a number above 0"),
    ({"stall_seconds": 0}, "option stall_seconds must be a number above 0"),
    ({"colour": "red"}, "unknown options: colour (known: "),
])
def test_bad_options_are_a_400_naming_them(server: Server, options: object,
                                           message: str) -> None:
    r = post_deployment(server, options)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_request" and error["message"].startswith(message)
    assert "\n" not in error["message"]


@pytest.fixture
def agents(server: Server, tmp_path: Path) -> Iterator[dict[str, AgentProc]]:
    started: dict[str, AgentProc] = {}
    try:
        for name in ("opt-hold", "opt-a", "opt-b"):
            started[name] = start_agent(server, name, tmp_path)
        yield started
    finally:
        for agent in started.values():
            stop_agent(agent)


def test_chunks_options_reach_the_method(server: Server, agents: dict[str, AgentProc],
                                         tmp_path: Path) -> None:
    """`opt-hold` caches the image. With the defaults the chunks method lists it as a
    holder, so `opt-a` gets every byte from it; `rain deploy --max-holders 0` makes the
    method list none, so `opt-b` gets every byte from the repository."""
    disk = tmp_path / "disk.raw"
    mixed_image(disk)
    with Client(server.url, server.token) as c:
        image = c.push(disk, name="options-wire")
        done = c.follow_deployment(c.prefetch(image["id"], nodes=["opt-hold"],
                                              method="http")["id"], timeout=60)
        assert done["status"] == "ready", done

    env = server.env()
    default = run_cli("deploy", image["id"], "--nodes", "opt-a", "--method", "chunks",
                      "--json", env=env)
    asked = run_cli("deploy", image["id"], "--nodes", "opt-b", "--method", "chunks",
                    "--max-holders", "0", "--owner-wait-seconds", "7.5",
                    "--stall-seconds", "12", "--json", env=env)
    a = json.loads(default.stdout)["per_node"]["opt-a"]
    b_report = json.loads(asked.stdout)
    b = b_report["per_node"]["opt-b"]
    assert a["repo_bytes"] == 0 and a["peer_bytes"] > 0, a  # all from the holder
    assert b["peer_bytes"] == 0 and b["repo_bytes"] == a["peer_bytes"], b  # no holder
    with Client(server.url, server.token) as c:
        record = c.deployment(b_report["id"])
    assert record["options"] == {"max_holders": 0, "owner_wait_seconds": 7.5,
                                 "stall_seconds": 12.0}


def test_bad_option_on_the_command_line_is_one_line(server: Server) -> None:
    result = run_cli("deploy", "anything", "--all", "--max-holders", "99", env=server.env(),
                     check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "rain: error: option max_holders must be a whole number from 0 to 64, not 99"]
