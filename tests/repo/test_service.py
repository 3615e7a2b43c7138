"""The repository service called directly — no HTTP, no subprocess: a Repository over a
temporary data dir with its SQLite catalog, as `rain serve` opens it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rain.catalog import ImageQuery
from rain.model import User
from rain.model.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    Unauthorized,
)
from rain.repo import Repository
from tests.support.images import MiB, make_raw, sha256
from tests.support.servers import open_repository

pytestmark = pytest.mark.inprocess


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    r = open_repository(tmp_path / "data")
    yield r
    r.close()


@pytest.fixture
def admin(repo: Repository) -> User:
    user = repo.authenticate(repo.bootstrap_admin())
    assert user is not None
    return user


def user(repo: Repository, admin: User, name: str, **kw: int) -> User:
    _, token = repo.create_user(admin, name, **kw)  # type: ignore[arg-type]
    found = repo.authenticate(token)
    assert found is not None and found.name == name
    return found


def push(repo: Repository, viewer: User, path: Path, name: str) -> str:
    image = repo.create(viewer, {"name": name})
    return repo.upload_file(viewer, image.id, path).id


def test_the_first_admin_is_made_once(repo: Repository) -> None:
    token = repo.bootstrap_admin()
    assert token and repo.bootstrap_admin() is None
    me = repo.authenticate(token)
    assert me is not None and me.name == "admin" and me.is_admin
    with pytest.raises(Unauthorized):
        repo.authenticate(token + "x")


def test_only_an_admin_creates_users(repo: Repository, admin: User) -> None:
    alice = user(repo, admin, "alice")
    with pytest.raises(Forbidden):
        repo.create_user(alice, "mallory")
    with pytest.raises(Unauthorized):
        repo.create_user(None, "mallory")
    with pytest.raises(Conflict):
        repo.create_user(admin, "alice")
    with pytest.raises(InvalidRequest):
        repo.create_user(admin, "../etc")


def test_an_upload_is_stored_and_reads_back(repo: Repository, admin: User,
                                            tmp_path: Path) -> None:
    img = make_raw(tmp_path / "a.raw", size=2 * MiB)
    image = repo.get(admin, push(repo, admin, img, "web"))
    assert image.status == "active" and image.sha256 == sha256(img)
    download = repo.open_download(admin, "web")
    assert (download.sha256, download.size) == (sha256(img), 2 * MiB)


def test_the_same_bytes_are_stored_once(repo: Repository, admin: User, tmp_path: Path) -> None:
    img = make_raw(tmp_path / "a.raw", size=2 * MiB, data_fraction=1.0)
    push(repo, admin, img, "one")
    chunks = sum(1 for _ in repo.store.list_chunks())
    push(repo, admin, img, "two")
    assert sum(1 for _ in repo.store.list_chunks()) == chunks


def test_a_private_image_is_invisible_to_others(repo: Repository, admin: User,
                                                tmp_path: Path) -> None:
    alice, bob = user(repo, admin, "alice"), user(repo, admin, "bob")
    image_id = push(repo, alice, make_raw(tmp_path / "a.raw", size=MiB), "mine")
    with pytest.raises(NotFound):
        repo.get(bob, image_id)
    assert repo.search(bob, ImageQuery())[1] == 0
    repo.share(alice, image_id, user="bob")
    assert repo.get(bob, image_id).id == image_id
    with pytest.raises(Forbidden):
        repo.delete(bob, image_id)


def test_quotas_hold(repo: Repository, admin: User, tmp_path: Path) -> None:
    small = user(repo, admin, "small", quota_images=1, quota_bytes=3 * MiB)
    push(repo, small, make_raw(tmp_path / "a.raw", size=MiB), "first")
    with pytest.raises(QuotaExceeded):
        repo.create(small, {"name": "second"})


def test_a_pull_is_recorded_as_usage(repo: Repository, admin: User, tmp_path: Path) -> None:
    image_id = push(repo, admin, make_raw(tmp_path / "a.raw", size=MiB), "web")
    download = repo.open_download(admin, image_id)
    repo.record_pull(admin, download.image, download.size, fresh=True)
    records = repo.usage(admin, image_id)
    assert [(u.action, u.bytes) for u in records] == [("pull", MiB)]


def test_a_deleted_image_is_gone_and_gc_is_admin_only(repo: Repository, admin: User,
                                                      tmp_path: Path) -> None:
    alice = user(repo, admin, "alice")
    image_id = push(repo, alice, make_raw(tmp_path / "a.raw", size=MiB), "tmp")
    repo.delete(alice, image_id)
    with pytest.raises(NotFound):
        repo.open_download(alice, image_id)
    with pytest.raises(Forbidden):
        repo.gc(alice)
    assert repo.gc(admin).to_dict()["chunks_kept"] >= 0
