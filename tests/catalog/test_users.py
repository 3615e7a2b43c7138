"""Migration 0005 and the catalog side of administration: disabled and deleted users,
groups, token records and node tokens, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from rain.catalog import Catalog, ImageQuery
from rain.catalog.db import catalog_exists
from rain.model import Conflict, ImageStatus, InvalidRequest, NotFound
from rain.model.clock import utcnow
from tests.conftest import fresh_postgres_db
from tests.support.catalogs import migrated_to


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'c.db'}"
    return fresh_postgres_db(request.getfixturevalue("postgres_url"), "u")


@pytest.fixture
def catalog(url: str) -> Iterator[Catalog]:
    c = Catalog(url)
    yield c
    c.close()


def test_0005_keeps_the_users_and_tokens_of_a_0004_database(url: str) -> None:
    engine, _ = migrated_to(url, "0004")
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO users (name, is_admin, created) "
                             "VALUES ('old', false, :t)"), {"t": now})
        conn.execute(sa.text("INSERT INTO tokens (user_id, token_hash, label, created) "
                             "VALUES (1, :h, 'legacy', :t)"), {"h": "0" * 64, "t": now})
    engine.dispose()
    assert catalog_exists(url)
    catalog = Catalog(url)
    try:
        old = catalog.get_user("old")
        assert old.disabled is False and old.deleted is None
        [token] = catalog.list_tokens(user="old")
        assert (token.label, token.user, token.node, token.last_used) == \
            ("legacy", "old", None, None)
        # The new schema takes tokens without a user: node tokens.
        record, secret = catalog.create_token(node="n01", label="rack 3")
        assert record.node == "n01" and record.user is None
        principal = catalog.user_for_token(secret)
        assert principal is not None and principal.node == "n01" and not principal.is_admin
    finally:
        catalog.close()


def test_catalog_exists_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "nothing" / "catalog.db"
    assert not catalog_exists(f"sqlite:///{path}")
    assert not path.parent.exists()


def test_disabled_users_resolve_as_disabled_and_tokens_record_their_last_use(
        catalog: Catalog) -> None:
    catalog.create_user("alice")
    secret = catalog.issue_token("alice", "laptop")
    [before] = catalog.list_tokens(user="alice")
    assert before.last_used is None
    user = catalog.user_for_token(secret)
    assert user is not None and not user.disabled
    [after] = catalog.list_tokens(user="alice")
    assert after.last_used is not None and after.created <= after.last_used
    catalog.user_for_token(secret)  # within the minute: not written again
    assert catalog.list_tokens(user="alice")[0].last_used == after.last_used
    catalog.set_user_disabled("alice", True)
    again = catalog.user_for_token(secret)
    assert again is not None and again.disabled  # the repository refuses it with 401
    assert catalog.set_user_disabled("alice", False).disabled is False


def test_revoking_one_token_leaves_the_others(catalog: Catalog) -> None:
    catalog.create_user("alice")
    first, second = catalog.issue_token("alice", "a"), catalog.issue_token("alice", "b")
    ids = [t.id for t in catalog.list_tokens(user="alice")]
    revoked = catalog.revoke_token(ids[0])
    assert revoked.label == "a" and revoked.user == "alice"
    assert catalog.user_for_token(first) is None
    assert catalog.user_for_token(second) is not None
    with pytest.raises(NotFound):
        catalog.revoke_token(ids[0])
    catalog.revoke_token(ids[1])  # the newest: its id is not handed out again
    assert catalog.create_token(user="alice")[0].id > ids[1]
    with pytest.raises(InvalidRequest):
        catalog.create_token(user="alice", label="x\n" * 3)
    with pytest.raises(InvalidRequest):
        catalog.create_token(user="alice", node="n01")


def test_deleting_a_user_refuses_while_they_own_images_unless_transferred(
        catalog: Catalog) -> None:
    alice = catalog.create_user("alice", groups=["physics"])
    catalog.create_user("bob")
    token = catalog.issue_token("alice")
    live = catalog.create_image(alice, name="web", status="active", size=10).id
    gone = catalog.create_image(alice, name="old", status=str(ImageStatus.DELETED)).id
    shared = catalog.create_image(catalog.get_user("bob"), name="b", status="active").id
    catalog.add_member(shared, user="alice")
    with pytest.raises(Conflict, match="owns 1 image"):
        catalog.delete_user("alice")
    assert catalog.user_for_token(token) is not None  # nothing changed
    with pytest.raises(NotFound):
        catalog.delete_user("alice", transfer_to="nobody")
    tomb, moved = catalog.delete_user("alice", transfer_to="bob")
    assert moved == 1 and tomb.deleted is not None and tomb.disabled and tomb.groups == []
    assert catalog.get_image(live).owner == "bob"
    assert catalog.get_image(gone).owner == "alice"  # what it left still names it
    assert catalog.get_image(shared).members == []
    assert catalog.user_for_token(token) is None
    assert catalog.get_group("physics").members == []
    with pytest.raises(NotFound):
        catalog.get_user("alice")
    with pytest.raises(NotFound):
        catalog.add_member(shared, user="alice")
    with pytest.raises(Conflict, match="deleted"):
        catalog.create_user("alice")
    assert [u.name for u in catalog.list_users()] == ["bob"]
    assert [u.name for u in catalog.list_users(include_deleted=True)] == ["alice", "bob"]


def test_deleting_a_user_with_a_build_running_is_refused(catalog: Catalog) -> None:
    carol = catalog.create_user("carol")
    catalog.create_build(carol, template_digest="d" * 64, template="name: x\n")
    with pytest.raises(Conflict, match="build"):
        catalog.delete_user("carol")


def test_groups_and_their_members_decide_what_is_shared(catalog: Catalog) -> None:
    alice = catalog.create_user("alice")
    bob = catalog.create_user("bob")
    catalog.create_user("carol")
    image = catalog.create_image(alice, name="team", status="active", visibility="shared").id
    catalog.create_group("physics")
    with pytest.raises(Conflict):
        catalog.create_group("physics")
    catalog.add_member(image, group="physics")

    def sees(name: str) -> bool:
        found, _ = catalog.search(ImageQuery(name="team"), catalog.get_user(name))
        return [i.id for i in found] == [image]

    assert not sees("bob")
    assert catalog.add_group_members("physics", ["bob", "carol"]).members == ["bob", "carol"]
    assert sees("bob") and sees("carol")
    with pytest.raises(NotFound):  # all or none: carol stays in
        catalog.remove_group_members("physics", ["carol", "nobody"])
    assert catalog.get_group("physics").members == ["bob", "carol"]
    catalog.remove_group_members("physics", ["bob"])
    assert not sees("bob") and sees("carol")
    with pytest.raises(NotFound):
        catalog.remove_group_members("physics", ["bob"])
    assert [g.name for g in catalog.list_groups()] == ["physics"]
    catalog.delete_group("physics")
    assert not sees("carol") and catalog.get_image(image).members == []
    assert bob.groups == []
    with pytest.raises(NotFound):
        catalog.get_group("physics")


def test_node_tokens_are_listed_by_node(catalog: Catalog) -> None:
    catalog.create_user("alice")
    catalog.issue_token("alice")
    catalog.create_token(node="n01")
    catalog.create_token(node="n02")
    assert [t.node for t in catalog.list_tokens(node="n01")] == ["n01"]
    assert len(catalog.list_tokens(everyone=True)) == 3
    assert all(t.created > utcnow() - timedelta(minutes=5)
               for t in catalog.list_tokens(everyone=True))
