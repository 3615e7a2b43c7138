"""Catalog on SQLite and on a real PostgreSQL: users, visibility, search, match, usage."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from rain.catalog import Catalog, ImageQuery, Preference, Requirements
from rain.model import Conflict, ImageStatus, InvalidRequest, NotFound, User
from rain.model.clock import utcnow
from tests.support.catalogs import active


def test_tokens_are_hashed_and_resolve_to_users(catalog: Catalog) -> None:
    catalog.create_user("alice", groups=["physics"])
    token = catalog.issue_token("alice")
    assert token.startswith("rain_") and len(token) > 40
    user = catalog.user_for_token(token)
    assert user is not None and user.name == "alice" and user.groups == ["physics"]
    assert catalog.user_for_token(token + "x") is None
    with catalog.db.session() as s:
        stored = s.execute(sa.text("SELECT token_hash FROM tokens")).scalars().all()
    assert token not in stored and len(stored[0]) == 64
    with pytest.raises(Conflict):
        catalog.create_user("alice")
    with pytest.raises(InvalidRequest):
        catalog.create_user("bad name!")


def test_visibility_matrix(catalog: Catalog) -> None:
    alice = catalog.create_user("alice")
    bob = catalog.create_user("bob", groups=["physics"])
    carol = catalog.create_user("carol")
    admin = catalog.create_user("root", admin=True)
    private = active(catalog, alice, "private-img")
    public = active(catalog, alice, "public-img", visibility="public")
    to_bob = active(catalog, alice, "bob-img", visibility="shared")
    catalog.add_member(to_bob, user="bob")
    to_group = active(catalog, alice, "group-img", visibility="shared")
    catalog.add_member(to_group, group="physics")
    killed = catalog.create_image(alice, name="killed", status="killed").id

    def names(viewer: User | None) -> set[str]:
        images, total = catalog.search(ImageQuery(status=["any"]), viewer)
        assert total == len(images)
        return {i.name for i in images}

    assert names(alice) == {"private-img", "public-img", "bob-img", "group-img"}
    assert names(bob) == {"public-img", "bob-img", "group-img"}
    assert names(carol) == {"public-img"}
    assert names(None) == {"public-img"}
    assert "killed" in names(admin)
    for viewer, ref in [(carol, private), (carol, to_bob), (carol, to_group), (bob, private),
                        (alice, killed), (None, private)]:
        with pytest.raises(NotFound):
            catalog.resolve(ref, viewer)
    assert catalog.resolve(public, carol).id == public
    assert catalog.resolve("group-img", bob).id == to_group
    catalog.remove_member(to_group, group="physics")
    assert "group-img" not in names(bob)


def test_search_filters_sort_and_pages(catalog: Catalog) -> None:
    alice = catalog.create_user("alice")
    a = active(catalog, alice, "web", os_distro="debian", os_release="12", arch="amd64",
               size=5 * 2**30, tags=["hpc", "gpu"], properties={"owner_team": "sci"},
               packages={"nginx": "1.22.1-9", "openssl": "3.0.11-1~deb12u2"})
    b = active(catalog, alice, "web-old", os_distro="debian", os_release="11", arch="amd64",
               size=2 * 2**30, tags=["hpc"], packages={"nginx": "1.18.0-6.1+deb11u3"})
    c = active(catalog, alice, "alma", os_distro="almalinux", os_release="9", arch="x86_64",
               size=10 * 2**30, packages={"httpd": "2.4.57"})

    def ids(**kw) -> list[str]:  # type: ignore[no-untyped-def]
        images, _ = catalog.search(ImageQuery.from_params(kw), alice)
        return [i.id for i in images]

    assert set(ids(os_distro="debian")) == {a, b}
    assert ids(tags=["hpc", "gpu"]) == [a]
    assert ids(properties={"owner_team": "sci"}) == [a]
    assert ids(packages=["nginx>=1.22"]) == [a]
    assert set(ids(packages=["nginx"])) == {a, b}
    assert ids(packages=["nginx<1.20"]) == [b]
    assert ids(packages=["openssl>=3.0.11-1~deb12u1"]) == [a]
    assert ids(packages=["nginx>=1.22", "openssl"]) == [a]
    assert ids(min_size=3 * 2**30, max_size=6 * 2**30) == [a]
    assert ids(name="web*", sort="size", descending=False) == [b, a]
    assert ids(sort="-size") == [c, a, b]
    assert ids(sort="+size", limit=1, offset=1) == [a]
    _, total = catalog.search(ImageQuery(limit=1), alice)
    assert total == 3
    assert ids(created_after=utcnow() + timedelta(hours=1)) == []
    catalog.update_image(b, last_access=utcnow() - timedelta(days=40))
    catalog.update_image(a, last_access=utcnow() - timedelta(days=2))
    catalog.update_image(c, created=utcnow() - timedelta(days=60))
    assert set(ids(unused_for=timedelta(days=30))) == {b, c}
    with pytest.raises(InvalidRequest):
        ids(sort="nonsense")
    with pytest.raises(InvalidRequest):
        ids(packages=["nginx>>1"])


def test_resolve_name_version_prefers_newest_active(catalog: Catalog) -> None:
    alice = catalog.create_user("alice")
    v1 = active(catalog, alice, "app", version="1.9")
    v2 = active(catalog, alice, "app", version="1.10")
    catalog.create_image(alice, name="app", version="2.0", status="queued")
    assert catalog.resolve("app", alice).id == v2  # 1.10 > 1.9, active preferred over queued
    assert catalog.resolve("app:1.9", alice).id == v1
    with pytest.raises(NotFound):
        catalog.resolve("app:7", alice)


def test_match_ranks_with_reasons(catalog: Catalog) -> None:
    alice = catalog.create_user("alice")
    hpc = active(catalog, alice, "hpc", os_distro="debian", os_release="12", arch="amd64",
                 virtual_size=8 * 2**30, tags=["hpc"],
                 packages={"openmpi-bin": "4.1.4-3", "python3-numpy": "1:1.24.2-1"})
    plain = active(catalog, alice, "plain", os_distro="debian", os_release="12", arch="amd64",
                   virtual_size=4 * 2**30, packages={"openmpi-bin": "4.1.4-3"})
    active(catalog, alice, "old", os_distro="debian", os_release="10", arch="amd64",
           virtual_size=8 * 2**30, packages={"openmpi-bin": "3.1.3-11"})
    active(catalog, alice, "small", os_distro="debian", os_release="12", arch="amd64",
           virtual_size=1 * 2**30, packages={"openmpi-bin": "4.1.4-3"})
    catalog.update_image(plain, access_count=50)
    req = Requirements(os_distro="debian", release=">=11", arch="amd64",
                       packages=["openmpi-bin>=4"], min_disk=2 * 2**30)
    prefs = [Preference.parse("tag:hpc=2"), Preference.parse("package:python3-numpy>=1:1.20"),
             Preference.parse("popular=0.5")]
    matches = catalog.match(req, prefs, alice)
    assert [m.image.id for m in matches] == [hpc, plain]  # old: release; small: disk
    assert matches[0].score == pytest.approx(3.0)
    assert matches[1].score == pytest.approx(0.5)
    assert any("tag hpc" in r and r.startswith("+2.00") for r in matches[0].reasons)
    assert any("python3-numpy" in r and "has 1:1.24.2-1" in r for r in matches[0].reasons)
    with pytest.raises(InvalidRequest):
        catalog.match(req, [Preference.parse("colour:blue")], alice)


def test_usage_log_and_quota_totals(catalog: Catalog) -> None:
    alice = catalog.create_user("alice")
    bob = catalog.create_user("bob")
    img = active(catalog, alice, "x", stored_bytes=1234)
    catalog.create_image(alice, name="gone", status="deleted", stored_bytes=999)
    now = utcnow()
    catalog.record_usage(img, bob.id, "pull", 100, now)
    catalog.record_usage(img, alice.id, "pull", 50, now + timedelta(seconds=1))
    catalog.record_access(img, now)
    records = catalog.usage(image_id=img)
    assert [(r.user, r.bytes) for r in records] == [("alice", 50), ("bob", 100)]
    assert [r.user for r in catalog.usage(user="bob")] == ["bob"]
    assert catalog.get_image(img).access_count == 1
    assert catalog.usage_totals(alice.id) == (1234, 1)


def test_status_transition_is_compare_and_set(catalog: Catalog) -> None:
    alice = catalog.create_user("alice")
    img = catalog.create_image(alice, name="x").id
    assert catalog.transition(img, [ImageStatus.QUEUED], ImageStatus.SAVING)
    assert not catalog.transition(img, [ImageStatus.QUEUED], ImageStatus.SAVING)


def test_match_report_says_which_requirement_removed_how_many(catalog: Catalog) -> None:
    alice = catalog.create_user("alice")
    for name, release, packages in (("a", "12", {"openmpi-bin": "4.1.4-3"}),
                                    ("b", "12", {"openmpi-bin": "3.1.3-11"}),
                                    ("c", "11", {"openmpi-bin": "4.1.4-3"})):
        active(catalog, alice, name, os_distro="debian", os_release=release, arch="amd64",
               virtual_size=4 * 2**30, packages=packages)
    active(catalog, alice, "d", os_distro="ubuntu", os_release="24.04", arch="amd64")
    req = Requirements(os_distro="debian", release=">=12", arch="amd64",
                       packages=["openmpi-bin>=4.1"], min_disk=8 * 2**30)
    report = catalog.match_report(req, [], alice)
    assert report.matches == []
    assert report.candidates == 4
    assert report.to_dict()["eliminated"] == [
        {"requirement": "os_distro debian", "removed": 1, "left": 3},
        {"requirement": "release >=12", "removed": 1, "left": 2},
        {"requirement": "arch amd64", "removed": 0, "left": 2},
        {"requirement": "min_disk 8G", "removed": 2, "left": 0},
        {"requirement": "package openmpi-bin>=4.1", "removed": 0, "left": 0},
    ]
    found = catalog.match_report(Requirements(os_distro="debian", packages=["openmpi-bin>=4.1"]),
                                 [], alice)
    assert sorted(m.image.name for m in found.matches) == ["a", "c"]
    assert [(e["requirement"], e["removed"]) for e in found.eliminated] == [
        ("os_distro debian", 1), ("package openmpi-bin>=4.1", 1)]
    bob = catalog.create_user("bob")  # sees none of alice's private images
    assert catalog.match_report(req, [], bob).candidates == 0
