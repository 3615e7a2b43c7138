"""`rain testbed up/down/status`: JSON output, removal after crashes, one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from rain.testbed import Testbed
from rain.testbed.teardown import existing_testbeds
from tests.testbed.conftest import alive, leftovers, needs_root, unique_name

pytestmark = [pytest.mark.integration, needs_root]

RAIN = [sys.executable, "-m", "rain.cli.main", "testbed"]


def rain(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RAIN, *args], capture_output=True, text=True, timeout=120)


def test_up_json_status_down_and_down_again(tb: Testbed, tmp_path: Path) -> None:
    """… beside the shared testbed `tb`: two testbeds coexist, both reachable."""
    name = unique_name()
    try:
        up = rain("up", "--nodes", "2", "--rate", "20mbit", "--no-agents", "--name", name,
                  "--data-dir", str(tmp_path), "--json")
        assert up.returncode == 0, up.stderr
        info = json.loads(up.stdout)
        assert info["url"].startswith("http://198.1")
        assert info["token"]
        assert [n["name"] for n in info["nodes"]] == ["n01", "n02"]
        assert info["rate_bps"] == 20_000_000 and info["repo_rate"] == "20mbit"
        assert tb.plan is not None and info["slot"] != tb.plan.slot
        with httpx.Client(trust_env=False) as http:
            for url in (info["url"], tb.url):
                assert http.get(url + "/v1/health", timeout=5).status_code == 200
        server = info["pids"]["repo"]
        assert alive(server)  # outlives `rain testbed up`
        assert (tmp_path / "testbed.json").exists()
        assert (tmp_path / "repo" / "server.log").exists()

        status = rain("status", "--name", name, "--json")
        assert status.returncode == 0, status.stderr
        st = json.loads(status.stdout)
        assert st["exists"] and st["state"]["url"] == info["url"]
        assert st["namespaces"][f"rain-{name}-repo"] == 1
        assert name in existing_testbeds()
    finally:
        down = rain("down", "--name", name)  # the data dir is found through /run
    assert down.returncode == 0, down.stderr
    assert "removed 4 namespaces, 1 processes, the host link" in down.stderr
    assert leftovers(name) == []
    assert not alive(server)
    assert not (tmp_path / "testbed.json").exists()
    again = rain("down", "--name", name, "--data-dir", str(tmp_path), "--purge")
    assert again.returncode == 0 and "nothing to remove" in again.stderr
    assert not tmp_path.exists()  # --purge: the repository and logs are gone too


def test_down_after_a_crash_without_state_file(tmp_path: Path) -> None:
    tb = Testbed(unique_name(), nodes=1, rate="10mbit", data_dir=tmp_path, agents=False)
    try:
        tb.up()
        server = tb.pids["repo"]
        # The crash: the state file is gone, the server was killed, others linger.
        tb.state_file.unlink()
        os.kill(server, signal.SIGKILL)
        sleeper = tb.spawn("n01", ["sleep", "300"])
        down = rain("down", "--name", tb.name, "--data-dir", str(tmp_path / "elsewhere"))
        assert down.returncode == 0, down.stderr
        sleeper.wait(timeout=5)
        assert leftovers(tb.name) == []
    finally:
        tb.down()


def test_down_after_up_died_half_way(tmp_path: Path) -> None:
    name = unique_name()
    sleeper = None
    try:
        for ns in ("sw", "n01"):
            subprocess.run(["ip", "netns", "add", f"rain-{name}-{ns}"], check=True)
        subprocess.run(["ip", "link", "add", f"rain-{name}", "type", "veth", "peer", "name",
                        "host", "netns", f"rain-{name}-sw"], check=True)
        sleeper = subprocess.Popen(["ip", "netns", "exec", f"rain-{name}-n01", "sleep", "300"])
        down = rain("down", "--name", name)
        assert down.returncode == 0, down.stderr
        assert "removed 2 namespaces, 1 processes, the host link" in down.stderr
        assert sleeper.wait(timeout=5) == -signal.SIGTERM
    finally:
        if sleeper is not None and sleeper.poll() is None:
            sleeper.kill()
        Testbed(name).down()
    assert leftovers(name) == []


@pytest.mark.parametrize(("args", "message"), [
    (["--rate", "50mbps"], "bad rate '50mbps'"),
    (["--nodes", "0"], "bad number of nodes 0"),
    (["--name", "Bad_Name"], "bad testbed name 'Bad_Name'"),
    (["--latency", "5ms"], "no netem qdisc (sch_netem): --latency is not available here"),
    (["--server-arg=--no-such-option"], "the repository server exited with status 2"),
])
def test_bad_input_is_one_line_and_leaves_nothing(args: list[str], message: str,
                                                  tmp_path: Path) -> None:
    name = unique_name()
    data = tmp_path / "d"
    # The last of a repeated option wins, so `args` override these.
    result = rain("up", "--nodes", "2", "--rate", "10mbit", "--name", name, "--no-agents",
                  "--data-dir", str(data), *args)
    try:
        if "netem" in message and result.returncode == 0:
            pytest.skip("this kernel has netem")
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rain: error: "), result.stderr
        assert message in lines[0]
        assert leftovers(name) == []
        if "server" not in message:
            assert not data.exists()  # nothing, not even the data directory
        else:
            assert (data / "repo" / "server.log").exists()  # kept for the post-mortem
    finally:
        Testbed(name).down()
