"""`rm` refuses to delete what other images derive from or live instance disks use (unless
--force), and a pedigree shows a deleted ancestor as deleted; through a real `rain serve`."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from rain.client import Client
from rain.deploy.records import DeploymentRecords
from rain.model import InstanceStatus
from rain.repo import Repository
from tests.conftest import Server, run_cli
from tests.support.images import make_raw

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tokens(server: Server) -> dict[str, str]:
    admin = Client(server.url, server.token)
    return {"admin": server.token, **{n: admin.create_user(n)["token"] for n in ("gus", "hal")}}


def push(server: Server, token: str, path: Path, name: str, *args: str) -> str:
    return run_cli("push", str(path), "--name", name, *args,
                   env=server.env(token)).stdout.strip()


def test_rm_refuses_a_parent_until_forced_and_pedigree_shows_it_deleted(
        server: Server, tokens: dict[str, str], tmp_path: Path) -> None:
    gus, hal = tokens["gus"], tokens["hal"]
    root = push(server, gus, make_raw(tmp_path / "r.raw", size=1 << 20, seed=1), "rm-root",
                "--visibility", "public")
    mid = push(server, gus, make_raw(tmp_path / "m.raw", size=1 << 20, seed=2), "rm-mid",
               "--parent", root, "--visibility", "public")
    leaf = push(server, gus, make_raw(tmp_path / "l.raw", size=1 << 20, seed=3), "rm-leaf",
                "--parent", mid)
    # hal derives a private image of his own from gus's public one
    push(server, hal, make_raw(tmp_path / "h.raw", size=1 << 20, seed=4), "hal-leaf",
         "--parent", mid)

    r = run_cli("rm", "rm-mid", env=server.env(gus), check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "parent of 2 images" in lines[0] and f"{leaf[:8]} rm-leaf" in lines[0]
    assert "1 you cannot see" in lines[0] and "--force" in lines[0]
    assert "hal-leaf" not in lines[0]
    assert Client(server.url, gus).show(mid)["status"] == "active"  # nothing changed

    resp = httpx.delete(f"{server.url}/v1/images/{mid}",
                        headers={"Authorization": f"Bearer {gus}"})
    assert resp.status_code == 409
    err = resp.json()["error"]
    assert err["code"] == "conflict" and err["children"] == [leaf]
    assert err["children_total"] == 2 and err["live_instances"] == 0

    done = json.loads(run_cli("rm", "rm-mid", "--force", "--json", env=server.env(gus)).stdout)
    assert done["id"] == mid and done["status"] == "deleted"

    # the pedigree goes on past the deleted image, which says it is deleted
    chain = Client(server.url, gus).pedigree(leaf)
    assert [(e["id"], e["status"], e["deleted"]) for e in chain] == [
        (leaf, "active", False), (mid, "deleted", True), (root, "active", False)]
    shown = run_cli("pedigree", leaf, env=server.env(gus)).stdout
    assert "rm-mid" in shown and "deleted" in shown and "rm-root" in shown
    # hal saw the public mid before, so he sees it deleted too
    hal_chain = Client(server.url, hal).pedigree("hal-leaf")
    assert [e["status"] for e in hal_chain] == ["active", "deleted", "active"]
    # a leaf can go without --force
    assert Client(server.url, gus).delete(leaf)["status"] == "deleted"


def test_rm_refuses_an_image_live_instances_use(server: Server, tokens: dict[str, str],
                                                tmp_path: Path) -> None:
    gus = tokens["gus"]
    image = push(server, gus, make_raw(tmp_path / "i.raw", size=1 << 20, seed=5), "rm-live")
    repo = Repository.open(server.data_dir, f"sqlite:///{server.data_dir / 'catalog.db'}")
    records = DeploymentRecords(repo.catalog)
    try:
        owner = repo.catalog.get_user("gus")
        dep = records.new_deployment(owner, repo.get(owner, image), method="http", count=3,
                                  nodes=["rm-n1", "rm-n2"], options={})
        placed = [(f"{dep.id[:8]}-{node}-{k}", node)
                  for node, k in (("rm-n1", 0), ("rm-n1", 1), ("rm-n2", 0))]
        records.add_instances(dep, [(i, node, image) for i, node in placed])
        ids = [i for i, _ in placed]
        records.set_instance(ids[0], status=InstanceStatus.READY, disk="/x/0.qcow2")
    finally:
        repo.close()

    r = run_cli("rm", image, env=server.env(gus), check=False)
    assert r.returncode == 1
    assert "backs 3 live instances (2 on rm-n1, 1 on rm-n2)" in r.stderr, r.stderr
    repo = Repository.open(server.data_dir, f"sqlite:///{server.data_dir / 'catalog.db'}")
    records = DeploymentRecords(repo.catalog)
    try:
        for i in ids[:2]:
            records.set_instance(i, status=InstanceStatus.DELETED)
    finally:
        repo.close()
    r = run_cli("rm", image[:8], env=server.env(gus), check=False)
    assert r.returncode == 1 and "backs 1 live instance (1 on rm-n2)" in r.stderr, r.stderr
    forced = httpx.delete(f"{server.url}/v1/images/{image}?force=true",
                          headers={"Authorization": f"Bearer {gus}"})
    assert forced.status_code == 200 and forced.json()["status"] == "deleted"


def test_force_does_not_override_protection(server: Server, tokens: dict[str, str],
                                            tmp_path: Path) -> None:
    gus = tokens["gus"]
    image = push(server, gus, make_raw(tmp_path / "p.raw", size=1 << 20, seed=6), "rm-guarded")
    run_cli("set", image, "--protected", env=server.env(gus))
    r = run_cli("rm", image, "--force", env=server.env(gus), check=False)
    assert r.returncode == 1 and "protected" in r.stderr
