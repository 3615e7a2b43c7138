"""Boot test: start an image in QEMU with no network and wait for it to say it booted.

The image runs with ``-nic none`` (nothing it does can reach anything),
``-snapshot`` (the image file is never written), its disk on virtio and its
serial console written to a log file that is watched while it boots. The test
passes when the console shows the marker, by default the line that
``rain-boot-marker.service`` writes to ttyS0 once ``multi-user.target`` is
reached (`install_boot_marker` puts that unit into images rain builds; for
other images pass ``marker="login:"``, the serial getty's prompt). The boot
time is the time from starting QEMU to the marker.

Acceleration: KVM when it works, TCG otherwise. ``/dev/kvm`` existing is not
enough (nested virtualisation can hang in KVM_RUN), so `kvm_usable` boots a
512-byte program under ``-accel kvm`` that prints to the serial port and
exits QEMU through the isa-debug-exit device; KVM is used only when that
finishes within a few seconds. The answer is cached for the process.

QEMU runs through `running_tool`: whatever happens (marker, timeout, error,
KeyboardInterrupt) its whole process group is killed on the way out. Boot
images only once they have been vetted (`rain.formats`): the drive format is
always given explicitly, never probed.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rain.build.chroot import inside_root
from rain.build.phases import LogFn, log_command
from rain.formats.tool import run_tool, running_tool
from rain.model.errors import InvalidRequest, ToolFailed

Accel = Literal["kvm", "tcg"]
QEMU = "qemu-system-x86_64"
BOOT_MARKER = "rain-boot-ok"
MARKER_UNIT = "rain-boot-marker.service"
# What the unit writes: the marker plus text no other boot message contains.
# Its Description must not contain the marker: systemd echoes it on the console.
_MARKER_UNIT_TEXT = f"""\
[Unit]
Description=Report a finished boot on the serial console (rain boot test)
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "{BOOT_MARKER}: multi-user.target reached" > /dev/ttyS0'

[Install]
WantedBy=multi-user.target
"""
# Console lines after which waiting longer is pointless.
FAILURE_SIGNS: tuple[str, ...] = (
    "Kernel panic - not syncing",
    "Gave up waiting for root file system device",
    "ALERT!  UUID=",
    "No bootable device",
    "Boot failed:",
    "Could not find kernel image",
)
KVM_PROBE_TIMEOUT = 5.0
_PROBE_TEXT = b"rain-accel-ok"
_PROBE_EXIT = 33  # isa-debug-exit: (0x10 << 1) | 1
# Real-mode boot sector: print _PROBE_TEXT on COM1, write 0x10 to port 0xf4
# (isa-debug-exit ends QEMU), then halt.
_PROBE_CODE = (
    bytes.fromhex("fa31c08ed8be1a7cbaf803ac84c07403eeebf8b010e6f4f4ebfd") + _PROBE_TEXT + b"\n\0"
)
_POLL = 0.1

_kvm_lock = threading.Lock()
_kvm_answer: bool | None = None


@dataclass(frozen=True)
class BootResult:
    ok: bool
    seconds: float  # until the marker when ok, else until giving up
    accel: Accel
    console_log: str
    reason: str  # one line: what happened


def boot_test(
    image: Path,
    *,
    fmt: Literal["qcow2", "raw"] = "qcow2",
    timeout: float = 120.0,
    marker: str | None = None,
    memory_mb: int = 1024,
    cpus: int = 2,
    log_path: Path,
    accel: Accel | None = None,
    log: LogFn | None = None,
) -> BootResult:
    """Boot `image` and wait up to `timeout` seconds for `marker` on its serial console.

    Returns ok=False (never raises) when the marker does not appear in time,
    QEMU exits or the console shows a fatal boot error; the console log is in
    `log_path` and in the result either way. Raises `ToolFailed` only when
    QEMU cannot be started at all.
    """
    if fmt not in ("qcow2", "raw"):
        raise InvalidRequest(f"boot test supports qcow2 and raw images, not {fmt!r}")
    image = Path(image).absolute()
    if not image.is_file():
        raise InvalidRequest(f"{image} does not exist")
    marker = marker or BOOT_MARKER
    if accel is None:
        result = _boot(image, fmt, timeout, marker, memory_mb, cpus, log_path,
                       "kvm" if kvm_usable() else "tcg", log)
        if result.accel == "kvm" and _kvm_died(result):
            # KVM passed the probe but QEMU died under it (nested virtualisation):
            # this process uses TCG from now on, starting with this boot.
            _forget_kvm()
            if log is not None:
                log("KVM failed under a real boot; booting again with TCG")
            result = _boot(image, fmt, timeout, marker, memory_mb, cpus, log_path, "tcg", log)
        return result
    return _boot(image, fmt, timeout, marker, memory_mb, cpus, log_path, accel, log)


def _kvm_died(result: BootResult) -> bool:
    """QEMU exited by itself, early, naming KVM: the accelerator failed, not the image."""
    return result.reason.startswith("qemu exited") and "kvm" in result.reason.lower()


def _forget_kvm() -> None:
    global _kvm_answer
    with _kvm_lock:
        _kvm_answer = False


def _boot(image: Path, fmt: str, timeout: float, marker: str, memory_mb: int, cpus: int,
          log_path: Path, accel: Accel, log: LogFn | None) -> BootResult:
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_bytes(b"")
    argv = qemu_argv(image, fmt=fmt, accel=accel, memory_mb=memory_mb, cpus=cpus, console=log_path)
    log_command(log, argv)

    started = time.monotonic()
    seen = b""
    ok, reason = False, f"no {marker!r} on the console within {timeout:g} s"
    with (
        tempfile.TemporaryDirectory(prefix="rain-boot-") as tmp,
        open(Path(tmp) / "qemu.err", "w+b") as err,
        running_tool(argv, stderr=err, env={**os.environ, "TMPDIR": tmp}) as proc,
        open(log_path, "rb") as console,
    ):
        # -snapshot keeps its overlay in TMPDIR, removed with the directory.
        while True:
            chunk = console.read()
            if chunk:
                seen += chunk
                text = seen.decode("utf-8", "replace")
                if marker in text:
                    ok, reason = True, f"{marker!r} seen on the console"
                    break
                sign = next((s for s in FAILURE_SIGNS if s in text), None)
                if sign is not None:
                    reason = f"boot failed: {_line_with(text, sign)}"
                    break
            if proc.poll() is not None:
                seen += console.read()
                err.seek(0)
                detail = err.read().decode("utf-8", "replace").strip().splitlines()
                reason = f"qemu exited with status {proc.returncode}" + (
                    f": {detail[-1]}" if detail else ""
                )
                break
            if time.monotonic() - started > timeout:
                break
            time.sleep(_POLL)
        seconds = time.monotonic() - started
    console_log = (seen + _read_rest(log_path, len(seen))).decode("utf-8", "replace")
    if log is not None:
        log(f"boot test ({accel}): {'ok' if ok else 'FAILED'} after {seconds:.1f} s: {reason}")
    return BootResult(ok=ok, seconds=seconds, accel=accel, console_log=console_log, reason=reason)


def qemu_argv(
    image: Path,
    *,
    fmt: str,
    accel: Accel,
    memory_mb: int,
    cpus: int,
    console: Path,
) -> list[str]:
    """The QEMU command line of a boot test (no network, no display, snapshot mode)."""
    cpu = "host" if accel == "kvm" else "max"
    return [
        QEMU,
        "-nodefaults",
        "-no-user-config",
        "-machine",
        f"pc,accel={accel}",
        "-cpu",
        cpu,
        "-smp",
        str(cpus),
        "-m",
        str(memory_mb),
        "-display",
        "none",
        "-nic",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
        "-snapshot",
        "-chardev",
        f"file,id=console,path={_qemu_escape(str(console.absolute()))}",
        "-serial",
        "chardev:console",
        "-drive",
        f"file={_qemu_escape(str(image))},format={fmt},if=virtio,snapshot=on",
    ]


def kvm_usable(timeout: float = KVM_PROBE_TIMEOUT) -> bool:
    """True when KVM really runs a guest here (probed once per process)."""
    global _kvm_answer
    with _kvm_lock:
        if _kvm_answer is None:
            _kvm_answer = _probe_kvm(timeout)
        return _kvm_answer


def _probe_kvm(timeout: float) -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.TemporaryDirectory(prefix="rain-kvm-") as tmp:
        sector = Path(tmp) / "probe.img"
        sector.write_bytes(_PROBE_CODE.ljust(510, b"\0") + b"\x55\xaa")
        argv = [
            QEMU,
            "-nodefaults",
            "-no-user-config",
            "-machine",
            "pc,accel=kvm",
            # The CPU real boots get: on some nested hosts `-cpu host` is what fails
            # (QEMU aborts setting MSRs) where the default CPU model works.
            "-cpu",
            "host",
            "-m",
            "16",
            "-display",
            "none",
            "-nic",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-drive",
            f"file={_qemu_escape(str(sector))},format=raw,if=floppy",
        ]
        try:
            result = run_tool(argv, timeout=timeout, check=False)
        except ToolFailed:
            return False  # hung (killed at the timeout) or could not start
        return result.returncode == _PROBE_EXIT and _PROBE_TEXT in result.stdout


def install_boot_marker(root: Path) -> None:
    """Put `MARKER_UNIT` into the image at `root`, enabled for multi-user.target.

    Plain files, no systemctl: works on any systemd image without entering it.
    """
    units = inside_root(root, "/etc/systemd/system")
    units.mkdir(parents=True, exist_ok=True)
    (units / MARKER_UNIT).write_text(_MARKER_UNIT_TEXT)
    wants = units / "multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    link = wants / MARKER_UNIT
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(f"/etc/systemd/system/{MARKER_UNIT}")


def _qemu_escape(value: str) -> str:
    """A value inside a QEMU -option list: commas are doubled."""
    return value.replace(",", ",,")


def _line_with(text: str, needle: str) -> str:
    for line in text.splitlines():
        if needle in line:
            return " ".join(line.split())[:200]
    return needle


def _read_rest(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read()
    except OSError:
        return b""
