"""End to end: a bootable bookworm disk, reused as a base for a bigger one, booted in QEMU.

The base disk comes from the cached `base_disk` fixture (built from scratch
the first time: debootstrap, boot packages, clean, `make_disk`).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from rain.build.boot import BOOT_MARKER, MARKER_UNIT, boot_test
from rain.build.disk import DiskInfo, disk_info, open_disk, write_boot_config
from rain.build.distros.debian import DHCP_NETWORK_FILE, DebianInstaller, installed_packages
from rain.model.errors import InvalidImage, InvalidRequest
from rain.sandbox import Sandbox

from .conftest import loop_devices_of

pytestmark = pytest.mark.integration

GIB = 1024**3
BOOT_TIMEOUT = 240.0  # generous for a loaded CI machine; a TCG boot takes ~40 s here


def _qemu_processes_for(path: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "qemu-system" in cmdline and str(path) in cmdline:
                found.append(int(entry.name))
    return found


def test_base_disk_is_clean_and_boots(base_disk: DiskInfo, tmp_path: Path) -> None:
    # What is inside, read through a read-only mount of the cached disk itself.
    with open_disk(base_disk.path, readonly=True) as root:
        fstab_root = [
            line.split() for line in (root / "etc/fstab").read_text().splitlines()
            if line.split()[1:2] == ["/"]
        ]
        assert fstab_root == [[f"UUID={base_disk.root_uuid}", "/", "ext4",
                               "errors=remount-ro", "0", "1"]]
        extlinux = (root / "boot/extlinux/extlinux.conf").read_text()
        assert f"root=UUID={base_disk.root_uuid}" in extlinux
        assert "console=ttyS0,115200" in extlinux and "SERIAL 0 115200" in extlinux
        assert (root / "boot/extlinux/ldlinux.sys").is_file()
        assert (root / "etc/machine-id").read_bytes() == b""
        assert not (root / "var/lib/dbus/machine-id").exists()
        assert list((root / "etc/ssh").glob("ssh_host_*")) == []
        shadow = {line.split(":")[0]: line.split(":")[1]
                  for line in (root / "etc/shadow").read_text().splitlines()}
        assert shadow["root"].startswith("!"), "root's password must be locked"
        assert not (root / "usr/sbin/policy-rc.d").exists()
        assert (root / "etc/hostname").read_text().strip() == "localhost"
        assert "Name=en* eth*" in (root / DHCP_NETWORK_FILE.lstrip("/")).read_text()
        assert (root / "etc/systemd/system/multi-user.target.wants" / MARKER_UNIT).is_symlink()
        assert os.readlink(root / "etc/resolv.conf").endswith("stub-resolv.conf")
        packages = installed_packages(root)
        assert {"linux-image-cloud-amd64", "systemd-sysv", "extlinux"} <= set(packages)
        assert list((root / "var/cache/apt/archives").glob("*.deb")) == []
    assert loop_devices_of(base_disk.path) == []

    # Boot it as the orchestration will: converted to qcow2.
    qcow2 = tmp_path / "base.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-O", "qcow2", str(base_disk.path), str(qcow2)], check=True
    )
    console = tmp_path / "console.log"
    result = boot_test(qcow2, fmt="qcow2", timeout=BOOT_TIMEOUT, log_path=console)
    print(f"\nboot test of the base disk: {result.seconds:.1f} s ({result.accel})")
    assert result.ok, f"{result.reason}\n{result.console_log[-3000:]}"
    assert BOOT_MARKER in console.read_text(errors="replace")
    assert _qemu_processes_for(qcow2) == []


def test_grown_copy_gets_a_package_and_boots(
    disk_copy: Path, base_disk: DiskInfo, apt_cache: Path, tmp_path: Path
) -> None:
    installer = DebianInstaller(cache=apt_cache)
    bigger = base_disk.size + GIB
    started = time.monotonic()
    with open_disk(disk_copy, grow_to=bigger) as root:
        assert os.statvfs(root).f_blocks * os.statvfs(root).f_frsize > base_disk.partition_size
        with Sandbox(root) as sandbox:
            installer.install(sandbox, ["hello"], release="bookworm", arch="amd64")
            installer.clean(sandbox)
        assert "hello" in installed_packages(root)
        assert (root / "usr/bin/hello").is_file()
    print(f"\ngrow + install hello + clean: {time.monotonic() - started:.1f} s")
    assert loop_devices_of(disk_copy) == []

    grown = disk_info(disk_copy)
    assert grown.size == bigger
    assert grown.root_uuid == base_disk.root_uuid
    assert grown.partition_offset == base_disk.partition_offset
    assert grown.partition_size == bigger - grown.partition_offset

    result = boot_test(disk_copy, fmt="raw", timeout=BOOT_TIMEOUT, log_path=tmp_path / "c.log")
    print(f"boot test of the grown disk: {result.seconds:.1f} s ({result.accel})")
    assert result.ok, f"{result.reason}\n{result.console_log[-3000:]}"


def test_unknown_names_are_one_line_errors(disk_copy: Path, apt_cache: Path) -> None:
    installer = DebianInstaller(cache=apt_cache)
    with open_disk(disk_copy) as root, Sandbox(root) as sandbox:
        before = installed_packages(root)
        with pytest.raises(InvalidRequest) as error:
            installer.install(sandbox, ["hello", "rain-no-such-package"], release="bookworm",
                              arch="amd64")
        message = str(error.value)
        assert "\n" not in message
        assert "'rain-no-such-package'" in message
        assert "hello" not in message
        assert installed_packages(root) == before  # nothing installed

        with pytest.raises(InvalidRequest) as error:
            installer.install(sandbox, ["hello=0.0-no-such-version"], release="bookworm",
                              arch="amd64")
        assert "'hello=0.0-no-such-version'" in str(error.value)

        with pytest.raises(InvalidRequest) as error:
            installer.enable_services(sandbox, ["systemd-networkd", "rain-no-such-unit"], [])
        assert str(error.value) == (
            "unknown service 'rain-no-such-unit.service' (no such unit file in the image)"
        )
        installer.enable_services(sandbox, [], ["getty@tty1"])  # template instances are known


def test_wrong_root_uuid_fails_and_keeps_the_console(disk_copy: Path, tmp_path: Path) -> None:
    with open_disk(disk_copy) as root:
        write_boot_config(root, "00000000-0000-4000-8000-000000000000")
    console = tmp_path / "console.log"
    result = boot_test(disk_copy, fmt="raw", timeout=30, log_path=console)
    assert not result.ok
    assert result.seconds < 60
    assert "Linux version" in result.console_log  # the kernel ran; root never came
    assert console.read_bytes().decode("utf-8", "replace") == result.console_log
    assert BOOT_MARKER not in result.console_log
    assert _qemu_processes_for(disk_copy) == []


def test_open_disk_refuses_to_close_without_a_kernel(disk_copy: Path) -> None:
    with pytest.raises(InvalidImage, match="no kernel"), open_disk(disk_copy) as root:
        (root / "vmlinuz").unlink()
    assert loop_devices_of(disk_copy) == []  # released all the same
