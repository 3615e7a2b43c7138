"""Migration 0002 and build records, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory

from rain.catalog import Catalog
from rain.catalog.db import MIGRATIONS, make_engine
from rain.model import BuildStatus, ImageStatus, NotFound
from rain.model.clock import utcnow
from tests.conftest import fresh_postgres_db


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'c.db'}"
    return fresh_postgres_db(request.getfixturevalue("postgres_url"), "b")


@pytest.fixture
def catalog(url: str) -> Iterator[Catalog]:
    c = Catalog(url)
    yield c
    c.close()


def test_0002_upgrades_a_0001_database(url: str) -> None:
    engine = make_engine(url)
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    now = utcnow()
    with engine.begin() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        assert "images" in tables and "builds" not in tables
        conn.execute(sa.text("INSERT INTO users (name, is_admin, created) "
                             "VALUES ('old', false, :t)"), {"t": now})
        conn.execute(sa.text(
            "INSERT INTO images (id, name, version, description, owner_id, visibility, status,"
            " os_distro, os_release, arch, stored_bytes, template_digest, is_base, protected,"
            " created, updated, access_count) VALUES ('11111111-1111-1111-1111-111111111111',"
            " 'legacy', '', '', 1, 'private', 'active', 'debian', '12', 'amd64', 0, :d,"
            " false, false, :t, :t, 0)"), {"t": now, "d": "d" * 64})
    engine.dispose()
    catalog = Catalog(url)  # migrates to head at open
    try:
        old = catalog.get_user("old")
        image = catalog.get_image("11111111-1111-1111-1111-111111111111")
        assert image.name == "legacy" and image.template is None and image.build_id is None
        assert image.template_parents == [] and image.build_timings == {}
        assert catalog.image_with_template("d" * 64, old) is not None
        build = catalog.create_build(old, template_digest="d" * 64, template="name: x\n")
        assert catalog.get_build(build.id).status == BuildStatus.QUEUED
        with catalog.db.session() as s:
            version = s.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
        assert version == ScriptDirectory.from_config(cfg).get_current_head()  # 0002 and on
    finally:
        catalog.close()


def test_claim_is_compare_and_set_oldest_first(catalog: Catalog) -> None:
    alice = catalog.create_user("alice")
    first = catalog.create_build(alice, template_digest="a" * 64, template="a",
                                 template_parents=["p1", "p2"])
    second = catalog.create_build(alice, template_digest="b" * 64, template="b")
    got = catalog.claim_build("host:1")
    assert got is not None and got.id == first.id and got.status == BuildStatus.RUNNING
    assert got.template_parents == ["p1", "p2"] and got.started is not None
    assert catalog.claim_build("host:2").id == second.id  # type: ignore[union-attr]
    assert catalog.claim_build("host:3") is None
    assert not catalog.finish_build(first.id, BuildStatus.CANCELLED,
                                    expect=[BuildStatus.QUEUED])
    assert catalog.finish_build(first.id, BuildStatus.SUCCEEDED, timings={"install": 1.5})
    assert not catalog.finish_build(first.id, BuildStatus.FAILED)  # already over
    done = catalog.get_build(first.id)
    assert done.status == BuildStatus.SUCCEEDED and done.timings == {"install": 1.5}
    with pytest.raises(NotFound):
        catalog.get_build("no-such-build")


def test_log_appends_in_sql_and_reads_back_in_slices(catalog: Catalog) -> None:
    alice = catalog.create_user("alice")
    build = catalog.create_build(alice, template_digest="a" * 64, template="a")
    catalog.update_build(build.id, append_log="one\n", phase="base")
    catalog.update_build(build.id, append_log="twø\n", progress=0.5)
    whole = catalog.get_build(build.id, log_offset=0)
    assert whole.log == "one\ntwø\n" and whole.log_size == 8
    assert (whole.phase, whole.progress) == ("base", 0.5)
    tail = catalog.get_build(build.id, log_offset=4)
    assert tail.log == "twø\n" and tail.log_offset == 4
    assert catalog.get_build(build.id, log_offset=99).log == ""
    assert catalog.get_build(build.id).log == ""  # lists and polls without a log


def test_find_and_list_builds(catalog: Catalog) -> None:
    alice, bob = catalog.create_user("alice"), catalog.create_user("bob")
    image = catalog.create_image(alice, name="img", status="purged")
    mine = catalog.create_build(alice, template_digest="a" * 64, template="a")
    rebuild = catalog.create_build(alice, template_digest="a" * 64, template="a",
                                   rebuild_of=image.id)
    hit = catalog.create_build(bob, template_digest="a" * 64, template="a",
                               status=BuildStatus.SUCCEEDED, cached=True, image_id=image.id)
    assert hit.cached and hit.finished is not None and hit.progress == 1.0
    found = catalog.find_active_build(owner_id=alice.id, template_digest="a" * 64)
    assert found is not None and found.id == mine.id  # not the rebuild
    assert catalog.find_active_build(rebuild_of=image.id).id == rebuild.id  # type: ignore[union-attr]
    assert catalog.find_active_build(owner_id=bob.id, template_digest="a" * 64) is None
    builds, total = catalog.list_builds(image_id=image.id)
    assert total == 2 and {b.id for b in builds} == {rebuild.id, hit.id}
    builds, total = catalog.list_builds(owner="alice", statuses=["queued"])
    assert total == 2
    assert catalog.list_builds(owner="bob", limit=1)[0][0].id == hit.id


def test_dead_builds_are_failed_once(catalog: Catalog) -> None:
    alice = catalog.create_user("alice")
    build = catalog.create_build(alice, template_digest="a" * 64, template="a")
    catalog.claim_build("gone:1")
    catalog.update_build(build.id, heartbeat=utcnow() - timedelta(hours=1))
    seen = []

    def dead(build_id: str, worker: str | None, heartbeat: object) -> bool:
        seen.append((build_id, worker))
        return True

    assert catalog.fail_dead_builds(dead, "gone") == [build.id]
    assert seen == [(build.id, "gone:1")]
    assert catalog.get_build(build.id).error == "gone"
    assert catalog.fail_dead_builds(dead, "gone") == []


def test_cancel_requests_are_compare_and_set(catalog: Catalog) -> None:
    alice = catalog.create_user("alice")
    running = catalog.create_build(alice, template_digest="a" * 64, template="a")
    dying = catalog.create_build(alice, template_digest="b" * 64, template="b")
    queued = catalog.create_build(alice, template_digest="c" * 64, template="c")
    assert catalog.claim_build("h:1").id == running.id  # type: ignore[union-attr]
    assert catalog.claim_build("gone:2").id == dying.id  # type: ignore[union-attr]
    assert catalog.request_cancel(queued.id, "cancelled by alice") == BuildStatus.CANCELLED
    assert catalog.request_cancel(running.id, "cancelled by alice") == BuildStatus.CANCELLING
    assert catalog.request_cancel(running.id, "again") == BuildStatus.CANCELLING
    assert catalog.request_cancel(queued.id, "again") is None  # over already
    assert catalog.cancelling_builds([running.id, queued.id, dying.id]) == {running.id}
    assert catalog.get_build(running.id).error == "cancelled by alice"
    # Neither a success nor a failure wins over the cancel; the worker ends it.
    assert not catalog.finish_build(running.id, BuildStatus.SUCCEEDED)
    assert catalog.find_active_build(owner_id=alice.id, template_digest="a" * 64) is None
    assert catalog.finish_build(running.id, BuildStatus.CANCELLED,
                                expect=[BuildStatus.CANCELLING])
    # A build being cancelled whose server died ends cancelled, not failed.
    catalog.request_cancel(dying.id, "cancelled by alice")
    assert catalog.fail_dead_builds(lambda *_: True, "gone") == [dying.id]
    assert catalog.get_build(dying.id).status == BuildStatus.CANCELLED


def test_purged_images_stay_listed_but_hold_no_manifest(catalog: Catalog) -> None:
    alice = catalog.create_user("alice")
    bob = catalog.create_user("bob")
    image = catalog.create_image(alice, name="p", status="active", visibility="public",
                                 manifest_id="m" * 64, template_text="name: p\n",
                                 template_digest="t" * 64)
    assert "m" * 64 in catalog.live_manifest_ids()
    assert catalog.image_with_template("t" * 64, bob) is not None
    assert catalog.transition(image.id, [ImageStatus.ACTIVE], ImageStatus.PURGED,
                              manifest_id=None)
    assert "m" * 64 not in catalog.live_manifest_ids()
    assert catalog.image_with_template("t" * 64, bob) is None  # no longer a template hit
    assert catalog.image_with_template("t" * 64, bob, ImageStatus.PURGED) is not None
    assert catalog.resolve("p", bob).status == ImageStatus.PURGED
    assert catalog.get_image(image.id).template == "name: p\n"
