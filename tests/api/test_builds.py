"""Builds, purge, rebuild and pedigree through a real `rain serve` process on loopback.

The server's runner is `RecordingRunner`, a test double (tests/build/doubles.py)
that pushes a small real image instead of building one; end-to-end tests with
real builds live with the builder.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from rain.api.app import create_app
from rain.client import Client
from rain.model.errors import (
    Conflict,
    Forbidden,
    ImageRebuilding,
    InvalidRequest,
    NotFound,
    RainError,
)
from rain.repo import Repository
from tests.conftest import Server, run_cli, start_server, stop_server
from tests.support.builds import DOUBLE, template
from tests.support.images import make_raw, sha256

pytestmark = pytest.mark.integration
def start_build_server(data_dir: Path, *args: str) -> Server:
    return start_server(data_dir, extra_env=DOUBLE, args=args)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_build_server(tmp_path_factory.mktemp("rain-builds"))
    try:
        yield s
    finally:
        stop_server(s.proc)


@pytest.fixture(scope="module")
def tokens(server: Server) -> dict[str, str]:
    admin = Client(server.url, server.token)
    return {"admin": server.token,
            **{n: admin.create_user(n)["token"] for n in ("alice", "bob", "carol")}}


def build(c: Client, text: str) -> str:
    done = c.follow_build(c.build(text)["id"], interval=0.1, timeout=30)
    assert done["status"] == "succeeded", done
    return str(done["image_id"])


def test_cli_build_follow_json_and_template_hit(server: Server, tokens: dict[str, str],
                                                tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "common.yaml").write_text(template("common"))
    child = tmp_path / "hpc.yaml"
    child.write_text("name: hpc\nfrom: template:base/common.yaml\npackages: [openmpi-bin]\n")
    env = server.env(tokens["alice"])
    r = run_cli("build", str(child), "--follow", env=env)
    image_id = r.stdout.strip()
    assert len(image_id) == 36
    assert "== upload" in r.stderr and "test double: building hpc" not in r.stderr
    c = Client(server.url, tokens["alice"])
    shown = c.show(image_id)  # what `rain show --json` prints
    assert shown["template"] == child.read_text()
    assert shown["template_parents"] == [template("common")]
    assert shown["build_id"] and set(shown["build_timings"]) == {"install", "upload"}
    hit = json.loads(run_cli("build", str(child), "--json", env=env).stdout)
    assert hit["cached"] is True and hit["image_id"] == image_id and hit["status"] == "succeeded"
    started = time.monotonic()
    again = c.build_file(child)
    assert time.monotonic() - started < 1 and again["cached"]
    listed = c.builds()
    assert {b["id"] for b in listed["builds"]} >= {hit["id"], shown["build_id"]}
    assert "log" not in listed["builds"][0]
    table = run_cli("builds", env=env).stdout
    assert "template hit" in table and shown["build_id"][:8] in table


def test_bad_templates_and_failed_builds_are_one_line_errors(
        server: Server, tokens: dict[str, str], tmp_path: Path) -> None:
    env = server.env(tokens["alice"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nfrom: debian/12\npakages: [nginx]\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text(template("broken", "fail disk full"))
    for path, phrase in [(bad, "bad.yaml line 3: unknown key 'pakages'"),
                         (broken, "failed: disk full")]:
        r = run_cli("build", str(path), env=env, check=False)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, r.stderr
        assert lines[0].startswith("rain: error:") and phrase in lines[0], lines[0]
    # the same over plain HTTP: 400 with the line, and no job made for it
    resp = httpx.post(f"{server.url}/v1/builds", content=bad.read_bytes(),
                      headers={"Authorization": f"Bearer {tokens['carol']}",
                               "Content-Type": "application/yaml"})
    assert resp.status_code == 400
    assert resp.json()["error"]["message"].startswith("template line 3: unknown key 'pakages'")
    assert Client(server.url, tokens["carol"]).builds()["total"] == 0
    loop = tmp_path / "loop.yaml"
    loop.write_text("name: l\nfrom: template:loop.yaml\n")
    with pytest.raises(RainError, match=r"in a loop: loop\.yaml → loop\.yaml"):
        Client(server.url, tokens["alice"]).build_file(loop)
    followed = run_cli("build", str(broken), "--follow", env=env, check=False)
    assert followed.returncode == 1 and "+ fail disk full" in followed.stderr
    assert followed.stderr.strip().splitlines()[-1].startswith("rain: error: build ")


def test_follow_fetches_only_new_log_and_others_get_404(
        server: Server, tokens: dict[str, str], tmp_path: Path) -> None:
    alice, bob = Client(server.url, tokens["alice"]), Client(server.url, tokens["bob"])
    release = tmp_path / "go"
    submitted = alice.build(template("held", f"wait {release}"))
    assert submitted["status"] in ("queued", "running")
    deadline = time.monotonic() + 10
    while (first := alice.build_status(submitted["id"]))["status"] != "running" or \
            "+ wait" not in first["log"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(NotFound):
        bob.build_status(submitted["id"])
    with pytest.raises(NotFound):
        bob.cancel_build(submitted["id"])
    release.touch()
    updates: list[dict] = []  # type: ignore[type-arg]
    done = alice.follow_build(submitted["id"], updates.append, interval=0.05)
    assert done["status"] == "succeeded" and done["phase"] == "upload"
    assert "".join(u["log"] for u in updates) == done["log"]
    assert done["log"] == alice.build_status(submitted["id"])["log"]
    tail = alice.build_status(submitted["id"], log_offset=len(first["log"]))
    assert tail["log"] == done["log"][len(first["log"]):]
    assert bob.builds()["total"] == 0


def test_follow_shows_phases_and_log_shows_the_log(server: Server, tokens: dict[str, str],
                                                  tmp_path: Path) -> None:
    """A build that logs 600 lines: `--follow` shows its phases in order with their
    durations in a few lines, `--log` the raw log too; a failure shows the log's end."""
    env = server.env(tokens["alice"])
    chatty = tmp_path / "chatty.yaml"
    chatty.write_text(template("chatty", "say 600", "sleep 0.5"))
    followed = run_cli("build", str(chatty), "--follow", env=env)
    lines = followed.stderr.strip().splitlines()
    assert len(lines) < 12, followed.stderr
    # The double reports base, install and upload, and times install and upload: the
    # phase it spends time in is seen starting (the others if a poll catches them), and
    # every phase seen or timed ends, in order.
    order = ["== base", "== install", "== upload"]
    starts = [x for x in lines if x.startswith("== ") and not x.endswith(" s")]
    assert "== install" in starts and starts == [x for x in order if x in starts]
    ends = [x.split(":")[0] for x in lines if x.startswith("== ") and x.endswith(" s")]
    assert ends == [x for x in order if x in starts or x != "== base"]
    assert re.search(r"^== install: 0\.[5-9] s$", followed.stderr, re.M), followed.stderr
    assert "Setting up package" not in followed.stderr
    chatty.write_text(template("chatty2", "say 600"))
    logged = run_cli("build", str(chatty), "--log", env=env)
    assert logged.stderr.count("Setting up package-") == 600
    assert "== install" in logged.stderr
    # Without --log a failure still shows the end of the log, then the one-line error.
    chatty.write_text(template("chatty3", "say 600", "fail no room"))
    failed = run_cli("build", str(chatty), "--follow", env=env, check=False)
    tail = failed.stderr.strip().splitlines()
    assert failed.returncode == 1 and len(tail) < 40
    assert "Setting up package-599 (1.0-599) ..." in failed.stderr
    assert "Setting up package-500 " not in failed.stderr
    assert tail[-1].startswith("rain: error: build ") and "no room" in tail[-1]


def test_cancel_a_running_build(server: Server, tokens: dict[str, str]) -> None:
    """`rain builds ID --cancel` stops a running build (a test double that holds until
    cancelled): it ends cancelled, leaves no image and no scratch files."""
    env = server.env(tokens["alice"])
    alice = Client(server.url, tokens["alice"])
    submitted = alice.build(template("stopme", "hold"))
    deadline = time.monotonic() + 15
    while "scratch " not in (now := alice.build_status(submitted["id"]))["log"]:
        assert time.monotonic() < deadline, now
        time.sleep(0.05)
    scratch = Path(re.search(r"^scratch (\S+)$", now["log"], re.M)[1])  # type: ignore[index]
    assert scratch.is_dir() and now["status"] == "running"
    with pytest.raises(NotFound):
        Client(server.url, tokens["bob"]).cancel_build(submitted["id"])
    r = run_cli("builds", submitted["id"], "--cancel", env=env)
    assert r.stderr.startswith(("cancelling build", "cancelled build"))
    done = alice.follow_build(submitted["id"], interval=0.05, timeout=30)
    assert done["status"] == "cancelled" and done["error"] == "cancelled by alice"
    assert done["image_id"] is None and not scratch.exists()
    assert alice.images(name="stopme")["images"] == []
    again = run_cli("cancel-build", submitted["id"], env=env, check=False)
    assert again.returncode == 1 and again.stderr.strip() == (
        f"rain: error: build {submitted['id']} has already been cancelled; there is nothing "
        "to cancel")


def test_purge_then_pull_waits_for_the_rebuild(server: Server, tokens: dict[str, str],
                                               tmp_path: Path) -> None:
    alice, bob = Client(server.url, tokens["alice"]), Client(server.url, tokens["bob"])
    image_id = build(alice, template("served"))
    before = alice.update(image_id, visibility="public")
    env = server.env(tokens["alice"])
    purged = json.loads(run_cli("purge", image_id, "--json", env=env).stdout)
    assert purged["status"] == "purged" and purged["template"] == before["template"]
    assert purged["packages"] == before["packages"] and purged["stored_bytes"] == 0
    assert bob.images(name="served")["images"][0]["status"] == "purged"
    resp = httpx.get(f"{server.url}/v1/images/{image_id}/file",
                     headers={"Authorization": f"Bearer {tokens['bob']}"})
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "image_rebuilding"
    updates: list[dict] = []  # type: ignore[type-arg]
    got = bob.pull(image_id, tmp_path / "out.raw", on_rebuild=updates.append)
    after = bob.show(image_id)
    assert updates and updates[-1]["status"] == "succeeded"
    assert updates[-1]["rebuild_of"] == image_id
    assert after["status"] == "active" and got["sha256"] == after["sha256"]
    assert sha256(tmp_path / "out.raw") == after["sha256"] != before["sha256"]
    assert after["properties"]["rain.previous_sha256"] == before["sha256"]
    assert after["template_digest"] == before["template_digest"]
    assert after["packages"] == before["packages"]
    assert after["build_id"] == updates[-1]["id"] != before["build_id"]
    history = bob.builds(image=image_id)["builds"]
    assert [b["id"] for b in history] == [after["build_id"], before["build_id"]]


def test_cli_pull_of_purged_image_and_explicit_rebuild(server: Server, tokens: dict[str, str],
                                                       tmp_path: Path) -> None:
    env = server.env(tokens["alice"])
    alice = Client(server.url, tokens["alice"])
    image_id = build(alice, template("pulled"))
    alice.purge(image_id)
    r = run_cli("pull", image_id, "-o", str(tmp_path / "p.raw"), "--json", env=env)
    assert json.loads(r.stdout)["sha256"] == alice.show(image_id)["sha256"]
    assert "is rebuilding it first" in r.stderr
    alice.purge(image_id)
    done = json.loads(run_cli("rebuild", image_id, "--json", env=env).stdout)
    assert done["status"] == "succeeded" and done["image_id"] == image_id
    assert done["rebuild_of"] == image_id
    with pytest.raises(Conflict, match="not purged"):
        alice.rebuild(image_id)


def test_purge_refusals_are_one_line(server: Server, tokens: dict[str, str],
                                     tmp_path: Path) -> None:
    alice = Client(server.url, tokens["alice"])
    guarded = build(alice, template("guarded"))
    alice.update(guarded, protected=True)
    pushed = alice.push(make_raw(tmp_path / "x.raw", size=1024 * 1024, seed=5), name="pushed")
    r = run_cli("purge", guarded, env=server.env(tokens["alice"]), check=False)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "protected; unprotect it before purging" in r.stderr
    with pytest.raises(Conflict, match="no template"):
        alice.purge(pushed["id"])
    with pytest.raises(InvalidRequest, match="bad duration"):
        alice.purge_unused("soon")
    bob = Client(server.url, tokens["bob"])
    with pytest.raises(NotFound):
        bob.purge(guarded)  # private: not even there for bob
    alice.update(guarded, visibility="public", protected=False)
    with pytest.raises(Forbidden):
        bob.purge(guarded)
    with pytest.raises(InvalidRequest):
        alice.build("name: x\nfrom: template:base.yaml\n")


def test_purge_unused_and_pedigree(server: Server, tokens: dict[str, str]) -> None:
    carol = Client(server.url, tokens["carol"])
    root = build(carol, template("ped-root"))
    leaf = build(carol, template("ped-leaf", base="image:ped-root"))
    env = server.env(tokens["carol"])
    chain = json.loads(run_cli("pedigree", leaf, "--json", env=env).stdout)
    assert [e["id"] for e in chain] == [leaf, root]
    assert [e["from"] for e in chain] == ["image:ped-root", "debian/bookworm"]
    text = run_cli("pedigree", "ped-leaf", env=env).stdout
    assert "ped-leaf" in text and "└ ped-root" in text and "└ debian/bookworm" in text
    carol.update(leaf, visibility="public")
    hidden = Client(server.url, tokens["bob"]).pedigree(leaf)
    assert hidden[-1] == {"id": root, "hidden": True}
    assert carol.purge_unused("90d")["count"] == 0
    dry = carol.purge_unused("0s", dry_run=True)
    assert {i["id"] for i in dry["images"]} == {root, leaf} and dry["dry_run"]
    r = run_cli("purge", "--unused-for", "0s", env=env)
    assert "purged 2 images" in r.stderr
    assert {carol.show(i)["status"] for i in (root, leaf)} == {"purged"}


def test_rebuild_answer_on_uvicorn_and_restart_after_a_crash(tmp_path: Path) -> None:
    """On the pure-ASGI front end the 503 carries the build id and Retry-After; a build
    left running by a killed server is failed by the next server to start."""
    server = start_build_server(tmp_path / "data", "--server", "uvicorn")
    try:
        c = Client(server.url, server.token)
        image_id = build(c, template("asgi"))
        c.purge(image_id)
        resp = httpx.get(f"{server.url}/v1/images/{image_id}/file",
                         headers={"Authorization": f"Bearer {server.token}"})
        assert resp.status_code == 503 and resp.headers["retry-after"] == "10"
        error = resp.json()["error"]
        assert error["code"] == "image_rebuilding" and error["retry_after"] == 10
        with pytest.raises(ImageRebuilding) as info:
            c.pull(image_id, tmp_path / "x", wait_for_rebuild=False)
        assert info.value.build_id == error["build_id"]
        assert c.follow_build(error["build_id"], interval=0.1)["status"] == "succeeded"

        held = c.build(template("orphan", f"wait {tmp_path / 'never'}"))
        deadline = time.monotonic() + 10
        while c.build_status(held["id"])["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        server = start_build_server(tmp_path / "data")
        after = Client(server.url, server.token).build_status(held["id"])
        assert after["status"] == "failed" and "stopped before it finished" in after["error"]
    finally:
        stop_server(server.proc)


def test_without_a_builder_builds_are_501(tmp_path: Path) -> None:
    repo = Repository.open(tmp_path / "data", f"sqlite:///{tmp_path / 'c.db'}")
    try:
        token = repo.bootstrap_admin()
        with TestClient(create_app(repo, catalog=repo.catalog)) as http:
            r = http.post("/v1/builds", json={"template": template("x")},
                          headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 501 and r.json()["error"]["code"] == "not_implemented"
        assert "no image builder" in r.json()["error"]["message"]
    finally:
        repo.close()
