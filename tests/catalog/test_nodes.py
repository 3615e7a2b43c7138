"""Migration 0003 and node, deployment, instance and torrent records, on SQLite and on a
real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from rain.catalog import Catalog
from rain.catalog.schema import Base
from rain.model import (
    Conflict,
    DeploymentStatus,
    ImageStatus,
    InstanceStatus,
    NotFound,
    User,
)
from rain.model.clock import utcnow
from tests.conftest import fresh_postgres_db
from tests.support.catalogs import migrated_to

LEGACY = "11111111-1111-1111-1111-111111111111"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'c.db'}"
    return fresh_postgres_db(request.getfixturevalue("postgres_url"), "n")


@pytest.fixture
def catalog(url: str) -> Iterator[Catalog]:
    c = Catalog(url)
    yield c
    c.close()


def report(**kw: object) -> dict[str, object]:
    return {"capacity_instances": 8, "running_instances": 1, "cache_capacity": 10 << 30,
            "cache_used": 1 << 30, "cached": ["img-a"], "in_flight": [], "version": "0.1.0",
            **kw}


def image(catalog: Catalog, owner: User, name: str = "web") -> str:
    return catalog.create_image(owner, name=name, status=str(ImageStatus.ACTIVE)).id


def test_0003_upgrades_a_0002_database(url: str) -> None:
    engine, cfg = migrated_to(url, "0002")
    now = utcnow()
    with engine.begin() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        assert "builds" in tables and not tables & {"nodes", "deployments", "instances",
                                                    "image_torrents"}
        conn.execute(sa.text("INSERT INTO users (name, is_admin, created) "
                             "VALUES ('old', false, :t)"), {"t": now})
        conn.execute(sa.text(
            "INSERT INTO images (id, name, version, description, owner_id, visibility, status,"
            " os_distro, os_release, arch, stored_bytes, is_base, protected, created, updated,"
            " access_count) VALUES (:id, 'legacy', '', '', 1, 'private', 'active', 'debian',"
            " '12', 'amd64', 0, false, false, :t, :t, 0)"), {"t": now, "id": LEGACY})
    engine.dispose()
    catalog = Catalog(url)  # migrates to head at open
    try:
        with catalog.db.session() as s:
            version = s.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
            tables = set(sa.inspect(s.connection()).get_table_names())
        assert version == ScriptDirectory.from_config(cfg).get_current_head()
        assert {"nodes", "deployments", "instances", "image_torrents"} <= tables
        old = catalog.get_user("old")
        assert catalog.get_image(LEGACY).name == "legacy"
        d = catalog.create_deployment(old, image_id=LEGACY, method="http", count=2,
                                      nodes=["n1"], options={})
        assert catalog.list_deployments(image_id=LEGACY)[0][0].id == d.id
        catalog.put_torrent(LEGACY, "ab" * 20, 1 << 20, b"d4:infod...ee")
        assert catalog.get_torrent(LEGACY) == ("ab" * 20, 1 << 20, b"d4:infod...ee")
    finally:
        catalog.close()


def test_0004_gives_nodes_of_0003_nothing_pinned(url: str) -> None:
    engine, _ = migrated_to(url, "0003")
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO nodes (name, address, agent_key, capacity_instances,"
            " running_instances, cache_capacity, cache_used, cached, in_flight, version,"
            " registered, last_heartbeat) VALUES ('old', 'http://198.18.1.1:8481', :k, 8, 0,"
            " 1000, 900, '[]', '[]', '0.1', :t, :t)"), {"k": "k" * 32, "t": now})
    engine.dispose()
    catalog = Catalog(url)
    try:
        old = catalog.get_node("old")
        assert old.cache_used == 900 and old.cache_pinned == 0 and old.free_cache_bytes == 1000
    finally:
        catalog.close()


def test_a_verified_image_counts_as_cached_before_the_next_heartbeat(catalog: Catalog) -> None:
    catalog.upsert_node("n1", address="http://198.18.1.1:8481", agent_key="k" * 32,
                        owner_id=None, report=report(in_flight=["img-b"]))
    before = catalog.get_node("n1")
    catalog.note_cached("n1", "img-b")
    catalog.note_cached("n1", "img-b")  # twice: listed once
    catalog.note_cached("ghost", "img-b")  # a node removed meanwhile: nothing to note
    after = catalog.get_node("n1")
    assert after.cached == ["img-a", "img-b"] and after.in_flight == []
    assert after.last_heartbeat == before.last_heartbeat  # not a sign of life


def test_migrations_match_the_tables_the_code_declares(catalog: Catalog) -> None:
    with catalog.db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_nodes_register_report_list_remove(catalog: Catalog) -> None:
    admin = catalog.create_user("admin", admin=True)
    with pytest.raises(NotFound):
        catalog.node_heartbeat("n1", {"running_instances": 2})
    n1 = catalog.upsert_node("n1", address="http://198.18.0.11:8481", agent_key="k" * 32,
                             owner_id=admin.id, report=report())
    assert n1.address == "http://198.18.0.11:8481" and n1.cached == ["img-a"]
    # Nothing pinned: the whole cache can be made room in.
    assert n1.cache_capacity == 10 << 30 and n1.free_cache_bytes == 10 << 30
    pinned = catalog.node_heartbeat("n1", {"cache_used": 6 << 30, "cache_pinned": 4 << 30})
    assert pinned.cache_pinned == 4 << 30 and pinned.free_cache_bytes == 6 << 30
    assert n1.registered is not None and n1.registered.tzinfo is not None
    assert n1.last_heartbeat == n1.registered
    catalog.upsert_node("a0", address="http://198.18.0.10:8481", agent_key="a" * 32,
                        owner_id=admin.id, report={})
    assert [n.name for n in catalog.list_nodes()] == ["a0", "n1"]

    beat = catalog.node_heartbeat("n1", {"running_instances": 5, "in_flight": ["img-b"],
                                         "cached": ["img-a", "img-c"]})
    assert beat.running_instances == 5 and beat.in_flight == ["img-b"]
    assert beat.cached == ["img-a", "img-c"] and beat.capacity_instances == 8  # kept
    assert beat.last_heartbeat is not None and n1.last_heartbeat is not None
    assert beat.last_heartbeat >= n1.last_heartbeat and beat.registered == n1.registered
    assert catalog.get_node("n1") == beat
    assert "agent_key" not in beat.to_dict()
    assert catalog.node_agent_key("n1") == "k" * 32

    # an agent restarted on another port: new address and key, same registration time;
    # a registration is the whole state, so what it leaves out is reset
    again = catalog.upsert_node("n1", address="http://198.18.0.11:9000", agent_key="z" * 40,
                                owner_id=admin.id, report={"cache_capacity": 5})
    assert again.address == "http://198.18.0.11:9000" and again.registered == n1.registered
    assert again.cached == [] and again.running_instances == 0 and again.cache_capacity == 5
    assert catalog.node_agent_key("n1") == "z" * 40
    catalog.node_heartbeat("n1", {"agent_key": "y" * 20})
    assert catalog.node_agent_key("n1") == "y" * 20

    catalog.delete_node("n1")
    with pytest.raises(NotFound):
        catalog.get_node("n1")
    with pytest.raises(NotFound):
        catalog.node_agent_key("n1")
    with pytest.raises(NotFound):
        catalog.delete_node("n1")
    assert [n.name for n in catalog.list_nodes()] == ["a0"]


def test_deployments_create_update_list_and_times(catalog: Catalog) -> None:
    alice, bob = catalog.create_user("alice"), catalog.create_user("bob")
    web, db = image(catalog, alice, "web"), image(catalog, bob, "db")
    with pytest.raises(NotFound):
        catalog.create_deployment(alice, image_id="nope", method="http", count=1, nodes=[],
                                  options={})
    d1 = catalog.create_deployment(alice, image_id=web, method="auto", count=4,
                                   nodes=["n1", "n2"], options={"fanout": 2})
    assert d1.status == DeploymentStatus.RUNNING and d1.owner == "alice"
    assert d1.nodes == ["n1", "n2"] and d1.options == {"fanout": 2} and not d1.prefetch
    assert d1.created is not None and d1.finished is None and d1.report == {}
    d2 = catalog.create_deployment(bob, image_id=db, method="bittorrent", count=1,
                                   nodes=["n1"], options={})
    pre = catalog.create_deployment(alice, image_id=web, method="http", count=0, nodes=["n3"],
                                    options={}, prefetch=True)

    done = catalog.update_deployment(d1.id, status=DeploymentStatus.PARTIAL,
                                     report={"makespan_s": 3.5, "method": "tree"},
                                     error="n2: disk full", nodes=["n1", "n2", "n4"])
    assert done.status == DeploymentStatus.PARTIAL and done.finished is not None
    assert done.report == {"makespan_s": 3.5, "method": "tree"} and done.error == "n2: disk full"
    assert done.nodes == ["n1", "n2", "n4"]
    assert catalog.get_deployment(d1.id) == done
    # a later update leaves `finished` as it was
    assert catalog.update_deployment(d1.id, report={"x": 1}).finished == done.finished
    assert catalog.update_deployment(d2.id, status="running").finished is None
    with pytest.raises(NotFound):
        catalog.get_deployment("nope")
    with pytest.raises(NotFound):
        catalog.update_deployment("nope", status="failed")
    with pytest.raises(ValueError):
        catalog.update_deployment(d2.id, status="exploded")

    everyone, total = catalog.list_deployments()
    assert total == 3 and [d.id for d in everyone] == [pre.id, d2.id, d1.id]  # newest first
    mine, total = catalog.list_deployments(owner_id=alice.id)
    assert total == 2 and {d.id for d in mine} == {d1.id, pre.id}
    page, total = catalog.list_deployments(limit=1, offset=1)
    assert total == 3 and [d.id for d in page] == [d2.id]
    assert [d.id for d in catalog.list_deployments(image_id=db)[0]] == [d2.id]
    assert [d.id for d in catalog.list_deployments(status="partial")[0]] == [d1.id]
    assert catalog.list_deployments(since=utcnow() + timedelta(hours=1)) == ([], 0)

    start = d1.created - timedelta(seconds=1)  # type: ignore[operator]
    times = catalog.deployment_times(start)
    assert [i for i, _ in times] == [web, db]  # oldest first, prefetches left out
    assert all(t.tzinfo is not None for _, t in times)
    assert [i for i, _ in catalog.deployment_times(start, include_prefetch=True)] == [
        web, db, web]
    assert catalog.deployment_times(utcnow() + timedelta(hours=1)) == []


def test_instances(catalog: Catalog) -> None:
    alice, bob = catalog.create_user("alice"), catalog.create_user("bob")
    web = image(catalog, alice)
    d = catalog.create_deployment(alice, image_id=web, method="http", count=3, nodes=["n1"],
                                  options={})
    other = catalog.create_deployment(bob, image_id=web, method="http", count=1, nodes=["n2"],
                                      options={})
    with pytest.raises(NotFound):
        catalog.create_instances(alice, "nope", [("i-0", "n1", web)])
    made = catalog.create_instances(alice, d.id, [("i-1", "n1", web), ("i-2", "n1", web),
                                                  ("i-3", "n2", web)])
    assert [i.id for i in made] == ["i-1", "i-2", "i-3"]
    assert all(i.status == InstanceStatus.CREATING and i.owner == "alice" and i.ready is None
               for i in made)
    catalog.create_instances(bob, other.id, [("i-9", "n2", web)])
    with pytest.raises(Conflict):
        catalog.create_instances(bob, other.id, [("i-1", "n2", web)])

    ready = catalog.update_instance("i-1", status=InstanceStatus.READY,
                                    disk="/var/lib/rain/instances/i-1.qcow2")
    assert ready.status == InstanceStatus.READY and ready.ready is not None
    assert ready.disk.endswith("i-1.qcow2") and catalog.get_instance("i-1") == ready
    failed = catalog.update_instance("i-2", status="failed", error="no space")
    assert failed.error == "no space" and failed.ready is None
    catalog.update_instance("i-3", status=InstanceStatus.DELETED)
    with pytest.raises(NotFound):
        catalog.update_instance("nope", status="ready")
    with pytest.raises(NotFound):
        catalog.get_instance("nope")

    assert [i.id for i in catalog.list_instances()] == ["i-1", "i-2", "i-9"]
    assert [i.id for i in catalog.list_instances(include_deleted=True)] == [
        "i-1", "i-2", "i-3", "i-9"]
    assert [i.id for i in catalog.list_instances(owner_id=bob.id)] == ["i-9"]
    assert [i.id for i in catalog.list_instances(node="n2", include_deleted=True)] == [
        "i-3", "i-9"]
    assert [i.id for i in catalog.list_instances(deployment_id=d.id)] == ["i-1", "i-2"]

    # a removed node's instance records stay; a removed image takes its deployments along
    catalog.upsert_node("n1", address="http://h:1", agent_key="k" * 16, owner_id=None,
                        report={})
    catalog.delete_node("n1")
    assert catalog.get_instance("i-1").node == "n1"
    with catalog.db.session() as s:
        s.execute(sa.text("DELETE FROM images WHERE id = :id"), {"id": web})
    assert catalog.list_deployments() == ([], 0)
    assert catalog.list_instances(include_deleted=True) == []


def test_torrents(catalog: Catalog) -> None:
    alice = catalog.create_user("alice")
    web = image(catalog, alice)
    assert catalog.get_torrent(web) is None
    catalog.put_torrent(web, "a" * 40, 256 << 10, b"first")
    assert catalog.get_torrent(web) == ("a" * 40, 256 << 10, b"first")
    catalog.put_torrent(web, "b" * 40, 1 << 20, bytes(range(256)) * 100)
    assert catalog.get_torrent(web) == ("b" * 40, 1 << 20, bytes(range(256)) * 100)
    catalog.drop_torrent(web)
    assert catalog.get_torrent(web) is None
    catalog.drop_torrent(web)  # nothing to drop is fine
