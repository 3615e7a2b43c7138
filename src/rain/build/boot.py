"""Boot test: start an image in QEMU with no network and wait for it to say it booted.

The image runs with ``-nic none`` (nothing it does can reach anything),
``-snapshot`` (the image file is never written), its disk on virtio and its
serial console written to a log file that is watched while it boots. The test
passes when the console shows the marker, by default the line that
``rain-boot-marker.service`` writes to ttyS0 once ``multi-user.target`` is
reached (`install_boot_marker` puts that unit into images rain builds; for
other images pass ``marker="login:"``, the serial getty's prompt). The boot
time is the time from starting QEMU to the marker.

Acceleration (``[build] accel``): ``auto`` uses KVM when it works and TCG
otherwise; ``kvm`` and ``tcg`` force one. ``/dev/kvm`` existing is not enough:
on nested hosts KVM can hang in KVM_RUN, abort QEMU setting MSRs under
``-cpu host``, or run a real-mode program and then fail a real Linux boot with
"KVM internal error. Suberror: 1 … emulation failure", after which QEMU
*pauses* the guest instead of exiting. So:

- `kvm_usable` boots a one-sector probe with the machine, CPU model, CPU
  count, memory and virtio disk of a real boot; the probe does what early
  Linux needs from the accelerator (real mode → long mode with PAE paging,
  EFER written with ``wrmsr``, an MMIO read of the local APIC, which goes
  through KVM's instruction emulator, ``cpuid``), prints on the serial port
  and exits QEMU through the isa-debug-exit device. KVM is used only when
  that finishes within a few seconds; the answer is cached for the process.
- every boot is watched over QMP (`rain.build.qmp`) and through QEMU's
  stderr: a guest that stopped (paused, internal-error, …) ends the boot
  within a second or two instead of at the timeout.
- under ``auto``, a boot whose *accelerator* failed (a stopped guest, or
  QEMU dying with a KVM message) marks KVM unusable for the rest of the
  process (the server) and is run again at once with TCG.

QEMU's stderr goes into the build log after every boot.

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
from typing import BinaryIO, Literal

from rain.build.phases import LogFn, log_command
from rain.build.qmp import RUNNING_STATES, QemuMonitor
from rain.formats.tool import run_tool, running_tool
from rain.model.errors import BuildCancelled, InvalidRequest, ToolFailed
from rain.sandbox.tree import ImageTree

Accel = Literal["kvm", "tcg"]
AccelSetting = Literal["auto", "kvm", "tcg"]
ACCEL_SETTINGS: tuple[str, ...] = ("auto", "kvm", "tcg")
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
# The probe's boot sector, assembled from kvm_probe.asm beside this file (nasm -f bin):
# real mode → long mode (PAE paging, EFER.LME by wrmsr), a read of the local APIC's
# version register (MMIO, emulated by KVM), cpuid, _PROBE_TEXT on COM1, then port 0xf4.
_PROBE_CODE = bytes.fromhex(
    "fa31c08ed88ec08ed0bc007cbf0010b90020f3ab66c70600100320000066c70600200330000066c706182003"
    "40000066c70600308300000066c706b84f9300e0fe0f0116c87c0f20e06683c8200f22e066b8001000000f22"
    "d866b9800000c00f32660d000100000f300f20c0660d010000800f22c0ea7a7c080066b810008ed88ec08ed0"
    "bb3000e0fe8b0385c0741e31c00fa248bece7c00000000000066baf803ac84c07403eeebf8b010e6f4f4ebfd"
    "000000000000000000000000009a200000000000009200001700b07c00007261696e2d616363656c2d6f6b0a"
    "00"
)
# SeaBIOS skips a virtio disk of one sector; the probe's disk is padded to this.
_PROBE_DISK_SIZE = 1 << 20
# QEMU's own words when KVM, not the guest, failed.
KVM_FAILURE_SIGNS: tuple[str, ...] = ("KVM internal error", "emulation failure", "kvm_")
# Seconds between QMP status checks while a guest boots.
_STATUS_EVERY = 1.0
_POLL = 0.1
# A busy host delays a boot without anything being wrong with it: the time QEMU's
# threads spent ready to run but waiting for a CPU is added to the timeout, up to
# this many timeouts more.
MAX_EXTENSION = 2.0
_STDERR_KEPT = 64 * 1024
_STDERR_LOG_LINES = 40

_kvm_lock = threading.Lock()
_kvm_answer: bool | None = None


@dataclass(frozen=True)
class BootResult:
    ok: bool
    seconds: float  # until the marker when ok, else until giving up
    accel: Accel
    console_log: str
    reason: str  # one line: what happened
    # The accelerator failed (the guest stopped under KVM, QEMU died naming KVM), not
    # the image: the same boot under TCG says whether the image is good.
    accel_failed: bool = False
    qemu_stderr: str = ""


def boot_test(
    image: Path,
    *,
    fmt: Literal["qcow2", "raw"] = "qcow2",
    timeout: float = 120.0,
    marker: str | None = None,
    memory_mb: int = 1024,
    cpus: int = 2,
    log_path: Path,
    accel: Accel | AccelSetting | None = None,
    log: LogFn | None = None,
    cancel: threading.Event | None = None,
) -> BootResult:
    """Boot `image` and wait up to `timeout` seconds for `marker` on its serial console.

    `accel` None or "auto": KVM when `kvm_usable`, else TCG, and a KVM boot whose
    accelerator fails is run again with TCG. Returns ok=False (never raises) when the
    marker does not appear in time, QEMU exits, the guest stops or the console shows a
    fatal boot error; the console log is in `log_path` and in the result either way.
    Raises `ToolFailed` only when QEMU cannot be started at all, and `BuildCancelled`
    (QEMU killed) once `cancel` is set.
    """
    if fmt not in ("qcow2", "raw"):
        raise InvalidRequest(f"boot test supports qcow2 and raw images, not {fmt!r}")
    if accel not in (None, *ACCEL_SETTINGS):
        raise InvalidRequest(f"unknown accelerator {accel!r}: use {', '.join(ACCEL_SETTINGS)}")
    image = Path(image).absolute()
    if not image.is_file():
        raise InvalidRequest(f"{image} does not exist")
    marker = marker or BOOT_MARKER
    if accel in ("kvm", "tcg"):
        return _boot(image, fmt, timeout, marker, memory_mb, cpus, log_path, accel, log, cancel)
    result = _boot(image, fmt, timeout, marker, memory_mb, cpus, log_path,
                   "kvm" if kvm_usable() else "tcg", log, cancel)
    if result.accel == "kvm" and result.accel_failed:
        # KVM passed the probe but failed under a real guest (nested virtualisation):
        # this process uses TCG from now on, starting with this boot.
        _forget_kvm()
        if log is not None:
            log(f"KVM failed under a real boot ({result.reason}); using TCG from now on "
                "and booting again")
        result = _boot(image, fmt, timeout, marker, memory_mb, cpus, log_path, "tcg", log,
                       cancel)
    return result


def _forget_kvm() -> None:
    global _kvm_answer
    with _kvm_lock:
        _kvm_answer = False


def _boot(image: Path, fmt: str, timeout: float, marker: str, memory_mb: int, cpus: int,
          log_path: Path, accel: Accel, log: LogFn | None,
          cancel: threading.Event | None = None) -> BootResult:
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_bytes(b"")
    started = time.monotonic()
    seen = b""
    ok, reason, accel_failed = False, f"no {marker!r} on the console within {timeout:g} s", False
    with tempfile.TemporaryDirectory(prefix="rain-boot-") as tmp:
        qmp_path = Path(tmp) / "qmp.sock"
        argv = [*qemu_argv(image, fmt=fmt, accel=accel, memory_mb=memory_mb, cpus=cpus,
                           console=log_path),
                "-qmp", f"unix:{_qemu_escape(str(qmp_path))},server=on,wait=off"]
        log_command(log, argv)
        with (
            open(Path(tmp) / "qemu.err", "w+b") as err,
            running_tool(argv, stderr=err, env={**os.environ, "TMPDIR": tmp}) as proc,
            open(log_path, "rb") as console,
            QemuMonitor(qmp_path) as monitor,
        ):
            # -snapshot keeps its overlay in TMPDIR, removed with the directory.
            next_status = started + _STATUS_EVERY
            extended = False
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
                    detail = _stderr_lines(err)
                    reason = f"qemu exited with status {proc.returncode}" + (
                        f": {detail[-1]}" if detail else "")
                    accel_failed = accel == "kvm" and _names_kvm(detail)
                    break
                now = time.monotonic()
                if now >= next_status:
                    next_status = now + _STATUS_EVERY
                    detail = _stderr_lines(err)
                    if accel == "kvm" and _names_kvm(detail):
                        reason = f"KVM failed: {_first_kvm_line(detail)}"
                        accel_failed = True
                        break
                    status = monitor.status()
                    if status is not None and status not in RUNNING_STATES:
                        # Nothing in a boot test resumes a guest: it stopped for good.
                        reason = f"the guest stopped (QEMU status {status!r})"
                        if detail:
                            reason += f": {detail[-1]}"
                        accel_failed = accel == "kvm"
                        break
                if now - started > timeout:
                    waited = min(run_delay(proc.pid), MAX_EXTENSION * timeout)
                    if now - started > timeout + waited:
                        if waited >= 1:
                            reason += (f" (and {waited:.0f} s more for the time QEMU "
                                       "waited for a CPU)")
                        break
                    if not extended and waited >= 1:
                        extended = True
                        if log is not None:
                            log(f"boot test: {timeout:g} s passed, but QEMU waited "
                                f"{waited:.0f} s for a CPU (the host is busy): counting "
                                "only the time it could run")
                if cancel is not None and cancel.wait(_POLL):
                    raise BuildCancelled("the boot test was cancelled")  # QEMU killed on exit
                if cancel is None:
                    time.sleep(_POLL)
            seconds = time.monotonic() - started
            stderr = "\n".join(_stderr_lines(err))
    console_log = (seen + _read_rest(log_path, len(seen))).decode("utf-8", "replace")
    if log is not None:
        for line in stderr.splitlines()[-_STDERR_LOG_LINES:]:
            log(f"qemu: {line}")
        log(f"boot test ({accel}): {'ok' if ok else 'FAILED'} after {seconds:.1f} s: {reason}")
    return BootResult(ok=ok, seconds=seconds, accel=accel, console_log=console_log,
                      reason=reason, accel_failed=accel_failed, qemu_stderr=stderr)


def run_delay(pid: int) -> float:
    """Seconds the busiest-waiting thread of process `pid` spent runnable but not running
    (/proc/PID/task/*/schedstat, second field): the boot time a busy host took from it.
    0 where the kernel keeps no such statistics."""
    waited = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                fields = f.read().split()
            waited = max(waited, int(fields[1]))
        except (OSError, IndexError, ValueError):
            continue
    return waited / 1e9


def _stderr_lines(err: BinaryIO) -> list[str]:
    """What QEMU wrote to stderr so far (the file it writes, read from the start)."""
    err.seek(0)
    text = err.read(_STDERR_KEPT).decode("utf-8", "replace")
    return [line.rstrip() for line in text.splitlines() if line.strip()]


def _names_kvm(lines: list[str]) -> bool:
    return any(sign in line for line in lines for sign in KVM_FAILURE_SIGNS)


def _first_kvm_line(lines: list[str]) -> str:
    return next((" ".join(line.split())[:200] for line in lines
                 if any(sign in line for sign in KVM_FAILURE_SIGNS)), "")


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


def probe_argv(disk: Path, accel: Accel, *, memory_mb: int = 1024, cpus: int = 2) -> list[str]:
    """QEMU running the probe sector in `disk`: a real boot's machine, CPU, memory and disk."""
    argv = qemu_argv(disk, fmt="raw", accel=accel, memory_mb=memory_mb, cpus=cpus,
                     console=Path("/dev/null"))
    # The console goes to stdout instead of a file, and the probe exits QEMU itself.
    at = argv.index("-chardev")
    del argv[at:at + 4]  # -chardev file,… -serial chardev:console
    return [*argv, "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]


def run_probe(accel: Accel, timeout: float = KVM_PROBE_TIMEOUT) -> bool:
    """Whether the probe sector runs to its end under `accel` within `timeout` seconds."""
    with tempfile.TemporaryDirectory(prefix="rain-kvm-") as tmp:
        disk = Path(tmp) / "probe.img"
        with open(disk, "wb") as f:
            f.write(_PROBE_CODE.ljust(510, b"\0") + b"\x55\xaa")
            f.truncate(_PROBE_DISK_SIZE)
        try:
            result = run_tool(probe_argv(disk, accel), timeout=timeout, check=False)
        except ToolFailed:
            return False  # hung (killed at the timeout) or could not start
        return result.returncode == _PROBE_EXIT and _PROBE_TEXT in result.stdout


def _probe_kvm(timeout: float) -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    return run_probe("kvm", timeout)


def install_boot_marker(root: Path | ImageTree) -> None:
    """Put `MARKER_UNIT` into the image at `root`, enabled for multi-user.target.

    Plain files, no systemctl: works on any systemd image without entering it. The
    writes go through `ImageTree`, so links planted in the image resolve inside it.
    """
    if not isinstance(root, ImageTree):
        with ImageTree(root) as tree:
            install_boot_marker(tree)
        return
    units = "/etc/systemd/system"
    root.write_text(f"{units}/{MARKER_UNIT}", _MARKER_UNIT_TEXT)
    root.symlink(f"{units}/multi-user.target.wants/{MARKER_UNIT}", f"{units}/{MARKER_UNIT}")


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
