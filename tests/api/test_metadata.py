"""Validation of what users write into image metadata (rain.repo.metadata), through the
API and the CLI of a real `rain serve`: each rule is a 400 naming it; `rain.` is the
server's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from rain.client import Client
from tests.conftest import Server, run_cli
from tests.support.images import make_raw

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def token(server: Server) -> str:
    return str(Client(server.url, server.token).create_user("meta")["token"])


@pytest.fixture(scope="module")
def image(server: Server, token: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    disk = make_raw(tmp_path_factory.mktemp("meta") / "m.raw", size=1 << 20, seed=70)
    return str(Client(server.url, token).push(disk, name="meta-ok", version="1.0")["id"])


def call(server: Server, token: str, method: str, path: str, body: Any) -> httpx.Response:
    return httpx.request(method, server.url + path, json=body, timeout=30,
                         headers={"Authorization": f"Bearer {token}"})


BAD_CREATE = [
    ({"name": "../etc"}, "bad image name"),
    ({"name": "a/b"}, "bad image name"),
    ({"name": ".."}, "bad image name"),
    ({"name": "nul\x00byte"}, "bad image name"),
    ({"name": "two\nlines"}, "bad image name"),
    ({"name": "x" * 129}, "1-128 letters"),
    ({"name": ""}, "bad image name"),
    ({"name": "web:2"}, "bad image name"),
    ({"name": "c0ffee42"}, "reads as an id prefix"),
    ({"name": 7}, "name must be a string"),
    ({"name": "ok", "version": "1/2"}, "bad version"),
    ({"name": "ok", "version": "v" * 65}, "up to 64"),
    ({"name": "ok", "version": "1\n"}, "bad version"),
    ({"name": "ok", "tags": ["a b"]}, "bad tag"),
    ({"name": "ok", "tags": ["rain.trusted"]}, "reserved for the server"),
    ({"name": "ok", "tags": [f"t{n}" for n in range(101)]}, "at most 100 tags"),
    ({"name": "ok", "properties": {"k" * 10_000: "v"}}, "bad property key"),
    ({"name": "ok", "properties": {"a/b": "v"}}, "bad property key"),
    ({"name": "ok", "properties": {"rain.previous_sha256": "0" * 64}}, "reserved"),
    ({"name": "ok", "properties": {"RAIN.boot_seconds": "1"}}, "reserved"),
    ({"name": "ok", "properties": {"k": "v\x00"}}, "no control characters"),
    ({"name": "ok", "properties": {"k": "v" * 1025}}, "at most 1024"),
    ({"name": "ok", "properties": {"k": 5}}, "must be a string"),
    ({"name": "ok", "properties": {f"k{n}": "v" for n in range(129)}}, "at most 128"),
    ({"name": "ok", "description": "nul\x00"}, "bad description"),
    ({"name": "ok", "description": "d" * 8193}, "bad description"),
    ({"name": "ok", "os_distro": "deb ian"}, "bad os_distro"),
    ({"name": "ok", "arch": "a" * 65}, "bad arch"),
    ({"name": "ok", "packages": {"bad name": "1"}}, "bad package"),
    ({"name": "ok", "template_digest": "d" * 64}, "unknown image fields: template_digest"),
]


@pytest.mark.parametrize(("body", "phrase"), BAD_CREATE)
def test_create_refuses_bad_metadata(server: Server, token: str, body: dict[str, Any],
                                     phrase: str) -> None:
    before = Client(server.url, token).images(status=["any"])["total"]
    resp = call(server, token, "POST", "/v1/images", body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["code"] == "invalid_request" and phrase in err["message"], err
    assert "\n" not in err["message"] and len(err["message"]) < 300
    assert Client(server.url, token).images(status=["any"])["total"] == before  # nothing made


BAD_UPDATE = [
    ({"name": "a/b"}, "bad image name"),
    ({"version": ".."}, "bad version"),
    ({"add_tags": ["rain.x"]}, "reserved"),
    ({"remove_tags": ["a\nb"]}, "bad tag"),
    ({"properties": {"rain.previous_sha256": "forged"}}, "reserved"),
    ({"remove_properties": ["rain.boot_seconds"]}, "reserved"),
    ({"properties": {"x" * 200: "v"}}, "bad property key"),
    ({"properties": {"ok": "line\nbreak"}}, "no control characters"),
    ({"description": "\x07bell"}, "bad description"),
]


@pytest.mark.parametrize(("changes", "phrase"), BAD_UPDATE)
def test_update_refuses_bad_metadata(server: Server, token: str, image: str,
                                     changes: dict[str, Any], phrase: str) -> None:
    before = Client(server.url, token).show(image)
    resp = call(server, token, "PATCH", f"/v1/images/{image}", changes)
    assert resp.status_code == 400, resp.text
    assert phrase in resp.json()["error"]["message"]
    after = Client(server.url, token).show(image)
    assert {k: after[k] for k in ("name", "version", "tags", "properties", "description")} == \
        {k: before[k] for k in ("name", "version", "tags", "properties", "description")}


def test_good_metadata_still_goes_in(server: Server, token: str, image: str) -> None:
    c = Client(server.url, token)
    changed = c.update(image, properties={"hw:cpu_policy": "dedicated", "team.name": "sci"},
                       add_tags=["gpu", "v1.2"], description="two\nlines\tand a tab",
                       version="2.0~rc1+b1")
    assert changed["properties"]["hw:cpu_policy"] == "dedicated"
    assert changed["tags"] == ["gpu", "v1.2"] and changed["version"] == "2.0~rc1+b1"
    assert c.show("meta-ok:2.0~rc1+b1")["id"] == image


def test_tag_and_property_totals_are_capped_across_updates(server: Server, token: str,
                                                           image: str) -> None:
    c = Client(server.url, token)
    have = len(c.show(image)["tags"])
    c.update(image, add_tags=[f"cap{n}" for n in range(100 - have)])
    resp = call(server, token, "PATCH", f"/v1/images/{image}", {"add_tags": ["one-more"]})
    assert resp.status_code == 400 and "at most 100 tags" in resp.text
    c.update(image, remove_tags=[f"cap{n}" for n in range(100 - have)])


def test_cli_refuses_bad_names_and_reserved_properties(server: Server, token: str,
                                                       image: str, tmp_path: Path) -> None:
    env = server.env(token)
    disk = make_raw(tmp_path / "c.raw", size=1 << 20, seed=71)
    for args, phrase in [
            (["push", str(disk), "--name", "../../etc/passwd"], "bad image name"),
            (["push", str(disk), "--name", "ok", "--property", "rain.previous_sha256=x"],
             "reserved for the server"),
            (["set", image, "--property", "rain.previous_sha256=forged"], "reserved"),
            (["set", image, "--unset-property", "rain.boot_seconds"], "reserved"),
            (["set", image, "--name", "has space"], "bad image name")]:
        r = run_cli(*args, env=env, check=False)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, r.stderr
        assert lines[0].startswith("rain: error: ") and phrase in lines[0], lines[0]
    assert "rain.previous_sha256" not in Client(server.url, token).show(image)["properties"]
