"""The reference rule (rain.catalog.references) on SQLite and PostgreSQL: own images first,
then shared, then public; ambiguity refused with the candidates; id prefixes."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from rain.catalog import Catalog, is_id_prefix
from rain.model import AmbiguousReference, ImageStatus, NotFound, User
from tests.support.catalogs import active


@pytest.fixture
def people(catalog: Catalog) -> dict[str, User]:
    return {"a": catalog.create_user("a"), "b": catalog.create_user("b", groups=["lab"]),
            "c": catalog.create_user("c"), "d": catalog.create_user("d", groups=["lab"]),
            "root": catalog.create_user("root", admin=True)}


def test_own_private_image_beats_a_public_one_of_the_same_name(
        catalog: Catalog, people: dict[str, User]) -> None:
    a, b = people["a"], people["b"]
    mine = active(catalog, b, "dup", version="1")
    squat = active(catalog, a, "dup", version="1", visibility="public")
    assert catalog.resolve("dup:1", b).id == mine
    assert catalog.resolve("dup", b).id == mine
    # a higher public version does not win over the caller's own image either
    active(catalog, a, "dup", version="9", visibility="public")
    assert catalog.resolve("dup", b).id == mine
    # someone with no image of that name gets the public one
    assert catalog.resolve("dup:1", people["c"]).id == squat
    assert catalog.resolve("dup:1", None).id == squat


def test_shared_tier_beats_public_and_loses_to_own(catalog: Catalog,
                                                   people: dict[str, User]) -> None:
    a, b, c, d = people["a"], people["b"], people["c"], people["d"]
    own = active(catalog, b, "lib", version="1")  # the oldest of the three
    to_lab = active(catalog, a, "lib", version="1", visibility="shared")
    catalog.add_member(to_lab, group="lab")
    public = active(catalog, c, "lib", version="1", visibility="public")  # the newest
    assert catalog.resolve("lib:1", b).id == own
    assert catalog.resolve("lib:1", d).id == to_lab  # shared with d's group
    assert catalog.resolve("lib", d).id == to_lab
    assert catalog.resolve("lib:1", c).id == public  # c's own public one
    assert catalog.resolve("lib:1", people["root"]).id == public


def test_two_owners_in_one_tier_are_ambiguous_with_candidates(
        catalog: Catalog, people: dict[str, User]) -> None:
    a, b, c = people["a"], people["b"], people["c"]
    x = active(catalog, a, "pub", version="1", visibility="public")
    y = active(catalog, c, "pub", version="2", visibility="public")
    with pytest.raises(AmbiguousReference) as caught:
        catalog.resolve("pub", b)
    assert caught.value.status == 409
    assert sorted(caught.value.details["candidates"]) == sorted([x, y])
    assert x in caught.value.message and y in caught.value.message
    assert "public" in caught.value.message
    # a version only one owner has is not ambiguous
    assert catalog.resolve("pub:2", b).id == y
    # shared with b by two owners: ambiguous too
    for owner in (a, c):
        image = active(catalog, owner, "both", visibility="shared")
        catalog.add_member(image, user="b")
    with pytest.raises(AmbiguousReference, match="shared with you"):
        catalog.resolve("both", b)


def test_admins_resolve_own_then_shared_then_public_then_the_rest(
        catalog: Catalog, people: dict[str, User]) -> None:
    a, b, root = people["a"], people["b"], people["root"]
    hidden = active(catalog, b, "adm")
    public = active(catalog, a, "adm", visibility="public")
    assert catalog.resolve("adm", root).id == public
    solo = active(catalog, b, "only-b")
    assert catalog.resolve("only-b", root).id == solo
    active(catalog, a, "only-b")
    with pytest.raises(AmbiguousReference, match="other users'"):
        catalog.resolve("only-b", root)
    assert hidden != public


def test_id_prefixes_unique_ambiguous_and_invisible(catalog: Catalog,
                                                    people: dict[str, User]) -> None:
    a, b = people["a"], people["b"]
    mine = active(catalog, a, "p")
    assert catalog.resolve(mine[:8], a).id == mine
    assert catalog.resolve(mine[:4].upper(), a).id == mine
    with pytest.raises(NotFound):  # fewer than 4 hex digits are no prefix
        catalog.resolve(mine[:3], a)
    # two ids made to share 8 characters: ambiguous, both listed
    twin_a, twin_b = "abcdef01-0000-4000-8000-000000000001", "abcdef01-0000-4000-8000-000000000002"
    for image_id in (twin_a, twin_b):
        made = active(catalog, a, "twin")
        with catalog.db.session() as s:
            s.execute(sa.text("UPDATE images SET id = :new WHERE id = :old"),
                      {"new": image_id, "old": made})
    with pytest.raises(AmbiguousReference) as caught:
        catalog.resolve("abcdef01", a)
    assert sorted(caught.value.details["candidates"]) == [twin_a, twin_b]
    # b may see neither: the prefix is no image at all for b (no leak, not even "ambiguous")
    with pytest.raises(NotFound):
        catalog.resolve("abcdef01", b)
    with pytest.raises(NotFound):
        catalog.resolve(mine[:8], b)
    # once one of them is public, b's prefix is unique
    catalog.update_image(twin_b, visibility="public")
    assert catalog.resolve("abcdef01", b).id == twin_b
    # a deleted image is not a candidate
    catalog.transition(twin_a, [ImageStatus.ACTIVE], ImageStatus.DELETED)
    assert catalog.resolve("abcdef01", a).id == twin_b


def test_an_exact_name_beats_an_id_prefix(catalog: Catalog,
                                          people: dict[str, User]) -> None:
    a = people["a"]
    target = active(catalog, a, "target")
    # an older catalog may hold a name that reads as a prefix (new names cannot)
    legacy = active(catalog, a, target[:8])
    assert catalog.resolve(target[:8], a).id == legacy
    assert catalog.resolve(target[:9], a).id == target


def test_is_id_prefix() -> None:
    assert is_id_prefix("3f1c") and is_id_prefix("3F1C9A2B") and is_id_prefix("3f1c9a2b-12")
    assert not is_id_prefix("3f1") and not is_id_prefix("debian") and not is_id_prefix("3f1c%")
    assert not is_id_prefix("-3f1c") and not is_id_prefix("3f-1-")  # < 4 hex digits
    assert not is_id_prefix("0" * 37)


def test_template_hits_prefer_own_images(catalog: Catalog,
                                         people: dict[str, User]) -> None:
    a, b = people["a"], people["b"]
    mine = active(catalog, b, "t", template_digest="d" * 64)
    active(catalog, a, "t", visibility="public", template_digest="d" * 64)  # newer
    hit = catalog.image_with_template("d" * 64, b)
    assert hit is not None and hit.id == mine


def test_deleted_image_is_seen_by_who_saw_it(catalog: Catalog,
                                             people: dict[str, User]) -> None:
    a, b = people["a"], people["b"]
    private = active(catalog, a, "gone-private")
    public = active(catalog, a, "gone-public", visibility="public")
    for image_id in (private, public):
        catalog.transition(image_id, [ImageStatus.ACTIVE], ImageStatus.DELETED)
    seen = catalog.deleted_image(private, a)
    assert seen is not None and seen.status == ImageStatus.DELETED
    assert catalog.deleted_image(private, b) is None
    assert catalog.deleted_image(public, b) is not None
    assert catalog.deleted_image(public, None) is not None
    live = active(catalog, a, "alive")
    assert catalog.deleted_image(live, a) is None
