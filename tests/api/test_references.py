"""One reference rule everywhere, through a real `rain serve`: the name-squatting scenario
(pull, show, prefetch, --parent, pedigree), ambiguity, the shared tier, and id prefixes
for images, builds and deployments."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from rain.client import Client
from rain.deploy.records import DeploymentRecords
from rain.model import BuildStatus
from rain.model.errors import AmbiguousReference, NotFound
from rain.repo import Repository
from tests.conftest import Server, run_cli
from tests.support.images import make_raw, sha256

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tokens(server: Server) -> dict[str, str]:
    admin = Client(server.url, server.token)
    made = {n: admin.create_user(n, groups=g)["token"]
            for n, g in (("mallory", []), ("bea", ["lab"]), ("cyd", []), ("dan", []))}
    return {"admin": server.token, **made}


def server_repo(server: Server) -> Repository:
    """The server's own database, opened beside it (SQLite in WAL mode)."""
    return Repository.open(server.data_dir, f"sqlite:///{server.data_dir / 'catalog.db'}")


def http(server: Server, token: str, method: str, path: str, **kw: object) -> httpx.Response:
    return httpx.request(method, server.url + path, headers={"Authorization": f"Bearer {token}"},
                         timeout=30, **kw)  # type: ignore[arg-type]


def test_a_public_squatter_never_replaces_your_own_image(server: Server, tokens: dict[str, str],
                                                         tmp_path: Path) -> None:
    bea, mallory = tokens["bea"], tokens["mallory"]
    mine_file = make_raw(tmp_path / "mine.raw", size=1 << 20, seed=11)
    bad_file = make_raw(tmp_path / "bad.raw", size=1 << 20, seed=66)
    mine = run_cli("push", str(mine_file), "--name", "dup", "--version", "1",
                   env=server.env(bea)).stdout.strip()
    squat = run_cli("push", str(bad_file), "--name", "dup", "--version", "1", "--visibility",
                    "public", env=server.env(mallory)).stdout.strip()
    assert mine != squat

    # pull
    out = tmp_path / "pulled.raw"
    run_cli("pull", "dup:1", "-o", str(out), env=server.env(bea))
    assert sha256(out) == sha256(mine_file)
    run_cli("pull", "dup", "-o", str(out), env=server.env(bea))
    assert sha256(out) == sha256(mine_file)
    # show
    shown = json.loads(run_cli("show", "dup:1", "--json", env=server.env(bea)).stdout)
    assert shown["id"] == mine and shown["owner"] == "bea"
    # --parent
    child = run_cli("push", str(make_raw(tmp_path / "kid.raw", size=1 << 20, seed=12)),
                    "--name", "kid", "--parent", "dup:1", env=server.env(bea)).stdout.strip()
    assert Client(server.url, bea).show(child)["parent"] == mine
    found = Client(server.url, bea).images(parent="dup:1")["images"]
    assert [i["id"] for i in found] == [child]
    # pedigree
    chain = Client(server.url, bea).pedigree("kid")
    assert [e["id"] for e in chain] == [child, mine]
    # the image manifest (what node caches fetch by) and a prefetch to a node
    assert http(server, bea, "GET", "/v1/images/dup:1/manifest").json()["image_id"] == mine
    Client(server.url, tokens["admin"]).register_node({
        "name": "ref-n1", "address": "http://127.0.0.1:9", "agent_key": "k" * 20,
        "capacity_instances": 4, "cache_capacity": 1 << 30})
    dep = http(server, bea, "POST", "/v1/deployments",
               json={"image": "dup:1", "nodes": ["ref-n1"], "prefetch": True})
    assert dep.status_code == 202, dep.text
    assert dep.json()["image_id"] == mine
    # share takes the same rule
    Client(server.url, bea).share("dup:1", user="dan")
    assert Client(server.url, bea).show(mine)["members"] == [{"user": "dan"}]
    assert Client(server.url, mallory).show(squat)["members"] == []
    # someone without an image of that name reaches the public one
    assert Client(server.url, tokens["cyd"]).show("dup:1")["id"] == squat
    # ... and for dan, with whom bea shared hers, the shared one wins over the public one
    assert Client(server.url, tokens["dan"]).show("dup:1")["id"] == mine


def test_two_public_owners_make_a_name_ambiguous(server: Server, tokens: dict[str, str],
                                                 tmp_path: Path) -> None:
    ids = [Client(server.url, tokens[who]).push(
        make_raw(tmp_path / f"{who}.raw", size=1 << 20, seed=n), name="twin", version="1",
        visibility="public")["id"] for n, who in enumerate(("mallory", "bea"), 20)]
    r = run_cli("pull", "twin:1", "-o", str(tmp_path / "x"), env=server.env(tokens["cyd"]),
                check=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "ambiguous" in r.stderr and all(i in r.stderr for i in ids)
    assert not (tmp_path / "x").exists()
    resp = http(server, tokens["cyd"], "GET", "/v1/images/twin:1")
    assert resp.status_code == 409
    err = resp.json()["error"]
    assert err["code"] == "ambiguous_reference" and sorted(err["candidates"]) == sorted(ids)
    with pytest.raises(AmbiguousReference):
        Client(server.url, tokens["cyd"]).pull("twin:1", tmp_path / "y")
    # ... the data path of the native front end says the same
    assert http(server, tokens["cyd"], "GET", "/v1/images/twin:1/file").status_code == 409
    # an owner still reaches their own, and an id or prefix picks one
    assert Client(server.url, tokens["bea"]).show("twin:1")["id"] == ids[1]
    assert Client(server.url, tokens["cyd"]).show(ids[0][:8])["id"] == ids[0]


def test_an_image_shared_with_your_group_beats_a_public_one(server: Server,
                                                           tokens: dict[str, str],
                                                           tmp_path: Path) -> None:
    cyd = Client(server.url, tokens["cyd"])
    shared = cyd.push(make_raw(tmp_path / "s.raw", size=1 << 20, seed=31), name="toolkit")["id"]
    cyd.share(shared, group="lab")
    public = Client(server.url, tokens["mallory"]).push(  # the newer one
        make_raw(tmp_path / "p.raw", size=1 << 20, seed=30), name="toolkit",
        visibility="public")["id"]
    assert Client(server.url, tokens["bea"]).show("toolkit")["id"] == shared
    assert Client(server.url, tokens["dan"]).show("toolkit")["id"] == public


def test_table_ids_are_accepted_as_prefixes(server: Server, tokens: dict[str, str],
                                            tmp_path: Path) -> None:
    dan = tokens["dan"]
    image = Client(server.url, dan).push(make_raw(tmp_path / "d.raw", size=1 << 20, seed=40),
                                         name="prefixed")["id"]
    table = run_cli("images", "--name", "prefixed", env=server.env(dan)).stdout
    short = image[:8]
    assert short in table and image not in table
    shown = json.loads(run_cli("show", short, "--json", env=server.env(dan)).stdout)
    assert shown["id"] == image
    run_cli("set", short, "--tag", "short", env=server.env(dan))
    out = tmp_path / "out.raw"
    run_cli("pull", image[:6], "-o", str(out), env=server.env(dan))
    assert out.stat().st_size == 1 << 20
    # someone who may not see it: no such image (not "ambiguous", not "forbidden")
    r = run_cli("show", short, env=server.env(tokens["mallory"]), check=False)
    assert r.returncode == 1 and f"no image '{short}'" in r.stderr
    assert http(server, tokens["mallory"], "GET", f"/v1/images/{short}").status_code == 404


def test_build_and_deployment_prefixes(server: Server, tokens: dict[str, str],
                                       tmp_path: Path) -> None:
    dan = Client(server.url, tokens["dan"])
    image = dan.push(make_raw(tmp_path / "b.raw", size=1 << 20, seed=50), name="built")["id"]
    repo = server_repo(server)
    records = DeploymentRecords(repo.catalog)
    try:
        d = repo.catalog.get_user("dan")
        # finished already, so no build worker of the server takes them
        builds = [repo.catalog.create_build(d, template_digest="e" * 64, template="name: b\n",
                                            status=BuildStatus.SUCCEEDED) for _ in range(2)]
        deps = [records.new_deployment(d, repo.get(d, image), method="http", count=1,
                                    nodes=["n1"], options={}) for _ in range(2)]
        # two of each made to share their first 8 characters
        with repo.catalog.db.session() as s:
            for table, rows in (("builds", builds), ("deployments", deps)):
                for n, row in enumerate(rows):
                    s.execute(sa.text(f"UPDATE {table} SET id = :new WHERE id = :old"),
                              {"new": f"feedf00d-{n}{row.id[10:]}", "old": row.id})
    finally:
        repo.close()
    build_ids = sorted(f"feedf00d-{n}{b.id[10:]}" for n, b in enumerate(builds))
    dep_ids = sorted(f"feedf00d-{n}{x.id[10:]}" for n, x in enumerate(deps))

    assert dan.build_status(build_ids[0][:10])["id"] == build_ids[0]
    with pytest.raises(AmbiguousReference) as caught:
        dan.build_status("feedf00d")
    assert sorted(caught.value.details["candidates"]) == build_ids
    r = run_cli("builds", "feedf00d", env=server.env(tokens["dan"]), check=False)
    assert r.returncode == 1 and all(b in r.stderr for b in build_ids)
    r = run_cli("cancel-build", build_ids[1][:10], env=server.env(tokens["dan"]), check=False)
    assert f"build {build_ids[1]} has already succeeded" in r.stderr, r.stderr

    assert dan.deployment(dep_ids[1][:10])["id"] == dep_ids[1]
    with pytest.raises(AmbiguousReference):
        dan.deployment("feedf00d")
    shown = json.loads(run_cli("deployments", dep_ids[0][:10], "--json",
                               env=server.env(tokens["dan"])).stdout)
    assert shown["id"] == dep_ids[0]
    # others' builds and deployments are no match at all
    cyd = Client(server.url, tokens["cyd"])
    for call in (cyd.build_status, cyd.deployment):
        with pytest.raises(NotFound):
            call("feedf00d")
