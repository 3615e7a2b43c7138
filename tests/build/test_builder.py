"""Real builds through a real `rain serve`: bootstrap, install, disk, QEMU boot, upload.

One server (and so one base image) for the module, in the order a user meets
things: the first build bootstraps the base image; the same template again is
a template hit; a template that extends it builds on it (pedigree); a bad
package fails the build with a one-line error; a purged image is rebuilt by
pulling it, with the same template digest and package set; and a boot that
does not reach its marker fails the build and keeps the console in the log.
Package downloads cached by the other build tests in .pytest_cache are
copied in, so only the first run on a machine downloads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from rain.client import Client
from tests.build.conftest import require_image_tools
from tests.conftest import Server, run_cli, start_server, stop_server

BUILD_GUARD_SECONDS = 1500

pytestmark = pytest.mark.integration

NODE = """\
name: hello-node
version: "1"
from: debian/bookworm
packages: [hello]
files:
  /etc/motd: "Welcome to the cluster\\n"
run: ["echo built > /etc/built-by-rain"]
size: 3G
"""
CHILD = """\
name: hello-child
from: template:node.yaml
packages: [jq]
"""
ENV = {"RAIN_BUILD__POLL_SECONDS": "0.2"}


def _seed_caches(data_dir: Path, request: pytest.FixtureRequest) -> None:
    """Copies (not links) of the downloads other build tests cached: apt locks its cache."""
    cache = data_dir / "cache"
    cache.mkdir(parents=True)
    for name, folder in (("apt", "rain-apt-archives"), ("debootstrap", "rain-debootstrap")):
        shutil.copytree(Path(request.config.cache.mkdir(folder)), cache / name,
                        ignore=shutil.ignore_patterns("lock", "partial"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           request: pytest.FixtureRequest) -> Iterator[Server]:
    require_image_tools()
    data = tmp_path_factory.mktemp("rain-builder") / "data"
    _seed_caches(data, request)
    s = start_server(data, extra_env=ENV)
    try:
        yield s
    finally:
        stop_server(s.proc)


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("templates")
    (d / "node.yaml").write_text(NODE)
    (d / "child.yaml").write_text(CHILD)
    (d / "badpkg.yaml").write_text("name: bad\nfrom: debian/bookworm\n"
                                   "packages: [hello, no-such-package-rain]\n")
    return d


def _build(server: Server, path: Path, *extra: str, check: bool = True) -> dict:  # type: ignore[type-arg]
    # A first build bootstraps Debian and boots under TCG; on a loaded 2-core host that
    # took over 300 s. The build's own boot timeout (stretched by CPU waits) bounds it.
    r = run_cli("build", str(path), "--json", *extra, env=server.env(), check=check,
                timeout=BUILD_GUARD_SECONDS)
    return json.loads(r.stdout) if r.returncode == 0 else {"stderr": r.stderr, "rc": r.returncode}


def test_first_build_bootstraps_a_base_and_boots(server: Server, templates: Path) -> None:
    build = _build(server, templates / "node.yaml")
    assert build["status"] == "succeeded" and not build["cached"]
    timings = build["timings"]
    for phase in ("bootstrap", "disk", "restore", "install", "compress", "boot-test", "upload"):
        assert timings.get(phase, 0) > 0, (phase, timings)
    c = Client(server.url, server.token)
    image = c.show(build["image_id"])
    assert image["disk_format"] == "qcow2" and image["status"] == "active"
    assert image["os_distro"] == "debian" and image["os_release"] == "bookworm"
    assert image["virtual_size"] == 3 * 1024**3
    assert "hello" in image["packages"] and "linux-image-cloud-amd64" in image["packages"]
    assert image["template"] == NODE and image["template_digest"] == build["template_digest"]
    base = c.show(image["parent"])
    assert base["base"] and base["visibility"] == "public" and base["disk_format"] == "qcow2"
    log = c.build_status(build["id"])["log"]
    assert "rain-boot-ok" in log and "bootstrapping bookworm" in log
    # Searchable by the software stack (P1's package filter).
    found = c.images(package=["hello>=2.0"])["images"]
    assert [i["id"] for i in found] == [image["id"]]


def test_image_content_is_what_the_template_says(server: Server, tmp_path: Path) -> None:
    c = Client(server.url, server.token)
    raw = tmp_path / "node.raw"
    c.pull("hello-node", raw, format="raw")
    listing = subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True,
                             check=True)
    part = json.loads(listing.stdout)["partitiontable"]["partitions"][0]
    offset = part["start"] * 512

    def cat(path: str) -> str:
        return subprocess.run(["debugfs", "-R", f"cat {path}", f"{raw}?offset={offset}"],
                              capture_output=True, text=True, check=True).stdout

    assert cat("/etc/motd") == "Welcome to the cluster\n"
    assert cat("/etc/built-by-rain") == "built\n"
    assert cat("/etc/machine-id") == ""
    assert "UUID=" in cat("/etc/fstab")
    assert "console=ttyS0" in cat("/boot/extlinux/extlinux.conf")
    shadow_root = next(line for line in cat("/etc/shadow").splitlines()
                       if line.startswith("root:"))
    assert shadow_root.split(":")[1].startswith("!")
    assert "ssh_host" not in subprocess.run(
        ["debugfs", "-R", "ls /etc/ssh", f"{raw}?offset={offset}"],
        capture_output=True, text=True, check=False).stdout


def test_same_template_is_a_template_hit(server: Server, templates: Path) -> None:
    first = Client(server.url, server.token).show("hello-node")
    again = _build(server, templates / "node.yaml")
    assert again["cached"] and again["image_id"] == first["id"]


def test_template_extending_a_template_records_its_pedigree(server: Server,
                                                             templates: Path) -> None:
    build = _build(server, templates / "child.yaml")
    assert build["status"] == "succeeded"
    c = Client(server.url, server.token)
    child = c.show(build["image_id"])
    parent = c.show("hello-node")
    assert child["parent"] == parent["id"]
    assert {"hello", "jq"} <= set(child["packages"])
    chain = [p["id"] for p in c.pedigree(child["id"])]
    assert chain[:3] == [child["id"], parent["id"], parent["parent"]]
    # The parent template was a hit: only one install happened in this build.
    assert "template hit" in c.build_status(build["id"])["log"]


def test_unknown_package_fails_the_build_with_one_line(server: Server, templates: Path) -> None:
    out = _build(server, templates / "badpkg.yaml", check=False)
    assert out["rc"] == 1
    lines = out["stderr"].strip().splitlines()
    assert len(lines) == 1 and "no-such-package-rain" in lines[0], out["stderr"]
    assert "template bad line 3" in lines[0]


def test_pulling_a_purged_image_rebuilds_it(server: Server, tmp_path: Path) -> None:
    c = Client(server.url, server.token)
    before = c.show("hello-child")
    c.purge(before["id"])
    assert c.show(before["id"])["status"] == "purged"
    got = c.pull(before["id"], tmp_path / "child.qcow2")
    after = c.show(before["id"])
    assert after["status"] == "active" and got["sha256"] == after["sha256"]
    assert after["template_digest"] == before["template_digest"]
    assert after["packages"] == before["packages"]
    assert before["sha256"] in after["properties"]["rain.previous_sha256"]
    # The rebuild's own boot test, not the first build's:
    assert after["properties"]["rain.boot_seconds"] == f"{after['build_timings']['boot']:.1f}"


def test_a_template_trying_to_escape_is_contained(server: Server, tmp_path: Path) -> None:
    # What the old build chroot let a run: line do: write the host's files through
    # /proc/N/root, change the host's name, reach a service on the host's loopback.
    planted = tmp_path / "escaped"
    before = os.uname().nodename
    tpl = tmp_path / "escape.yaml"
    tpl.write_text(
        "name: escape-attempt\nfrom: debian/bookworm\nrun:\n"
        f"  - for p in /proc/[0-9]*; do echo pwned > $p/root{planted}; done; true\n"
        "  - hostname pwned-by-template || true\n"
        f"  - bash -c 'echo x > /dev/tcp/127.0.0.1/{server.url.rsplit(':', 1)[1]}' 2>/dev/null"
        " && echo reached > /etc/reached-host || true\n"
    )
    build = _build(server, tpl)
    assert build["status"] == "succeeded"
    assert not planted.exists()
    assert os.uname().nodename == before
    log = Client(server.url, server.token).build_status(build["id"])["log"]
    assert "sandbox: root is host uid" in log and "no network" in log
    c = Client(server.url, server.token)
    raw = tmp_path / "escape.raw"
    c.pull(build["image_id"], raw, format="raw")
    listing = subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True,
                             check=True)
    offset = json.loads(listing.stdout)["partitiontable"]["partitions"][0]["start"] * 512
    etc = subprocess.run(["debugfs", "-R", "ls /etc", f"{raw}?offset={offset}"],
                         capture_output=True, text=True, check=True).stdout
    assert "reached-host" not in etc


def test_a_boot_that_never_finishes_fails_the_build(server: Server, templates: Path,
                                                   tmp_path: Path) -> None:
    stop_server(server.proc)  # same data (base image, caches), a boot limit no image meets
    quick = start_server(server.data_dir, extra_env={**ENV, "RAIN_BUILD__BOOT_TIMEOUT": "2"})
    try:
        tpl = tmp_path / "slow.yaml"
        tpl.write_text("name: never-boots\nfrom: debian/bookworm\npackages: [tree]\n")
        r = run_cli("build", str(tpl), env={**os.environ, "RAIN_URL": quick.url,
                                              "RAIN_TOKEN": quick.token}, check=False)
        assert r.returncode == 1 and "boot test failed" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        c = Client(quick.url, quick.token)
        failed = [b for b in c.builds()["builds"] if b["status"] == "failed"
                  and "boot test" in (b["error"] or "")]
        assert failed and "console:" in c.build_status(failed[0]["id"])["log"]
        assert c.images(name="never-boots")["images"] == []
    finally:
        stop_server(quick.proc)
