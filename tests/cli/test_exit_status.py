"""What `rain` exits with: 2 and the command's `--help` for a command line it cannot use
(checked before anything is sent), 1 for what the server refuses and for a search or a
build that comes to nothing, and messages that count things in good English."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rain.client import Client
from tests.conftest import Server, free_port, run_cli, start_server, stop_server
from tests.support.builds import DOUBLE, template
from tests.support.images import make_raw

NOWHERE = {**os.environ, "RAIN_URL": f"http://127.0.0.1:{free_port()}", "RAIN_TOKEN": "x"}


def one_usage_line(r: object, command: str) -> str:
    """The single stderr line of a usage error, checked to end with its --help hint."""
    lines = r.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert r.returncode == 2 and len(lines) == 1, r.stderr  # type: ignore[attr-defined]
    assert lines[0].startswith("rain: error: "), lines[0]
    assert lines[0].endswith(f"(see 'rain {command} --help')"), lines[0]
    return lines[0]


# Nothing listens at NOWHERE: a value that reached the network would exit 1 ("cannot
# connect"), so exit 2 proves the CLI refused it itself.
@pytest.mark.parametrize(("args", "command", "phrase"), [
    (["images", "--min-size", "1Q"], "images", "invalid value for '--min-size': bad size '1Q'"),
    (["images", "--max-file-size", "x"], "images", "bad size 'x'"),
    (["images", "--unused-for", "3y"], "images", "bad duration '3y'"),
    (["images", "--created-after", "yesterday"], "images", "bad date 'yesterday'"),
    (["images", "--status", "gone"], "images", "'gone' is not one of queued,"),
    (["images", "--visibility", "secret"], "images", "'secret' is not one of private,"),
    (["user", "create", "bob", "--quota-bytes", "lots"], "user create", "bad size 'lots'"),
    (["deploy", "IMG", "--nodes", "n1", "--method", "ftp"], "deploy",
     "invalid value for '--method': 'ftp' is not one of auto, http, tree, multicast, "
     "bittorrent, chunks"),
    (["deploy", "IMG", "--nodes", "n1", "--method", "cache"], "deploy", "'cache' is not one"),
    (["deploy", "IMG", "--nodes", "n1", "--size", "big"], "deploy", "bad size 'big'"),
    (["deploy", "IMG", "--nodes", "n1", "--max-rate", "fast"], "deploy", "bad rate 'fast'"),
    (["prefetch", "IMG", "--all", "--method", "ftp"], "prefetch", "'ftp' is not one of"),
    (["pull", "IMG", "--format", "iso9660"], "pull", "'iso9660' is not one of raw, qcow2"),
    (["push", "README.md", "--name", "x", "--disk-format", "qcow"], "push",
     "'qcow' is not one of"),
    (["push", "README.md", "--name", "x", "--visibility", "everyone"], "push",
     "invalid value for '--visibility': 'everyone' is not one of private, shared, public"),
    (["set", "IMG", "--visibility", "everyone"], "set", "'everyone' is not one of"),
    (["match", "--min-disk", "4Q"], "match", "bad size '4Q'"),
    (["builds", "--status", "done"], "builds", "'done' is not one of queued"),
    (["purge", "--unused-for", "soon"], "purge", "bad duration 'soon'"),
    (["purge", "--unused-for", "-1d"], "purge", "bad duration '-1d'"),  # = every image
    (["images", "--min-size", "infG"], "images", "bad size 'infG'"),
    (["images", "--min-size", "1e400G"], "images", "bad size '1e400G'"),
    (["images", "--unused-for", "1e12d"], "images", "bad duration '1e12d'"),
    (["deploy", "IMG", "--nodes", "n1", "--max-rate", "-100mbit"], "deploy",
     "bad rate '-100mbit'"),
    (["set", "IMG", "--property", "novalue"], "set", "bad property 'novalue': expected"),
    (["push", "README.md", "--name", "x", "--property", "novalue"], "push",
     "bad property 'novalue': expected KEY=VALUE"),
])
def test_option_values_that_cannot_be_read_are_usage_errors(
        args: list[str], command: str, phrase: str) -> None:
    line = one_usage_line(run_cli(*args, env=NOWHERE, check=False), command)
    assert phrase in line


@pytest.mark.parametrize(("args", "command", "phrase"), [
    (["deploy", "debian", "--count", "1"], "deploy", "give --nodes N1,N2 or --all"),
    (["prefetch", "debian"], "prefetch", "give --nodes N1,N2 or --all"),
    (["deploy", "debian", "--nodes", "n1", "--all"], "deploy", "not both"),
    (["deploy", "debian", "--all", "--spread", "--pack"], "deploy", "--spread or --pack"),
    (["share", "debian"], "share", "give exactly one of --user or --group"),
    (["purge"], "purge", "give either an IMAGE or --unused-for"),
])
def test_command_lines_that_ask_for_nothing_sensible_are_usage_errors(
        args: list[str], command: str, phrase: str) -> None:
    line = one_usage_line(run_cli(*args, env=NOWHERE, check=False), command)
    assert phrase in line and "(nodes: [...])" not in line


def test_rm_summary_fits_on_one_line_of_rain_help() -> None:
    r = run_cli("--help", env={**NOWHERE, "COLUMNS": "80"})
    lines = r.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("│ rm "))
    assert "refused if protected, a parent or in use" in lines[at]
    assert not re.match(r"│ {10,}\S", lines[at + 1]), lines[at:at + 2]  # no continuation


# -- against a server --------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("rain-cli-exit"), extra_env=DOUBLE)
    try:
        yield s
    finally:
        stop_server(s.proc)


@pytest.mark.integration
def test_values_the_server_refuses_stay_exit_1(server: Server) -> None:
    r = run_cli("show", "no-such-image", env=server.env(), check=False)
    assert r.returncode == 1 and "(see 'rain" not in r.stderr
    r = run_cli("deploy", "no-such-image", "--nodes", "n1", env=server.env(), check=False)
    assert r.returncode == 1 and r.stderr.startswith("rain: error: ")


@pytest.mark.integration
def test_match_with_no_result_exits_1_and_says_why(server: Server) -> None:
    env = server.env()
    r = run_cli("match", "--distro", "plan9", env=env, check=False)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("no image meets the requirements:"), r.stderr
    r = run_cli("match", "--distro", "plan9", "--json", env=env, check=False)
    assert r.returncode == 1 and json.loads(r.stdout)["matches"] == []


@pytest.mark.integration
def test_following_a_build_that_fails_or_is_cancelled_exits_1(server: Server) -> None:
    env = server.env()
    c = Client(server.url, server.token)
    broken = c.build(template("cli-broken", "fail disk full"))
    r = run_cli("builds", broken["id"][:8], "--follow", env=env, check=False)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"rain: error: build {broken['id']} failed: disk full")
    held = c.build(template("cli-held", "hold"))
    deadline = time.monotonic() + 15
    while c.build_status(held["id"])["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    c.cancel_build(held["id"])
    r = run_cli("builds", held["id"], "--follow", env=env, check=False)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"rain: error: build {held['id']} cancelled: cancelled by admin")
    shown = run_cli("builds", held["id"], env=env)  # showing it, not following, succeeds
    assert "cancelled" in shown.stderr


@pytest.mark.integration
def test_usage_counts_one_pull_as_one_pull(server: Server, tmp_path: Path) -> None:
    env = server.env()
    image = run_cli("push", str(make_raw(tmp_path / "one.img", 1 << 20)), "--name", "once",
                    env=env).stdout.strip()
    run_cli("pull", image, "-o", str(tmp_path / "back.img"), env=env)
    r = run_cli("usage", image, env=env)
    assert "1 pull," in r.stdout and "1 pulls" not in r.stdout
