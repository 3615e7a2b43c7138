"""CLI behaviour: one-line errors and exit codes for bad input, --json everywhere."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.conftest import RAIN, Server, free_port, run_cli
from tests.support.images import make_raw

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("args,phrase", [
    (["push", "/nonexistent.img", "--name", "x"], "no such file"),
    # values the CLI reads itself (sizes, durations, KEY=VALUE, choices) are usage
    # errors, exit 2: tests/cli/test_exit_status.py
    (["images", "--package", "nginx>>1"], "bad package constraint"),
    (["images", "--sort", "colour"], "cannot sort by"),
    (["show", "no-such-image"], "no image"),
    (["match", "--prefer", "colour:blue"], "unknown preference"),
    (["pull", "no-such-image"], "no image"),
])
def test_bad_input_is_one_line_and_exit_1(server: Server, args: list[str], phrase: str,
                                          tmp_path: Path) -> None:
    r = run_cli(*args, env=server.env(), check=False, cwd=tmp_path)
    assert r.returncode == 1, r
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rain: error:"), r.stderr
    assert phrase in lines[0]


def test_unreachable_server(server: Server) -> None:
    env = server.env()
    env["RAIN_URL"] = f"http://127.0.0.1:{free_port()}"
    r = run_cli("images", env=env, check=False)
    assert r.returncode == 1 and r.stderr.startswith("rain: error: cannot reach rain at")


def test_unused_for_lists_purge_candidates(server: Server, tmp_path: Path) -> None:
    env = server.env()
    img = make_raw(tmp_path / "u.raw", size=1024 * 1024, seed=31)
    image_id = run_cli("push", str(img), "--name", "stale-candidate", env=env).stdout.strip()
    fresh = json.loads(run_cli("images", "--unused-for", "1d", "--name", "stale-candidate",
                               "--json", env=env).stdout)
    assert fresh["total"] == 0  # created just now: not a purge candidate
    stale = json.loads(run_cli("images", "--unused-for", "0s", "--name", "stale-candidate",
                               "--json", env=env).stdout)
    assert [i["id"] for i in stale["images"]] == [image_id]
    table = run_cli("images", "--name", "stale-candidate", env=env).stdout
    assert "stale-candidate" in table and image_id[:8] in table


def test_admin_create_user_prints_token_once(server: Server) -> None:
    r = run_cli("admin", "create-user", "dora", "--group", "bio", "--data-dir",
                str(server.data_dir), env=server.env())
    token = r.stdout.strip()
    assert token.startswith("rain_")
    env = server.env(token)
    me = json.loads(run_cli("whoami", "--json", env=env).stdout)
    assert me == {"name": "dora", "admin": False, "groups": ["bio"], "quota_bytes": None,
                  "quota_images": None}
    dup = run_cli("admin", "create-user", "dora", "--data-dir", str(server.data_dir),
                  env=server.env(), check=False)
    assert dup.returncode == 1 and "already exists" in dup.stderr


def test_progress_bar_on_a_terminal_only(server: Server, tmp_path: Path) -> None:
    """On a terminal push and pull draw a progress bar; piped output stays clean."""
    img = make_raw(tmp_path / "p.raw", size=32 * 1024 * 1024, seed=32)
    env = server.env()
    cmd = (f"{shlex.join(RAIN)} push {img} --name progress && "
           f"{shlex.join(RAIN)} pull progress -o {tmp_path / 'out.raw'}")
    tty = subprocess.run(["script", "-qfec", cmd, "/dev/null"], env={**env, "COLUMNS": "100"},
                         capture_output=True, text=True, timeout=120)
    assert tty.returncode == 0, tty.stdout
    assert "push p.raw" in tty.stdout and "pull progress" in tty.stdout  # the bars' labels
    assert "MB" in tty.stdout  # transfer column
    piped = run_cli("push", str(img), "--name", "progress2", env=env)
    assert piped.stderr == "" and len(piped.stdout.strip()) == 36
