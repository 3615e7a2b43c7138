"""End-to-end: a real `rain serve` process on loopback, driven by the CLI and the client.

Covers push/pull, dedup, formats and conversion, Range/ETag/digest headers,
permissions, quotas, deactivation, protection, usage, write-once, corrupt and
malicious images, interrupted uploads, corrupt store data and gc.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from rain.client import Client
from rain.model.errors import (
    Conflict,
    Forbidden,
    InvalidImage,
    NotFound,
    QuotaExceeded,
    Unauthorized,
)
from tests.conftest import Server, run_cli
from tests.support.images import make_raw, qemu_img, sha256

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def users(server: Server) -> dict[str, str]:
    admin = Client(server.url, server.token)
    tokens = {"admin": server.token}
    for name, groups in [("alice", []), ("bob", ["physics"]), ("carol", [])]:
        tokens[name] = admin.create_user(name, groups=groups)["token"]
    tokens["quota"] = admin.create_user("quota", quota_bytes=3 * MiB, quota_images=2)["token"]
    return tokens


def client(server: Server, users: dict[str, str], who: str) -> Client:
    return Client(server.url, users[who])


def test_cli_push_show_pull_roundtrip(server: Server, users: dict[str, str],
                                      tmp_path: Path) -> None:
    img = make_raw(tmp_path / "disk.raw")
    env = server.env(users["alice"])
    push = run_cli("push", str(img), "--name", "web", "--version", "1", "--os-distro", "debian",
                   "--os-release", "12", "--arch", "amd64", "--tag", "hpc", "--property",
                   "team=sci", env=env)
    image_id = push.stdout.strip()
    assert len(image_id) == 36
    shown = json.loads(run_cli("show", "web:1", "--json", env=env).stdout)
    assert shown["id"] == image_id and shown["status"] == "active"
    assert shown["disk_format"] == "raw" and shown["size"] == img.stat().st_size
    assert shown["sha256"] == sha256(img)
    assert shown["tags"] == ["hpc"]
    # Random bytes hold no root filesystem: the server says so in a `rain.` property.
    assert {k: v for k, v in shown["properties"].items() if not k.startswith("rain.")} == {
        "team": "sci"}
    assert shown["properties"]["rain.detect_failed"].startswith("no root filesystem found")
    # only the non-zero quarter is stored
    assert shown["stored_bytes"] <= img.stat().st_size // 4 + 256 * 1024
    out = tmp_path / "pulled.raw"
    run_cli("pull", image_id, "-o", str(out), env=env)
    assert sha256(out) == sha256(img)
    assert os.stat(out).st_blocks * 512 < img.stat().st_size  # zeros came back as holes
    listed = json.loads(run_cli("images", "--tag", "hpc", "--json", env=env).stdout)
    assert [i["id"] for i in listed["images"]] == [image_id]


def test_download_headers_ranges_and_etag(server: Server, users: dict[str, str],
                                          tmp_path: Path) -> None:
    img = make_raw(tmp_path / "r.raw", size=3 * MiB + 17, seed=2, data_fraction=1.0)
    data = img.read_bytes()
    c = client(server, users, "alice")
    image = c.push(img, name="ranges")
    url = f"{server.url}/v1/images/{image['id']}/file"
    auth = {"Authorization": f"Bearer {users['alice']}"}
    r = httpx.get(url, headers=auth)
    assert r.status_code == 200 and r.content == data
    assert r.headers["etag"] == f'"{image["sha256"]}"'
    assert r.headers["x-rain-sha256"] == hashlib.sha256(data).hexdigest()
    assert r.headers["accept-ranges"] == "bytes"
    for spec, (lo, hi) in {"bytes=0-0": (0, 1), "bytes=1000-300000": (1000, 300001),
                           f"bytes={len(data) - 5}-": (len(data) - 5, len(data)),
                           "bytes=-100": (len(data) - 100, len(data)),
                           "bytes=262143-262144": (262143, 262145)}.items():
        r = httpx.get(url, headers={**auth, "Range": spec})
        assert r.status_code == 206, spec
        assert r.content == data[lo:hi], spec
        assert r.headers["content-range"] == f"bytes {lo}-{hi - 1}/{len(data)}"
    for bad in ("bytes=0-1,5-6", f"bytes={len(data)}-", "bytes=x-y"):
        r = httpx.get(url, headers={**auth, "Range": bad})
        assert r.status_code == 416, bad
        assert r.json()["error"]["code"] == "range_not_satisfiable"
    r = httpx.get(url, headers={**auth, "If-None-Match": f'"{image["sha256"]}"'})
    assert r.status_code == 304
    assert c.get_range(image["id"], 10, 20) == data[10:20]


def test_derived_image_dedups(server: Server, users: dict[str, str], tmp_path: Path) -> None:
    base = make_raw(tmp_path / "base.raw", size=16 * MiB, seed=3, data_fraction=0.5)
    derived = tmp_path / "derived.raw"
    raw = bytearray(base.read_bytes())
    raw[MiB : MiB + 4096] = os.urandom(4096)  # one 4 KiB block changes
    derived.write_bytes(bytes(raw))
    c = client(server, users, "alice")
    b = c.push(base, name="base")
    d = c.push(derived, name="derived", parent=b["id"])
    assert d["parent"] == b["id"]
    assert b["stored_bytes"] >= 8 * MiB
    assert d["stored_bytes"] <= 256 * 1024  # one chunk


def test_qcow2_detected_and_converted_on_pull(server: Server, users: dict[str, str],
                                              tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "src.raw", size=4 * MiB, seed=4, data_fraction=0.5)
    qcow = tmp_path / "src.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow))
    env = server.env(users["alice"])
    image_id = run_cli("push", str(qcow), "--name", "q", env=env).stdout.strip()
    shown = json.loads(run_cli("show", image_id, "--json", env=env).stdout)
    assert shown["disk_format"] == "qcow2" and shown["virtual_size"] == 4 * MiB
    out = tmp_path / "back.raw"
    run_cli("pull", image_id, "--format", "raw", "-o", str(out), env=env)
    assert sha256(out) == sha256(raw)
    vmdk = tmp_path / "back.vmdk"
    run_cli("pull", image_id, "--format", "vmdk", "-o", str(vmdk), env=env)
    subprocess.run(["qemu-img", "compare", "-f", "vmdk", "-F", "raw", str(vmdk), str(raw)],
                   check=True)
    manifests = len(list((server.data_dir / "store" / "manifests").rglob("*")))
    again = tmp_path / "again.vmdk"
    run_cli("pull", image_id, "--format", "vmdk", "-o", str(again), env=env)
    assert sha256(again) == sha256(vmdk)  # the kept variant was served, not a new conversion
    assert len(list((server.data_dir / "store" / "manifests").rglob("*"))) == manifests


def test_bad_images_are_refused_and_leave_nothing(server: Server, users: dict[str, str],
                                                  tmp_path: Path) -> None:
    env = server.env(users["alice"])
    raw = make_raw(tmp_path / "b.raw", size=2 * MiB, seed=5)
    backed = tmp_path / "backed.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(raw), "-F", "raw", str(backed))
    good = tmp_path / "good.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(make_raw(tmp_path / "g.raw", seed=6,
                                                                  data_fraction=1.0)), str(good))
    truncated = tmp_path / "truncated.qcow2"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases = [
        (backed, [], "backing"),
        (truncated, [], ""),
        (raw, ["--disk-format", "qcow2"], "raw"),
        (tmp_path / "empty.raw", [], "empty"),
    ]
    (tmp_path / "empty.raw").write_bytes(b"")
    for path, extra, phrase in cases:
        r = run_cli("push", str(path), "--name", f"bad-{path.name}", *extra, env=env, check=False)
        assert r.returncode == 1, path
        assert r.stderr.startswith("rain: error:"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr
        assert phrase in r.stderr.lower(), r.stderr
        listed = json.loads(run_cli("images", "--name", f"bad-{path.name}", "--status", "any",
                                    "--json", env=env).stdout)
        assert listed["total"] == 0  # the owner does not see a half-made image either


def test_tokens_and_other_users_images(server: Server, users: dict[str, str],
                                       tmp_path: Path) -> None:
    img = make_raw(tmp_path / "p.raw", size=MiB, seed=7)
    alice, bob, carol = (client(server, users, n) for n in ("alice", "bob", "carol"))
    private = alice.push(img, name="secret")
    with pytest.raises(Unauthorized):
        Client(server.url, "rain_wrong").images()
    with pytest.raises(Unauthorized):
        Client(server.url, "").images()
    r = run_cli("images", env=server.env("rain_wrong"), check=False)
    assert r.returncode == 1 and r.stderr.strip() == "rain: error: invalid token"
    for call in (lambda: bob.show(private["id"]), lambda: bob.pull(private["id"], tmp_path / "x"),
                 lambda: bob.update(private["id"], description="mine"),
                 lambda: bob.delete(private["id"]), lambda: bob.show("secret"),
                 lambda: bob.share(private["id"], user="bob")):
        with pytest.raises(NotFound):  # 404, never 403: bob must not learn it exists
            call()
    assert not (tmp_path / "x").exists()
    assert bob.images(name="secret")["total"] == 0
    alice.share(private["id"], group="physics")
    assert bob.show(private["id"])["visibility"] == "shared"
    bob.pull(private["id"], tmp_path / "y")
    with pytest.raises(Forbidden):
        bob.update(private["id"], description="mine")
    with pytest.raises(NotFound):
        carol.show(private["id"])
    alice.unshare(private["id"], group="physics")
    with pytest.raises(NotFound):
        bob.show(private["id"])
    alice.update(private["id"], visibility="public")
    assert carol.show(private["id"])["id"] == private["id"]
    anonymous = httpx.get(f"{server.url}/v1/images/{private['id']}")
    assert anonymous.status_code == 401  # anonymous read is off by default
    assert anonymous.json()["error"]["code"] == "unauthorized"


def test_write_once_protect_deactivate(server: Server, users: dict[str, str],
                                       tmp_path: Path) -> None:
    img = make_raw(tmp_path / "w.raw", size=MiB, seed=8)
    alice, bob = client(server, users, "alice"), client(server, users, "bob")
    admin = client(server, users, "admin")
    image = alice.push(img, name="fixed", visibility="public")
    with pytest.raises(Conflict, match="write-once"):
        alice.upload(image["id"], img)
    alice.push(img, name="versioned", version="1")
    with pytest.raises(Conflict, match="write-once"):
        alice.push(img, name="versioned", version="1")
    env = server.env(users["alice"])
    run_cli("set", image["id"], "--protected", env=env)
    r = run_cli("rm", image["id"], env=env, check=False)
    assert r.returncode == 1 and "protected" in r.stderr
    run_cli("set", image["id"], "--deactivate", env=env)
    with pytest.raises(Forbidden, match="deactivated"):
        bob.pull(image["id"], tmp_path / "d")
    with pytest.raises(Forbidden, match="deactivated"):
        alice.pull(image["id"], tmp_path / "d")
    admin.pull(image["id"], tmp_path / "d")  # admins still can
    run_cli("set", image["id"], "--reactivate", "--unprotected", env=env)
    bob.pull(image["id"], tmp_path / "e")
    run_cli("rm", image["id"], env=env)
    with pytest.raises(NotFound):
        alice.show(image["id"])


def test_quota_stops_an_upload_while_it_streams(server: Server, users: dict[str, str],
                                                tmp_path: Path) -> None:
    q = client(server, users, "quota")
    small = q.push(make_raw(tmp_path / "s.raw", size=2 * MiB, seed=9, data_fraction=1.0),
                   name="fits")
    assert small["stored_bytes"] == 2 * MiB
    with pytest.raises(QuotaExceeded, match="quota"):
        q.push(make_raw(tmp_path / "big.raw", size=8 * MiB, seed=10, data_fraction=1.0),
               name="too-big")
    assert q.images(name="too-big", status=["any"])["total"] == 0
    q.push(make_raw(tmp_path / "z.raw", size=MiB, seed=11, data_fraction=0.0), name="zeros")
    with pytest.raises(QuotaExceeded, match="2 images"):
        q.create_image(name="third")


def test_interrupted_upload_leaves_no_image(server: Server, users: dict[str, str]) -> None:
    alice = client(server, users, "alice")
    image = alice.create_image(name="cut-off")
    body = os.urandom(3 * MiB)
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as s:
        s.sendall((f"PUT /v1/images/{image['id']}/file HTTP/1.1\r\nHost: x\r\n"
                   f"Authorization: Bearer {users['alice']}\r\n"
                   f"Content-Length: {64 * MiB}\r\n\r\n").encode() + body)
    # the server notices the disconnect and kills the upload
    for _ in range(100):
        try:
            alice.show(image["id"])
        except NotFound:
            break
        time.sleep(0.05)
    else:
        pytest.fail("interrupted upload is still visible")
    assert alice.images(name="cut-off", status=["any"])["total"] == 0
    admin = client(server, users, "admin")
    assert admin.show(image["id"])["status"] == "killed"


def test_usage_and_match(server: Server, users: dict[str, str], tmp_path: Path) -> None:
    alice, bob = client(server, users, "alice"), client(server, users, "bob")
    img = make_raw(tmp_path / "u.raw", size=MiB, seed=12)
    image = alice.push(img, name="popular", visibility="public", os_distro="debian",
                       os_release="12", arch="amd64", tags=["hpc"],
                       packages={"openmpi-bin": "4.1.4-3"})
    alice.push(img, name="other", visibility="public", os_distro="debian", os_release="12",
               arch="amd64", packages={"openmpi-bin": "4.1.4-3"})
    bob.pull(image["id"], tmp_path / "1")
    bob.pull(image["id"], tmp_path / "2")
    alice.pull(image["id"], tmp_path / "3")
    env = server.env(users["alice"])
    u = json.loads(run_cli("usage", image["id"], "--json", env=env).stdout)
    assert u["pulls"] == 3 and u["bytes"] == 3 * MiB
    assert sorted(r["user"] for r in u["usage"]) == ["alice", "bob", "bob"]
    mine = bob.usage(image["id"])  # bob sees only his own pulls of alice's image
    assert {r["user"] for r in mine["usage"]} == {"bob"}
    assert alice.show(image["id"])["access_count"] == 3
    listed = json.loads(run_cli("images", "--package", "openmpi-bin>=4", "--json",
                                env=env).stdout)
    assert {"popular", "other"} <= {i["name"] for i in listed["images"]}
    assert json.loads(run_cli("images", "--package", "openmpi-bin>=5", "--json",
                              env=env).stdout)["total"] == 0
    m = json.loads(run_cli("match", "--distro", "debian", "--release", ">=12", "--package",
                           "openmpi-bin>=4", "--prefer", "tag:hpc=2", "--prefer", "popular",
                           "--json", env=env).stdout)["matches"]
    assert m[0]["image"]["id"] == image["id"]
    assert any("tag hpc" in r for r in m[0]["reasons"])
    text = run_cli("match", "--distro", "debian", "--prefer", "tag:hpc=2", env=env).stdout
    assert "score" in text and "tag hpc" in text


def test_corrupt_store_data_is_an_error_not_bad_bytes(server: Server, users: dict[str, str],
                                                      tmp_path: Path) -> None:
    alice = client(server, users, "alice")
    img = make_raw(tmp_path / "c.raw", size=2 * MiB, seed=13, data_fraction=1.0)
    image = alice.push(img, name="to-corrupt")
    # Flip the last byte of the image's last chunk, inside its pack file.
    store = server.data_dir / "store"
    with sqlite3.connect(store / "index.sqlite") as db:
        digest, pack, offset, stored = db.execute(
            "SELECT digest, pack, offset, stored FROM chunks ORDER BY touched DESC, offset DESC "
            "LIMIT 1").fetchone()
    victim = store / "packs" / pack[:2] / f"{pack}.pack"
    with open(victim, "r+b") as f:
        f.seek(offset + stored - 1)
        byte = f.read(1)[0]
        f.seek(offset + stored - 1)
        f.write(bytes([byte ^ 0xFF]))
    out = tmp_path / "c.out"
    r = run_cli("pull", image["id"], "-o", str(out), env=server.env(users["alice"]), check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
    assert f"chunk {digest.hex()} of image {image['id']} is corrupt" in server.log.read_text()


def test_gc_reclaims_deleted_and_keeps_live(server: Server, users: dict[str, str],
                                            tmp_path: Path) -> None:
    alice = client(server, users, "alice")
    keep = alice.push(make_raw(tmp_path / "k.raw", size=2 * MiB, seed=14), name="keep")
    drop = alice.push(make_raw(tmp_path / "d.raw", size=2 * MiB, seed=15), name="drop")
    alice.delete(drop["id"])
    r = run_cli("gc", "--data-dir", str(server.data_dir), "--grace", "0", "--json",
                env=server.env())
    report = json.loads(r.stdout)
    assert report["chunks_deleted"] >= 1 and report["manifests_deleted"] >= 1
    alice.pull(keep["id"], tmp_path / "k.out")
    assert sha256(tmp_path / "k.out") == keep["sha256"]


def test_openapi_and_json_errors(server: Server, users: dict[str, str]) -> None:
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert "/v1/images/{ref}/file" in spec["paths"]
    r = httpx.get(f"{server.url}/v1/images/nope", headers={
        "Authorization": f"Bearer {users['alice']}"})
    assert r.status_code == 404
    assert r.json() == {"error": {"code": "not_found", "message": "no image 'nope'"}}
    with pytest.raises(InvalidImage):
        Client(server.url, users["alice"]).push(__file__, name="text", disk_format="qcow2")
