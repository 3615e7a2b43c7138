"""Agents in a testbed: they register, a killed node is gone, a restarted one is back."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import httpx
import pytest

from rain.testbed import Testbed
from tests.testbed.conftest import alive, leftovers, needs_root, unique_name

pytestmark = [
    pytest.mark.integration, needs_root,
    pytest.mark.skipif(importlib.util.find_spec("rain.cli.agent") is None,
                       reason="no `rain agent` command yet"),
]


def test_agents_register_die_and_come_back(tmp_path: Path) -> None:
    tb = Testbed(unique_name(), nodes=1, rate="100mbit", data_dir=tmp_path, cache_size="1G",
                 capacity=2)
    try:
        tb.up()
        with httpx.Client(trust_env=False, headers={"Authorization": f"Bearer {tb.token}"},
                          timeout=10) as http:
            nodes = {n["name"]: n for n in http.get(tb.url + "/v1/nodes").json()["nodes"]}
            assert set(nodes) == {"n01"}
            assert nodes["n01"]["address"] == tb.node("n01").agent_url
            assert (tmp_path / "n01" / "agent.log").exists()
            first = tb.pids["n01"]
            assert tb.kill_agent("n01") == 1
            assert not alive(first)
            tb.start_agents(["n01"])  # waits until it has reported again
            assert tb.pids["n01"] != first and alive(tb.pids["n01"])
    finally:
        tb.down()
    assert leftovers(tb.name) == []
