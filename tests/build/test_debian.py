"""Debian installer: argv, dpkg status parsing, and one real debootstrap of bookworm."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rain.build.distros import DistroInstaller, mounts_under, unmount_under
from rain.build.distros.debian import DebianInstaller, installed_packages
from rain.build.mirror import debian_mirror
from rain.model.errors import InvalidRequest, ToolFailed

STATUS = """\
Package: dpkg
Status: install ok installed
Priority: required
Architecture: amd64
Version: 1.21.22
Description: Debian package management system
 This package provides the low-level infrastructure for handling the
 installation and removal of Debian software packages.

Package: libc6
Status: install ok installed
Architecture: amd64
Multi-Arch: same
Version: 2.36-9+deb12u10
Conffiles:
 /etc/ld.so.conf.d/x86_64-linux-gnu.conf d4e7a7b88a71b5ffd9e2644e71a0cfab

Package: removed-pkg
Status: deinstall ok config-files
Version: 1.0

Package: half
Status: install ok half-configured
Version: 2.0

Package: apt
Version: 2.6.1
Status: install ok installed
"""


def test_installed_packages_reads_dpkg_status(tmp_path: Path) -> None:
    status = tmp_path / "var" / "lib" / "dpkg" / "status"
    status.parent.mkdir(parents=True)
    status.write_text(STATUS)
    assert installed_packages(tmp_path) == {
        "dpkg": "1.21.22",
        "libc6": "2.36-9+deb12u10",
        "apt": "2.6.1",
    }
    assert (
        DebianInstaller(mirror="http://mirror.invalid/debian").installed_packages(tmp_path)["apt"]
        == "2.6.1"
    )


def test_installed_packages_without_dpkg(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="no dpkg database"):
        installed_packages(tmp_path)


def test_bootstrap_argv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    installer: DistroInstaller = DebianInstaller(mirror="http://mirror.invalid/debian/")
    assert isinstance(installer, DebianInstaller)
    argv = installer.bootstrap_argv(
        Path("root"),
        "bookworm",
        "amd64",
        cache_dir=Path("cache"),
        include=["ca-certificates", "systemd-sysv"],
    )
    assert argv == [
        "debootstrap",
        "--variant=minbase",
        "--arch=amd64",
        "--include=ca-certificates,systemd-sysv",
        f"--cache-dir={tmp_path / 'cache'}",
        "bookworm",
        str(tmp_path / "root"),
        "http://mirror.invalid/debian",
    ]
    assert not any(
        a.startswith("--include")
        for a in installer.bootstrap_argv(tmp_path, "bookworm", "amd64", cache_dir=tmp_path)
    )


@pytest.mark.parametrize(
    ("release", "arch", "variant", "include"),
    [
        ("--foreign", "amd64", "minbase", []),
        ("bookworm", "amd64; rm", "minbase", []),
        ("bookworm", "amd64", "everything", []),
        ("bookworm", "amd64", "minbase", ["ok", "-bad"]),
        ("bookworm", "amd64", "minbase", ["a,b"]),
    ],
)
def test_bootstrap_argv_rejects_bad_values(
    tmp_path: Path, release: str, arch: str, variant: str, include: list[str]
) -> None:
    installer = DebianInstaller(mirror="http://mirror.invalid/debian")
    with pytest.raises(InvalidRequest):
        installer.bootstrap_argv(
            tmp_path, release, arch, cache_dir=tmp_path, variant=variant, include=include
        )


def test_missing_debootstrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rain.build.distros.debian._SBIN", ())
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(
        ToolFailed, match=r"debootstrap is not installed \(apt-get install debootstrap\)"
    ):
        DebianInstaller(mirror="http://mirror.invalid/debian").bootstrap(
            tmp_path / "root", "bookworm", "amd64", cache_dir=tmp_path / "cache"
        )


def test_mounts_under_plain_dir_is_empty(tmp_path: Path) -> None:
    assert mounts_under(tmp_path) == []
    unmount_under(tmp_path)  # nothing to do, no error


def _debootstrap_available() -> bool:
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    if shutil.which("debootstrap", path=search):
        return True
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    subprocess.run(
        ["apt-get", "install", "-y", "debootstrap"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=600,
        check=False,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    return shutil.which("debootstrap", path=search) is not None


@pytest.fixture(scope="session")
def debootstrap_cache(request: pytest.FixtureRequest) -> Path:
    """Package cache kept in .pytest_cache, so later runs download nothing."""
    return Path(request.config.cache.mkdir("rain-debootstrap")).absolute()


@pytest.fixture
def bootstrap_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "root"
    try:
        yield root
    finally:
        unmount_under(root)
        assert mounts_under(root) == []
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.integration
def test_bootstrap_bookworm_minbase(bootstrap_root: Path, debootstrap_cache: Path) -> None:
    if not _debootstrap_available():
        pytest.skip("debootstrap is not installed and cannot be installed here")
    if os.geteuid() != 0:
        pytest.skip("debootstrap needs root")
    installer = DebianInstaller(mirror=debian_mirror())
    started = time.monotonic()
    installer.bootstrap(
        bootstrap_root, "bookworm", "amd64", cache_dir=debootstrap_cache, variant="minbase"
    )
    elapsed = time.monotonic() - started
    print(f"debootstrap bookworm minbase amd64: {elapsed:.1f} s")
    assert (bootstrap_root / "etc" / "debian_version").read_text().startswith("12")
    packages = installer.installed_packages(bootstrap_root)
    assert "dpkg" in packages
    assert "apt" in packages
    assert mounts_under(bootstrap_root) == []
    assert any(debootstrap_cache.glob("*.deb"))
