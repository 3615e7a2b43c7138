"""Push an image rain did not build: its OS, release, arch and packages are read from it.

The disks are made here (sfdisk + mke2fs -d from a tree with os-release and a
dpkg status, raw and qcow2) and pushed through a real server with the CLI.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rain.client import Client
from tests.conftest import Server, run_cli
from tests.formats.conftest import MiB
from tests.formats.rootfs_images import PACKAGES, make_tree, mke2fs, partitioned, to_qcow2

pytestmark = pytest.mark.integration

ALL = "os_distro,os_release,arch,packages"


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    d = tmp_path_factory.mktemp("disks")
    fs = mke2fs(make_tree(d / "tree"), d / "fs.img", 32 * MiB)
    raw = partitioned(fs, d / "debian.raw")
    loop = make_tree(d / "loop")
    (loop / "etc/os-release").unlink()
    (loop / "etc/os-release").symlink_to("os-release")
    yield {"raw": raw,
           "qcow2": to_qcow2(raw, d / "debian.qcow2", "compression_type=zstd", compress=True),
           "loop": partitioned(mke2fs(loop, d / "loop.img", 32 * MiB), d / "loop.raw")}


def push(server: Server, path: Path, name: str, *args: str) -> dict[str, Any]:
    image_id = run_cli("push", str(path), "--name", name, *args, env=server.env()).stdout.strip()
    return show(server, image_id)


def show(server: Server, ref: str) -> dict[str, Any]:
    return dict(json.loads(run_cli("show", ref, "--json", env=server.env()).stdout))


def found(server: Server, *args: str) -> set[str]:
    result = json.loads(run_cli("images", *args, "--json", env=server.env()).stdout)
    return {i["id"] for i in result["images"]}


def test_pushed_disks_are_found_by_their_software(server: Server,
                                                  disks: dict[str, Path]) -> None:
    raw = push(server, disks["raw"], "stranger-raw")
    qcow2 = push(server, disks["qcow2"], "stranger-qcow2")
    for image in (raw, qcow2):
        assert (image["os_distro"], image["os_release"], image["arch"]) == (
            "debian", "bookworm", "amd64")
        assert image["packages"] == PACKAGES
        assert image["properties"]["rain.detected"] == ALL
        assert image["properties"]["rain.detected_from"] == "partition 2 (gpt), ext4"
    assert qcow2["disk_format"] == "qcow2"
    ids = {raw["id"], qcow2["id"]}
    assert ids <= found(server, "--package", "bash>=5")
    assert ids <= found(server, "--package", "openssl>=3.0.11-1~deb12u1", "--arch", "amd64",
                        "--os-distro", "debian", "--os-release", "bookworm")
    assert not ids & found(server, "--package", "bash>=6")
    assert not ids & found(server, "--package", "telnet")  # removed, config files only


def test_what_the_uploader_says_wins(server: Server, disks: dict[str, Path]) -> None:
    image = push(server, disks["raw"], "stranger-said", "--os-distro", "devuan", "--arch",
                 "i386")
    assert (image["os_distro"], image["os_release"], image["arch"]) == (
        "devuan", "bookworm", "i386")
    assert image["properties"]["rain.detected"] == "os_release,packages"


def test_rain_set_corrects_and_rescan_keeps_corrections(server: Server,
                                                        disks: dict[str, Path]) -> None:
    image = push(server, disks["qcow2"], "stranger-fixed")
    run_cli("set", image["id"], "--os-release", "12", "--arch", "x86_64", "--version", "1.1",
            "--os-distro", "Debian", env=server.env())
    fixed = show(server, image["id"])
    assert (fixed["os_distro"], fixed["os_release"], fixed["arch"], fixed["version"]) == (
        "Debian", "12", "x86_64", "1.1")
    assert fixed["properties"]["rain.detected"] == "packages"
    rescanned = json.loads(run_cli("rescan", image["id"], "--json", env=server.env()).stdout)
    assert (rescanned["os_distro"], rescanned["os_release"], rescanned["arch"]) == (
        "Debian", "12", "x86_64")
    assert rescanned["packages"] == PACKAGES
    assert rescanned["properties"]["rain.detected"] == "packages"


def test_rescan_fills_what_an_old_image_lacks(server: Server, disks: dict[str, Path]) -> None:
    image = push(server, disks["raw"], "stranger-old")
    # As an image stored before detection existed: nothing known. (Clearing the fields
    # takes them out of rain.detected; users cannot touch rain.* properties themselves.)
    client = Client(server.url, server.token)
    client.update(image["id"], os_distro="", os_release="", arch="")
    bare = show(server, image["id"])
    assert bare["os_distro"] == "" and bare["properties"]["rain.detected"] == "packages"
    again = client.rescan(image["id"])
    assert (again["os_distro"], again["os_release"], again["arch"]) == (
        "debian", "bookworm", "amd64")
    assert set(again["properties"]["rain.detected"].split(",")) == {
        "os_distro", "os_release", "arch", "packages"}


def test_detection_failure_is_one_line_and_the_image_is_active(
        server: Server, disks: dict[str, Path]) -> None:
    image = push(server, disks["loop"], "stranger-loop")
    assert image["status"] == "active"
    assert image["os_distro"] == "" and image["packages"] == {}
    reason = image["properties"]["rain.detect_failed"]
    assert "too many symlinks resolving /etc/os-release" in reason and "\n" not in reason


def test_only_the_owner_may_rescan(server: Server, disks: dict[str, Path]) -> None:
    image = push(server, disks["raw"], "stranger-public", "--visibility", "public")
    admin = Client(server.url, server.token)
    token = admin.create_user("mallory-detect")["token"]
    r = httpx.post(f"{server.url}/v1/images/{image['id']}/rescan",
                   headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    anonymous = httpx.post(f"{server.url}/v1/images/{image['id']}/rescan")
    assert anonymous.status_code == 401
