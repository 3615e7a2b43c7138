"""Access rules are the repository's, not the routes': each is called here on the service
itself (no HTTP, no route), as a user the rule keeps out. If a check lived only in a
route, these calls would succeed.

What another user may not see is NotFound (it would confirm the thing exists);
what they see but may not change is Forbidden.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rain.model import Build, Forbidden, Image, ImageStatus, NotFound, User
from rain.repo import Repository

DIGEST = "d" * 64


@dataclass
class Env:
    repo: Repository
    alice: User
    bob: User
    admin: User
    private: Image  # alice's
    public: Image  # alice's too, but anyone may see it

    def build_of(self, image: Image) -> Build:
        """A finished build of alice's that made `image` (a template hit)."""
        return self.repo.build_records.record_template_hit(
            self.alice, DIGEST, "name: x\n", [], image)


def _push(repo: Repository, user: User, path: Path, name: str, visibility: str) -> Image:
    image = repo.create(user, {"name": name, "visibility": visibility})
    return repo.upload_file(user, image.id, path)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    repo = Repository.open(tmp_path / "data", f"sqlite:///{tmp_path / 'c.db'}")
    alice, _ = repo.local_create_user("alice")
    bob, _ = repo.local_create_user("bob")
    admin, _ = repo.local_create_user("root", admin=True)
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(64 * 1024) + bytes(1024 * 1024))
    yield Env(repo, alice, bob, admin, _push(repo, alice, disk, "secret", "private"),
              _push(repo, alice, disk, "shown", "public"))
    repo.close()


def test_a_build_of_an_image_you_cannot_see_does_not_exist_for_you(env: Env) -> None:
    records = env.repo.build_records
    build = env.build_of(env.private)
    with pytest.raises(NotFound):
        records.get(env.bob, build.id)
    with pytest.raises(NotFound):
        records.get(env.bob, build.id[:8])  # nor by a prefix of its id
    with pytest.raises(NotFound):
        records.request_cancel(env.bob, build.id)
    with pytest.raises(NotFound):
        records.list_builds(env.bob, image=env.private.id)
    assert records.list_builds(env.bob) == ([], 0)
    # Its owner and an admin do see it.
    assert records.get(env.alice, build.id).id == build.id
    assert records.get(env.admin, build.id[:8]).id == build.id
    assert records.list_builds(env.admin)[1] == 1


def test_a_build_you_can_see_is_still_only_its_owners_to_cancel(env: Env) -> None:
    records = env.repo.build_records
    queued = records.queue_build(env.alice, "e" * 64, "name: y\n", [])
    shown = env.build_of(env.public)
    assert records.get(env.bob, shown.id).id == shown.id  # it made an image bob may see
    with pytest.raises(Forbidden, match="only the owner or an admin"):
        records.request_cancel(env.bob, shown.id)
    with pytest.raises(NotFound):  # a queued build has no image: bob cannot see it at all
        records.request_cancel(env.bob, queued.id)
    assert records.request_cancel(env.admin, queued.id).status == "cancelled"


def test_template_records_and_hits_follow_the_image_rules(env: Env) -> None:
    repo = env.repo
    with pytest.raises(NotFound):
        repo.record_template(env.bob, env.private.id, DIGEST)
    with pytest.raises(Forbidden):
        repo.record_template(env.bob, env.public.id, DIGEST)
    assert repo.record_template(env.alice, env.private.id, DIGEST).template_digest == DIGEST
    # A template hit is an image the viewer may see, never someone's private one.
    assert repo.image_with_template(env.bob, DIGEST) is None
    hit = repo.image_with_template(env.alice, DIGEST)
    assert hit is not None and hit.id == env.private.id


def test_only_the_owner_rebuilds_a_purged_image(env: Env) -> None:
    repo = env.repo
    parent = env.public
    child = repo.create(env.alice, {"name": "child", "parent": parent.id,
                                    "visibility": "public"})
    repo.catalog.transition(child.id, [ImageStatus.QUEUED], ImageStatus.PURGED)
    with pytest.raises(Forbidden):
        repo.rebuild_base(env.bob, child.id)
    assert repo.rebuild_base(env.alice, child.id).id == parent.id


def test_a_token_is_its_users_to_revoke(env: Env) -> None:
    repo = env.repo
    token, _ = repo.tokens.create_token(env.alice, label="laptop")
    with pytest.raises(NotFound):
        repo.tokens.revoke_token(env.bob, token.id)
    with pytest.raises(Forbidden):
        repo.tokens.create_token(env.bob, user="alice")
    assert [t.id for t in repo.tokens.list_tokens(env.alice) if t.label == "laptop"] == [token.id]
    assert repo.tokens.revoke_token(env.alice, token.id).id == token.id


def test_users_and_groups_are_for_admins(env: Env) -> None:
    users = env.repo.users
    with pytest.raises(Forbidden):
        users.list_users(env.bob)
    with pytest.raises(Forbidden):
        users.show_user(env.bob, "alice")
    assert users.show_user(env.bob, "bob").name == "bob"  # but anyone may see themselves
    with pytest.raises(Forbidden):
        users.set_user_disabled(env.bob, "alice", True)
    with pytest.raises(Forbidden):
        users.create_group(env.bob, "staff")
    with pytest.raises(Forbidden, match="yourself"):
        users.delete_user(env.admin, "root")
    assert users.set_user_disabled(env.admin, "alice", True).disabled
