"""The boot test on hosts whose KVM misbehaves: real QEMU (TCG) guests that stop,
a probe that must run in long mode, the fallback to TCG and QEMU's stderr in the log.

KVM's own failure (a guest paused by "KVM internal error … emulation failure")
cannot be produced on demand; these tests make a real QEMU guest stop the same
way QEMU does then (the guest halts for good while QEMU keeps running): a boot
sector that triple-faults under ``-action shutdown=pause``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from rain.build import boot
from rain.build.boot import boot_test, run_probe
from rain.build.builder import make_runner
from rain.config import Config
from rain.model.errors import BuildCancelled, InvalidRequest

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86 is not installed")

# nasm -f bin of: cli; xor ax,ax; mov ds,ax; mov si,msg; mov dx,0x3f8;
# next: lodsb; test al,al; jz done; out dx,al; jmp next; done: hlt; jmp done;
# msg: db "rain-boot-ok",10,0
MARKER_SECTOR = bytes.fromhex(
    "fa31c08ed8be167cbaf803ac84c07403eeebf8f4ebfd7261696e2d626f6f742d6f6b0a00")
# cli; xor ax,ax; mov ds,ax; lidt [idt]; int 3; idt: dw 0, dd 0 — a triple fault.
FAULT_SECTOR = bytes.fromhex("fa31c08ed80f011e0c7ccd03000000000000")
TIMEOUT = 120.0  # a liveness bound for the boots below, never reached when they work


def sector_disk(path: Path, code: bytes) -> Path:
    with open(path, "wb") as f:
        f.write(code.ljust(510, b"\0") + b"\x55\xaa")
        f.truncate(1 << 20)  # SeaBIOS skips a one-sector virtio disk
    return path


ArgvFn = Callable[..., list[str]]


def stopping_guest(original: ArgvFn, fault_disk: Path, when: str) -> ArgvFn:
    """qemu_argv whose guest, for accelerator `when`, stops for good under TCG."""
    def argv(image: Path, *, fmt: str, accel: str, memory_mb: int, cpus: int,
             console: Path) -> list[str]:
        if accel != when:
            return original(image, fmt=fmt, accel=accel, memory_mb=memory_mb, cpus=cpus,
                            console=console)
        real = original(fault_disk, fmt="raw", accel="tcg", memory_mb=memory_mb, cpus=cpus,
                        console=console)
        return [*real, "-action", "shutdown=pause"]
    return argv


def test_the_probe_sector_runs_in_long_mode_under_tcg() -> None:
    # The same bytes the KVM probe boots: they must reach the end (marker + exit) on a
    # correct CPU, or the probe would call every working KVM broken.
    assert run_probe("tcg", timeout=60)


def test_the_probe_boots_what_a_real_boot_boots() -> None:
    argv = boot.probe_argv(Path("/tmp/p.img"), "kvm")
    real = boot.qemu_argv(Path("/tmp/p.img"), fmt="raw", accel="kvm", memory_mb=1024, cpus=2,
                          console=Path("/dev/null"))
    for option in ("-machine", "-cpu", "-smp", "-m", "-drive"):
        assert argv[argv.index(option) + 1] == real[real.index(option) + 1]


def test_a_stopped_guest_ends_the_boot_at_once(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    fault = sector_disk(tmp_path / "fault.img", FAULT_SECTOR)
    monkeypatch.setattr(boot, "qemu_argv", stopping_guest(boot.qemu_argv, fault, "tcg"))
    lines: list[str] = []
    result = boot_test(fault, fmt="raw", timeout=TIMEOUT, log_path=tmp_path / "c.log",
                       accel="tcg", log=lines.append)
    assert not result.ok
    assert "the guest stopped" in result.reason and "shutdown" in result.reason
    assert result.seconds < TIMEOUT  # QMP saw it; the timeout did not end it
    assert not result.accel_failed  # under TCG a stopped guest is the image's fault
    assert any("boot test (tcg): FAILED" in line for line in lines)


def test_a_guest_stopping_under_kvm_falls_back_to_tcg_for_good(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = sector_disk(tmp_path / "good.img", MARKER_SECTOR)
    fault = sector_disk(tmp_path / "fault.img", FAULT_SECTOR)
    # "KVM" passed the probe; its guests stop as KVM's emulation failures do.
    monkeypatch.setattr(boot, "_kvm_answer", True)
    monkeypatch.setattr(boot, "qemu_argv", stopping_guest(boot.qemu_argv, fault, "kvm"))
    lines: list[str] = []
    result = boot_test(good, fmt="raw", timeout=TIMEOUT, log_path=tmp_path / "c.log",
                       log=lines.append)
    assert result.ok and result.accel == "tcg"
    assert any("KVM failed under a real boot" in line for line in lines)
    assert boot.kvm_usable() is False  # the rest of the process uses TCG
    lines.clear()
    assert boot_test(good, fmt="raw", timeout=TIMEOUT, log_path=tmp_path / "c.log",
                     log=lines.append).accel == "tcg"
    assert not any("KVM failed" in line for line in lines)


def test_forced_kvm_is_not_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = sector_disk(tmp_path / "good.img", MARKER_SECTOR)
    fault = sector_disk(tmp_path / "fault.img", FAULT_SECTOR)
    monkeypatch.setattr(boot, "_kvm_answer", True)
    monkeypatch.setattr(boot, "qemu_argv", stopping_guest(boot.qemu_argv, fault, "kvm"))
    result = boot_test(good, fmt="raw", timeout=TIMEOUT, log_path=tmp_path / "c.log",
                       accel="kvm")
    assert not result.ok and result.accel == "kvm" and result.accel_failed
    assert boot.kvm_usable() is True  # a forced accelerator teaches the process nothing


def test_qemu_stderr_goes_into_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = sector_disk(tmp_path / "good.img", MARKER_SECTOR)
    original = boot.qemu_argv

    def warning_argv(*args: object, **kwargs: object) -> list[str]:
        # TCG cannot offer VMX: QEMU warns on stderr and boots anyway.
        return [*original(*args, **kwargs), "-cpu", "max,+vmx"]  # type: ignore[arg-type]

    monkeypatch.setattr(boot, "qemu_argv", warning_argv)
    lines: list[str] = []
    result = boot_test(good, fmt="raw", timeout=TIMEOUT, log_path=tmp_path / "c.log",
                       accel="tcg", log=lines.append)
    assert result.ok
    assert "vmx" in result.qemu_stderr
    assert any(line.startswith("qemu: ") and "vmx" in line for line in lines)


def test_accel_setting_is_checked(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="accelerator"):
        boot_test(tmp_path / "x.raw", fmt="raw", log_path=tmp_path / "c.log",
                  accel="xen")  # type: ignore[arg-type]
    cfg = Config(data_dir=tmp_path)
    cfg.build.accel = "hvf"
    with pytest.raises(InvalidRequest, match=r"\[build\] accel"):
        make_runner(object(), cfg)  # type: ignore[arg-type]


def test_a_cancelled_boot_stops_qemu(tmp_path: Path) -> None:
    # A disk with no boot code: QEMU would sit in the BIOS until the timeout.
    blank = tmp_path / "blank.img"
    blank.write_bytes(b"\0" * (1 << 20))
    cancel = threading.Event()
    threading.Timer(2.0, cancel.set).start()
    with pytest.raises(BuildCancelled):
        boot_test(blank, fmt="raw", timeout=TIMEOUT, log_path=tmp_path / "c.log",
                  accel="tcg", cancel=cancel)
    # running_tool killed QEMU's whole process group on the way out.
    left = subprocess.run(["pgrep", "-f", str(blank)], capture_output=True, text=True)
    assert left.stdout.strip() == ""


# jmp $ — a guest that spins for ever: it always wants a CPU.
SPIN_SECTOR = bytes.fromhex("ebfe")


@pytest.mark.skipif(not Path("/proc/self/schedstat").exists(),
                    reason="this kernel keeps no scheduler statistics (/proc/PID/schedstat)")
def test_time_a_busy_host_takes_from_the_boot_is_added_to_its_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU at nice 19 on one CPU, beside a busy loop at nice 0 on the same CPU: it waits
    for the CPU nearly all the time. That wait must extend the timeout (up to its limit),
    and the log and the reason say so; a spinning guest on an idle host gets neither."""
    disk = sector_disk(tmp_path / "spin.img", SPIN_SECTOR)
    original = boot.qemu_argv

    def starved(*args: object, **kwargs: object) -> list[str]:
        return ["taskset", "-c", "0", "nice", "-n", "19", *original(*args, **kwargs)]

    monkeypatch.setattr(boot, "qemu_argv", starved)
    hog = subprocess.Popen(["taskset", "-c", "0", "nice", "-n", "0", sys.executable, "-c",
                            "while True: pass"])
    lines: list[str] = []
    try:
        result = boot_test(disk, fmt="raw", timeout=3.0, log_path=tmp_path / "c.log",
                           accel="tcg", cpus=1, log=lines.append)
    finally:
        hog.kill()
        hog.wait()
    assert not result.ok
    assert "waited for a CPU" in result.reason, result.reason
    assert any("the host is busy" in line for line in lines), lines


def test_run_delay_of_a_gone_process_is_zero() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert boot.run_delay(gone.pid) == 0.0
