"""Typed wrapper of `qemu-img`: the one module that knows its argv and quirks.

How images are named to qemu-img:

- Always by absolute path, so a file name can never be read as a protocol
  (`nbd:...`, `json:...`).
- Never probed, except by `info(path, None)`, which exists for the raw
  cross-check in `rain.formats.inspect`. Otherwise the driver is explicit,
  given inside a `json:{...}` image spec rather than with `-f`: the spec can
  also say `"backing": null` for formats that have backing files (qcow2,
  vmdk), which stops `qemu-img check`/`convert` from ever opening a backing
  file named by an untrusted header. (`qemu-img info` never opens backing
  files by itself.)
- `-U` (force-share): rain only reads the source images, and a reader must
  not fail because another process holds the image's write lock.

Callers inspecting untrusted files pass `ToolLimits`; `create_overlay` only
works on files rain made itself.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from rain.formats.tool import (
    CONVERT_LIMITS,
    DEFAULT_LIMITS,
    ToolExitError,
    ToolLimits,
    run_tool,
    stderr_tail,
)
from rain.model import DiskFormat
from rain.model.errors import InvalidRequest, ToolFailed

QEMU_IMG = "qemu-img"

# qemu's driver names. An ISO image is plain bytes to qemu ("raw"); vpc is VHD.
QEMU_FORMAT: dict[DiskFormat, str] = {
    DiskFormat.RAW: "raw",
    DiskFormat.ISO: "raw",
    DiskFormat.QCOW2: "qcow2",
    DiskFormat.VMDK: "vmdk",
    DiskFormat.VPC: "vpc",
    DiskFormat.VHDX: "vhdx",
    DiskFormat.VDI: "vdi",
}
# Drivers that accept the "backing" option (and so can be told `null`).
_HAS_BACKING = {DiskFormat.QCOW2, DiskFormat.VMDK}
# Output options rain always wants, per target format; callers' options override by key.
_DEFAULT_OUTPUT_OPTIONS: dict[DiskFormat, dict[str, str]] = {
    # Dynamic VHD keeps empty space sparse; force_size keeps the exact virtual
    # size instead of rounding it to a CHS geometry (Azure requires this too).
    DiskFormat.VPC: {"subformat": "dynamic", "force_size": "on"},
}
# `qemu-img check` exit codes (see its man page).
CHECK_OK, CHECK_FAILED, CHECK_CORRUPT, CHECK_LEAKS, CHECK_UNSUPPORTED = 0, 1, 2, 3, 63


def qemu_format(fmt: DiskFormat) -> str:
    """qemu's driver name for a rain disk format."""
    return QEMU_FORMAT[fmt]


def image_spec(path: Path, fmt: DiskFormat) -> str:
    """A `json:` image name that fixes the driver and (where possible) disables backing files."""
    spec: dict[str, Any] = {
        "driver": qemu_format(fmt),
        "file": {"driver": "file", "filename": os.path.abspath(path)},
    }
    if fmt in _HAS_BACKING:
        spec["backing"] = None
    return "json:" + json.dumps(spec, separators=(",", ":"))


def info(path: Path, fmt: DiskFormat | None, limits: ToolLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """`qemu-img info --output=json` of one image (no backing chain).

    `fmt=None` lets qemu probe the format; use that only to cross-check a file
    that rain already believes is raw.
    """
    target = os.path.abspath(path) if fmt is None else image_spec(path, fmt)
    proc = _run(["info", "--output=json", "-U", target], limits)
    return _json(proc.stdout, "info")


def check(path: Path, fmt: DiskFormat, limits: ToolLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """`qemu-img check --output=json`: the report, also when it finds corruption or leaks.

    The report's `corruptions` and `leaks` counts are what matter (exit codes 2
    and 3); rain adds `errors`, qemu's ERROR lines from stderr. An image that
    cannot be checked at all (exit 1, or 63 for formats without a checker such
    as vpc) raises `ToolExitError` with qemu's reason.
    """
    proc = _run(["check", "--output=json", "-U", image_spec(path, fmt)], limits, check=False)
    if proc.returncode in (CHECK_OK, CHECK_CORRUPT, CHECK_LEAKS):
        report = _json(proc.stdout, "check")
        report.setdefault("corruptions", 0)
        report.setdefault("leaks", 0)
        # The JSON has only counts; the reasons are on stderr, one "ERROR ..." line each.
        stderr = proc.stderr.decode("utf-8", "replace")
        report["errors"] = [line for line in stderr.splitlines() if line.startswith("ERROR")]
        return report
    raise _exit_error("check", proc)


def convert(
    src: Path,
    src_fmt: DiskFormat,
    dst: Path,
    dst_fmt: DiskFormat,
    limits: ToolLimits = CONVERT_LIMITS,
    *,
    compress: bool = False,
    options: list[str] | None = None,
) -> None:
    """Write `src` (read as `src_fmt`) to `dst` in `dst_fmt`; `dst` is overwritten.

    `options` are qemu `-o` items (`"key=value"`), e.g. `["subformat=streamOptimized"]`
    for vmdk. `compress` is qcow2 compression (`-c`).
    """
    if dst_fmt is DiskFormat.ISO:
        raise InvalidRequest(
            "iso is not an output format: an ISO image can only be stored as it is"
        )
    if compress and dst_fmt is not DiskFormat.QCOW2:
        raise InvalidRequest(f"compression is only available for qcow2 output, not {dst_fmt}")
    argv = ["convert", "-U", image_spec(src, src_fmt), "-O", qemu_format(dst_fmt)]
    if compress:
        argv.append("-c")
    opts = _merge_options(_DEFAULT_OUTPUT_OPTIONS.get(dst_fmt, {}), options or [])
    if opts:
        argv += ["-o", opts]
    argv.append(os.path.abspath(dst))
    _run(argv, limits)


def compare(
    a: Path, a_fmt: DiskFormat, b: Path, b_fmt: DiskFormat, limits: ToolLimits = CONVERT_LIMITS
) -> bool:
    """Whether two images have the same guest-visible content (`qemu-img compare`).

    Sizes may differ as long as the extra part of the larger one reads as zeros.
    """
    proc = _run(["compare", "-U", image_spec(a, a_fmt), image_spec(b, b_fmt)], limits, check=False)
    if proc.returncode in (0, 1):
        return proc.returncode == 0
    raise _exit_error("compare", proc)


def create_overlay(
    backing: Path,
    backing_fmt: DiskFormat,
    dst: Path,
    size: int | None = None,
    *,
    timeout: float = 60.0,
) -> None:
    """Create a qcow2 copy-on-write overlay `dst` over `backing` (an instance disk).

    The backing format is always explicit (`-F`), so qemu never probes the
    backing file; its path is recorded absolute. `size` grows the disk beyond
    the backing image's virtual size (None keeps it).
    """
    argv = [
        "create",
        "-f",
        "qcow2",
        "-b",
        os.path.abspath(backing),
        "-F",
        qemu_format(backing_fmt),
        os.path.abspath(dst),
    ]
    if size is not None:
        if size <= 0:
            raise InvalidRequest(f"overlay size must be positive, not {size}")
        argv.append(str(size))
    run_tool([QEMU_IMG, *argv], timeout=timeout)


def resize(path: Path, fmt: DiskFormat, size: int, *, timeout: float = 60.0) -> None:
    """Grow the image rain made at `path` to `size` bytes (`qemu-img resize`, never shrinks)."""
    if size <= 0:
        raise InvalidRequest(f"disk size must be positive, not {size}")
    target = os.path.abspath(path)
    run_tool([QEMU_IMG, "resize", "-f", qemu_format(fmt), target, str(size)], timeout=timeout)


def _run(
    args: list[str], limits: ToolLimits, *, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    return run_tool(
        [QEMU_IMG, *args],
        timeout=limits.timeout,
        cpu_seconds=limits.cpu_seconds,
        memory_bytes=limits.memory_bytes,
        check=check,
    )


def _exit_error(what: str, proc: subprocess.CompletedProcess[bytes]) -> ToolExitError:
    stderr = proc.stderr.decode("utf-8", "replace")
    return ToolExitError(
        f"{QEMU_IMG} {what} failed (exit {proc.returncode}): {stderr_tail(stderr)}",
        tool=QEMU_IMG,
        stderr=stderr,
        returncode=proc.returncode,
    )


def _json(stdout: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(stdout)
    except ValueError:
        raise ToolFailed(
            f"{QEMU_IMG} {what} printed output that is not JSON", tool=QEMU_IMG
        ) from None
    if not isinstance(data, dict):
        raise ToolFailed(f"{QEMU_IMG} {what} printed JSON that is not an object", tool=QEMU_IMG)
    return data


def _merge_options(defaults: dict[str, str], given: list[str]) -> str:
    merged = dict(defaults)
    for item in given:
        key, sep, value = item.partition("=")
        if not sep or not key or "," in item:
            raise InvalidRequest(f"output option {item!r} is not of the form key=value")
        merged[key] = value
    return ",".join(f"{k}={v}" for k, v in merged.items())
