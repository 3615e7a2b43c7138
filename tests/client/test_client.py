"""rain.client against the real service served by a thread of this process
(tests/support/servers.py): real HTTP on loopback, no `rain serve` subprocess."""

from __future__ import annotations

from pathlib import Path

import pytest

from rain import __version__
from rain.client import Client
from rain.model.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    Unauthorized,
)
from tests.support.images import MiB, make_raw, sha256
from tests.support.servers import ThreadServer

pytestmark = pytest.mark.inprocess


@pytest.fixture(scope="module")
def admin(thread_server: ThreadServer) -> Client:
    return Client(thread_server.url, thread_server.token)


@pytest.fixture(scope="module")
def alice(thread_server: ThreadServer, admin: Client) -> Client:
    return Client(thread_server.url, admin.create_user("alice")["token"])


def test_health_and_whoami(admin: Client) -> None:
    assert admin.health() == {"status": "ok", "version": __version__}
    assert admin.whoami()["name"] == "admin" and admin.whoami()["admin"]


def test_push_then_pull_gives_the_same_bytes(admin: Client, tmp_path: Path) -> None:
    img = make_raw(tmp_path / "a.raw", size=3 * MiB + 17, seed=2)
    image = admin.push(img, name="roundtrip")
    assert image["status"] == "active" and image["sha256"] == sha256(img)
    result = admin.pull(image["id"], tmp_path / "back.raw")
    assert result["sha256"] == sha256(img) == sha256(tmp_path / "back.raw")
    assert admin.get_range(image["id"], 10, 99) == img.read_bytes()[10:99]


def test_server_errors_come_back_as_their_classes(thread_server: ThreadServer,
                                                  admin: Client, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        admin.show("no-such-image")
    with pytest.raises(Unauthorized):
        Client(thread_server.url, "rain_not-a-token").whoami()
    with pytest.raises(Conflict):
        admin.create_user("admin")
    with pytest.raises(InvalidRequest, match="unknown requirements"):
        admin.match({"colour": "blue"}, [])


def test_others_see_only_what_is_shared(admin: Client, alice: Client, tmp_path: Path) -> None:
    image = admin.push(make_raw(tmp_path / "p.raw", size=MiB), name="private-one")
    with pytest.raises(NotFound):
        alice.show(image["id"])
    admin.share(image["id"], user="alice")
    assert alice.show(image["id"])["id"] == image["id"]
    with pytest.raises(Forbidden):
        alice.gc()
    with pytest.raises(Forbidden):
        alice.create_user("mallory")


def test_a_quota_is_refused_over_http(thread_server: ThreadServer, admin: Client,
                                      tmp_path: Path) -> None:
    small = Client(thread_server.url,
                   admin.create_user("small", quota_images=1)["token"])
    small.push(make_raw(tmp_path / "a.raw", size=MiB), name="first")
    with pytest.raises(QuotaExceeded):
        small.push(make_raw(tmp_path / "b.raw", size=MiB, seed=3), name="second")


def test_pulls_are_counted_in_usage(admin: Client, tmp_path: Path) -> None:
    image = admin.push(make_raw(tmp_path / "u.raw", size=MiB, seed=4), name="used")
    admin.pull(image["id"], tmp_path / "out.raw")
    usage = admin.usage(image["id"])
    assert usage["pulls"] == 1 and usage["bytes"] == MiB
