"""Disk and boot helpers that need no base image: configuration, checks, QEMU argv, KVM probe."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from rain.build import boot
from rain.build.boot import boot_test, install_boot_marker, kvm_usable, qemu_argv
from rain.build.disk import check_bootable, make_disk, open_disk, write_boot_config
from rain.build.distros.debian import DebianInstaller, _parse_policy
from rain.build.phases import PhaseTimer
from rain.model.errors import InvalidImage, InvalidRequest

UUID = "3f1c2e9a-0b7d-4c55-9a51-2d9e8f6b7a10"


def _fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "boot").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/lib/EXTLINUX").mkdir(parents=True)
    (root / "boot/vmlinuz-6.1.0-1-cloud-amd64").write_bytes(b"kernel")
    (root / "boot/initrd.img-6.1.0-1-cloud-amd64").write_bytes(b"initrd")
    (root / "vmlinuz").symlink_to("boot/vmlinuz-6.1.0-1-cloud-amd64")
    (root / "initrd.img").symlink_to("boot/initrd.img-6.1.0-1-cloud-amd64")
    (root / "usr/bin/extlinux").write_bytes(b"#!/bin/false\n")
    (root / "usr/lib/EXTLINUX/mbr.bin").write_bytes(b"\xfa" * 440)
    return root


def test_write_boot_config_keeps_other_fstab_lines(tmp_path: Path) -> None:
    root = _fake_root(tmp_path)
    (root / "etc/fstab").write_text(
        "# UNCONFIGURED FSTAB FOR BASE SYSTEM\n/dev/sda1 / ext4 defaults 0 1\n"
        "tmpfs /scratch tmpfs defaults 0 0\n"
    )
    write_boot_config(root, UUID)
    assert (root / "etc/fstab").read_text() == (
        f"UUID={UUID} / ext4 errors=remount-ro 0 1\ntmpfs /scratch tmpfs defaults 0 0\n"
    )
    conf = (root / "boot/extlinux/extlinux.conf").read_text()
    assert "SERIAL 0 115200" in conf
    assert "LINUX /vmlinuz" in conf and "INITRD /initrd.img" in conf
    assert f"APPEND root=UUID={UUID} ro console=tty0 console=ttyS0,115200n8" in conf
    with pytest.raises(InvalidRequest):
        write_boot_config(root, UUID, kernel_args=["quiet splash"])


def test_check_bootable(tmp_path: Path) -> None:
    root = _fake_root(tmp_path)
    check_bootable(root)
    # A kernel link pointing out of the tree does not count, even if the host has it.
    (root / "vmlinuz").unlink()
    (root / "vmlinuz").symlink_to("/proc/self/exe")
    with pytest.raises(InvalidImage, match=r"no kernel at /vmlinuz"):
        check_bootable(root)
    (root / "vmlinuz").unlink()
    (root / "vmlinuz").symlink_to("boot/vmlinuz-6.1.0-1-cloud-amd64")
    (root / "usr/lib/EXTLINUX/mbr.bin").unlink()
    with pytest.raises(InvalidImage, match=r"mbr\.bin"):
        check_bootable(root)


def test_make_disk_refuses_a_too_small_size(tmp_path: Path) -> None:
    root = _fake_root(tmp_path)
    (root / "big").write_bytes(os.urandom(1024) * 1024 * 80)
    with pytest.raises(InvalidRequest, match="too small"):
        make_disk(root, tmp_path / "out.raw", 100 * 1024**2)
    assert not (tmp_path / "out.raw").exists()


def test_open_disk_refuses_to_shrink(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * 4096)
    os.truncate(raw, 256 * 1024**2)
    with pytest.raises(InvalidRequest, match="cannot shrink"), open_disk(raw, grow_to=1024**2):
        pass
    with pytest.raises(InvalidRequest, match="read-only"), open_disk(
        raw, grow_to=1024**3, readonly=True
    ):
        pass


def test_parse_apt_cache_policy() -> None:
    text = (
        "hello:\n  Installed: (none)\n  Candidate: 2.10-3\n  Version table:\n"
        "     2.10-3 500\n        500 http://mirror.invalid/debian bookworm/main amd64 Packages\n"
        "virtual-mysql-server:\n  Installed: (none)\n  Candidate: (none)\n  Version table:\n"
        "dpkg:\n  Installed: 1.21.22\n  Candidate: 1.21.22\n  Version table:\n"
        " *** 1.21.22 500\n        500 http://mirror.invalid/debian bookworm/main amd64 Packages\n"
        "        100 /var/lib/dpkg/status\n"
    )
    assert _parse_policy(text) == {
        "hello": ("2.10-3", {"2.10-3"}),
        "virtual-mysql-server": ("(none)", set()),
        "dpkg": ("1.21.22", {"1.21.22"}),
    }


def test_boot_packages() -> None:
    installer = DebianInstaller(mirror="http://mirror.invalid/debian")
    packages = installer.boot_packages("amd64", release="bookworm")
    assert "linux-image-cloud-amd64" in packages and "extlinux" in packages
    assert "systemd-resolved" in packages
    assert "systemd-resolved" not in installer.boot_packages("amd64", release="bullseye")
    with pytest.raises(InvalidRequest, match="arm64"):
        installer.boot_packages("arm64", release="bookworm")


def test_boot_marker_unit(tmp_path: Path) -> None:
    install_boot_marker(tmp_path)
    unit = (tmp_path / "etc/systemd/system" / boot.MARKER_UNIT).read_text()
    assert f'echo "{boot.BOOT_MARKER}: ' in unit
    # systemd prints the Description on the console: it must not fake the marker.
    description = next(line for line in unit.splitlines() if line.startswith("Description="))
    assert boot.BOOT_MARKER not in description
    link = tmp_path / "etc/systemd/system/multi-user.target.wants" / boot.MARKER_UNIT
    assert os.readlink(link) == f"/etc/systemd/system/{boot.MARKER_UNIT}"
    install_boot_marker(tmp_path)  # idempotent


def test_qemu_argv_is_isolated(tmp_path: Path) -> None:
    argv = qemu_argv(
        tmp_path / "a,b.qcow2", fmt="qcow2", accel="tcg", memory_mb=512, cpus=1,
        console=tmp_path / "console.log",
    )
    joined = " ".join(argv)
    assert argv[argv.index("-nic") + 1] == "none"
    assert "-snapshot" in argv and "-nodefaults" in argv
    assert argv[argv.index("-display") + 1] == "none"
    assert f"file={tmp_path}/a,,b.qcow2,format=qcow2,if=virtio,snapshot=on" in joined
    assert "accel=tcg" in joined and argv[argv.index("-cpu") + 1] == "max"


def test_phase_timer() -> None:
    lines: list[str] = []
    timer = PhaseTimer(log=lines.append)
    with timer.phase("bootstrap"):
        time.sleep(0.01)
    with pytest.raises(ValueError), timer.phase("disk"):
        raise ValueError
    with timer.phase("bootstrap"):
        pass
    assert set(timer.seconds) == {"bootstrap", "disk"}
    assert timer.seconds["bootstrap"] >= 0.01
    assert timer.total == pytest.approx(sum(timer.seconds.values()))
    assert lines[0] == "== bootstrap" and lines[1].startswith("== bootstrap: ")
    assert "total" in timer.summary()


needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed"
)


@needs_qemu
def test_kvm_probe_answers_quickly_and_is_cached() -> None:
    started = time.monotonic()
    first = kvm_usable(timeout=5)
    assert time.monotonic() - started < 15
    started = time.monotonic()
    assert kvm_usable() is first
    assert time.monotonic() - started < 0.1


@needs_qemu
@pytest.mark.skipif(shutil.which("sfdisk") is None and not os.path.exists("/usr/sbin/sfdisk"),
                    reason="sfdisk is not installed")
def test_disk_without_bootloader_fails_in_time(tmp_path: Path) -> None:
    raw = tmp_path / "blank.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * 1024**2)
    subprocess.run(
        ["sfdisk", "--quiet", str(raw)], input=b"label: dos\nstart=2048, type=83\n", check=True,
        env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin"},
    )
    console = tmp_path / "console.log"
    result = boot_test(raw, fmt="raw", timeout=6, log_path=console, accel="tcg")
    assert not result.ok
    assert 6 <= result.seconds < 20
    assert "within 6 s" in result.reason
    assert console.exists()
    assert result.accel == "tcg"


def test_boot_test_rejects_unknown_formats(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest):
        boot_test(tmp_path / "x.vmdk", fmt="vmdk", log_path=tmp_path / "c.log")  # type: ignore[arg-type]


def test_a_kvm_that_dies_under_a_real_boot_falls_back_to_tcg(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """KVM can pass the probe and still abort QEMU under a real guest (nested hosts):
    that boot is run again with TCG, and TCG is used from then on."""
    calls: list[str] = []

    def fake_boot(image: Path, fmt: str, timeout: float, marker: str, memory_mb: int,
                  cpus: int, log_path: Path, accel: str, log: object,
                  cancel: object = None) -> boot.BootResult:
        calls.append(accel)
        if accel == "kvm":
            return boot.BootResult(ok=False, seconds=0.3, accel="kvm", console_log="",
                                   reason="qemu exited with status -6: qemu-system-x86_64: "
                                          "../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs",
                                   accel_failed=True)
        return boot.BootResult(ok=True, seconds=20.0, accel="tcg", console_log="rain-boot-ok",
                               reason="seen")

    disk = tmp_path / "d.raw"
    disk.write_bytes(b"\0" * 512)
    monkeypatch.setattr(boot, "_boot", fake_boot)
    monkeypatch.setattr(boot, "_kvm_answer", True)
    result = boot_test(disk, fmt="raw", log_path=tmp_path / "c.log")
    assert result.ok and result.accel == "tcg" and calls == ["kvm", "tcg"]
    assert kvm_usable() is False
    # A boot that fails for the image's own reasons is not retried.
    calls.clear()
    monkeypatch.setattr(boot, "_kvm_answer", True)
    monkeypatch.setattr(boot, "_boot", lambda *a, **k: (calls.append(a[7]), boot.BootResult(
        ok=False, seconds=1.0, accel=a[7], console_log="", reason="boot failed: Kernel panic"))[1])
    assert not boot_test(disk, fmt="raw", log_path=tmp_path / "c.log").ok
    assert calls == ["kvm"]
