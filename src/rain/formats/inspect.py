"""What the repository calls to accept, verify and convert disk images.

An upload is checked twice:

1. `inspect_header` on its first `HEADER_BYTES`, while it is still streaming:
   our own magic-byte detection, the declared format must agree, and the
   pure-Python header checks refuse references to other files, nonsense
   values and over-size disks before a byte more is stored. Raw content is
   also shown to qemu-img's prober right away (`verify_raw_header`), so a raw
   upload can go straight into the chunk store without a full local copy.
2. `inspect_file` on the complete file, for every non-raw format (and raw
   when a full copy exists): the header checks again with the whole file
   readable, then `qemu-img info` with the driver fixed to the detected
   format (run under `ToolLimits`) must agree with us, must not report
   backing/data/extent files, and `qemu-img check` must find no corruption.
3. Both times, oslo.utils' format inspector (Glance's) gives a second opinion
   that can refuse, never accept (`oslo_inspector.py`; see docs/formats.md).

Declared vs detected format:

- A declared format must match the content, with two exceptions. `raw`
  declared for an ISO 9660 image is accepted and stays `raw`: an ISO is a raw
  image of a disc, byte for byte, and the uploader's label says how they want
  it booted. The opposite (`iso` declared for content without an ISO 9660 /
  UDF volume descriptor) is refused.
- `vpc` declared for raw-looking content may be a *fixed* VHD, whose only
  signature is a footer in the last 512 bytes: `inspect_header` lets it
  through as `vpc` (so the repository spools the file) and `inspect_file`
  accepts it only if that footer is there.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rain.formats import qemu
from rain.formats.detect import HEADER_BYTES, detect_format
from rain.formats.headers import (
    SELF_CONTAINED,
    ImageBytes,
    check_header,
    check_virtual_size,
    fixed_vhd_size,
    printable,
    refuse_foreign,
)
from rain.formats.oslo_inspector import opinion_of, opinion_of_header, refuse_if_inspector_does
from rain.formats.tool import CONVERT_LIMITS, DEFAULT_LIMITS, ToolExitError, ToolLimits
from rain.model import DiskFormat
from rain.model.errors import InvalidImage

# Formats whose metadata `qemu-img check` can verify (vpc has no checker; raw/iso no metadata).
CHECKED_FORMATS = frozenset({DiskFormat.QCOW2, DiskFormat.VMDK, DiskFormat.VHDX, DiskFormat.VDI})

__all__ = [
    "CHECKED_FORMATS",
    "ImageInfo",
    "convert_file",
    "inspect_file",
    "inspect_header",
    "verify_raw_header",
]


@dataclass
class ImageInfo:
    """A verified image, as qemu-img describes it."""

    format: DiskFormat
    virtual_size: int  # bytes the guest sees
    actual_size: int | None  # bytes allocated on the host filesystem (qemu's actual-size)
    file_size: int | None = None  # length of the file
    cluster_size: int | None = None
    dirty: bool = False
    format_specific: dict[str, Any] = field(default_factory=dict)


def inspect_header(
    header: bytes,
    total_size: int | None,
    *,
    declared: DiskFormat | None,
    max_virtual_size: int,
    limits: ToolLimits = DEFAULT_LIMITS,
    second_opinion: bool = True,
) -> DiskFormat:
    """The format of an upload from its first bytes; refuses what is already known to be bad.

    `header` is the first `min(HEADER_BYTES, size)` bytes; `total_size` is the
    full upload size when known (enables truncation checks). Returns the
    format the image will be stored as. For raw and ISO content this also runs
    `verify_raw_header`, so no later qemu-img pass is needed for them.
    """
    if total_size is None and len(header) < HEADER_BYTES:
        total_size = len(header)  # the stream ended inside the header: this is all of it
    refuse_foreign(header)
    detected = detect_format(header)
    fmt = _reconcile(declared, detected, fixed_vhd=None)
    virtual = check_header(fmt, ImageBytes(header, total_size), max_virtual_size)
    if virtual is not None:
        check_virtual_size(fmt, virtual, max_virtual_size)
    if fmt in (DiskFormat.RAW, DiskFormat.ISO):
        verify_raw_header(header, limits=limits)
        if second_opinion:  # raw content is never spooled: this is the inspector's one look
            refuse_if_inspector_does(fmt, opinion_of_header(header), header)
    return fmt


def inspect_file(
    path: Path,
    *,
    declared: DiskFormat | None,
    max_virtual_size: int,
    limits: ToolLimits = DEFAULT_LIMITS,
    second_opinion: bool = True,
) -> ImageInfo:
    """Fully verify a complete image file and describe it; raises `InvalidImage` if unsafe.

    `second_opinion=False` leaves out oslo's format inspector (for comparing the two).
    """
    path = Path(path)
    with path.open("rb") as f:
        fd = f.fileno()
        total = os.fstat(fd).st_size
        header = os.pread(fd, HEADER_BYTES, 0)
        refuse_foreign(header)
        detected = detect_format(header)
        footer = os.pread(fd, 512, total - 512) if total >= 512 else b""
        fmt = _reconcile(declared, detected, fixed_vhd=fixed_vhd_size(footer) is not None)
        view = ImageBytes(header, total, lambda offset, n: os.pread(fd, n, offset))
        check_header(fmt, view, max_virtual_size)
        opinion = opinion_of(lambda offset, n: os.pread(fd, n, offset), total)

    try:
        data = qemu.info(path, fmt, limits)
    except ToolExitError as exc:
        raise InvalidImage(f"qemu-img cannot read the {fmt} image: {_reason(exc, path)}") from None
    info = _image_info(fmt, data, total)
    _refuse_references(fmt, data, path)
    check_virtual_size(fmt, info.virtual_size, max_virtual_size)

    if fmt in (DiskFormat.RAW, DiskFormat.ISO):
        _probe_is_raw(path, limits)
    if fmt in CHECKED_FORMATS:
        _check_metadata(path, fmt, total, info.cluster_size or 1, limits)
    if second_opinion:  # last: rain's own reasons, when it has one, are the clearer message
        refuse_if_inspector_does(fmt, opinion, header)
    return info


def verify_raw_header(header: bytes, *, limits: ToolLimits = DEFAULT_LIMITS) -> None:
    """Refuse raw content in which qemu-img's format prober recognises another format.

    Only the header is needed (qemu probes the first 2 KiB), so this lets a
    raw upload be cross-checked while it streams into the chunk store. It is
    the second opinion on rain's own detection: content that qemu would boot
    as qcow2 (or anything else) must never be stored as raw.
    """
    refuse_foreign(header)
    detected = detect_format(header)
    if detected not in (DiskFormat.RAW, DiskFormat.ISO):
        raise InvalidImage(f"the content is {detected}, not raw")
    with tempfile.TemporaryDirectory(prefix="rain-probe-") as tmp:
        probe = Path(tmp) / "header.img"  # not .dmg: qemu probes dmg by file name
        probe.write_bytes(header)
        _probe_is_raw(probe, limits)


def convert_file(
    src: Path,
    src_fmt: DiskFormat,
    dst: Path,
    dst_fmt: DiskFormat,
    limits: ToolLimits = CONVERT_LIMITS,
    *,
    compress: bool = False,
    options: list[str] | None = None,
) -> ImageInfo:
    """Convert a verified image (e.g. for a pull in another format) and describe the result.

    `src` must already have passed `inspect_file`; `dst` is rain's own output.
    """
    qemu.convert(src, src_fmt, dst, dst_fmt, limits, compress=compress, options=options)
    data = qemu.info(dst, dst_fmt, DEFAULT_LIMITS)
    return _image_info(dst_fmt, data, Path(dst).stat().st_size)


# --- helpers -----------------------------------------------------------------


def _reconcile(
    declared: DiskFormat | None, detected: DiskFormat, *, fixed_vhd: bool | None
) -> DiskFormat:
    """The format to store, given what the uploader said and what the bytes show.

    `fixed_vhd` is whether the file ends with a fixed-VHD footer (None: not known yet).
    """
    if declared is None or declared == detected:
        return detected
    if declared is DiskFormat.RAW and detected is DiskFormat.ISO:
        return DiskFormat.RAW
    if declared is DiskFormat.VPC and detected is DiskFormat.RAW and fixed_vhd is not False:
        return DiskFormat.VPC
    raise InvalidImage(f"declared disk_format '{declared}' but the content is {detected}")


def _image_info(fmt: DiskFormat, data: dict[str, Any], file_size: int) -> ImageInfo:
    expected = qemu.qemu_format(fmt)
    if data.get("format") != expected:
        raise InvalidImage(f"qemu-img reads the image as {data.get('format')}, not {expected}")
    virtual = data.get("virtual-size")
    if not isinstance(virtual, int) or virtual < 0:
        raise InvalidImage("qemu-img reports no valid virtual size")
    actual = data.get("actual-size")
    cluster = data.get("cluster-size")
    return ImageInfo(
        format=fmt,
        virtual_size=virtual,
        actual_size=actual if isinstance(actual, int) else None,
        file_size=file_size,
        cluster_size=cluster if isinstance(cluster, int) else None,
        dirty=bool(data.get("dirty-flag", False)),
        format_specific=_specific(data),
    )


def _specific(data: dict[str, Any]) -> dict[str, Any]:
    """qemu's `format-specific.data` object (empty when absent)."""
    outer = data.get("format-specific")
    inner = outer.get("data") if isinstance(outer, dict) else None
    return inner if isinstance(inner, dict) else {}


def _refuse_references(fmt: DiskFormat, data: dict[str, Any], path: Path) -> None:
    """Refuse what qemu-img says refers to other files (the header checks should have already)."""
    for key in ("backing-filename", "full-backing-filename"):
        if key in data:
            name = printable(str(data[key]).encode())
            raise InvalidImage(f"{fmt} image refers to a backing file ('{name}'); {SELF_CONTAINED}")
    specific = _specific(data)
    if "data-file" in specific:
        name = printable(str(specific["data-file"]).encode())
        raise InvalidImage(f"{fmt} image refers to a data file ('{name}'); {SELF_CONTAINED}")
    if specific.get("encrypted") or data.get("encrypted"):
        raise InvalidImage(f"{fmt} image is encrypted; encrypted images are not supported")
    if specific.get("corrupt"):
        raise InvalidImage(f"{fmt} image is marked corrupt")
    if fmt is DiskFormat.VMDK:
        extents = specific.get("extents", [])
        if not isinstance(extents, list) or len(extents) != 1:
            count = len(extents) if isinstance(extents, list) else "?"
            raise InvalidImage(f"vmdk image has {count} extents; {SELF_CONTAINED}")
        own = os.path.abspath(path)
        name = str(extents[0].get("filename", "")) if isinstance(extents[0], dict) else ""
        if name != own:
            shown = printable(name.encode())
            raise InvalidImage(f"vmdk image refers to an extent file ('{shown}'); {SELF_CONTAINED}")


def _probe_is_raw(path: Path, limits: ToolLimits) -> None:
    """qemu-img's own guess of the format (no -f) must be raw."""
    try:
        probed = qemu.info(path, None, limits).get("format")
    except ToolExitError as exc:
        # Raw always opens; failing to open means qemu recognised something else.
        raise InvalidImage(
            f"qemu-img does not read the content as raw: {_reason(exc, path)}"
        ) from None
    if probed != "raw":
        raise InvalidImage(f"the content is {probed} according to qemu-img, not raw")


def _check_metadata(path: Path, fmt: DiskFormat, total: int, cluster_size: int,
                    limits: ToolLimits) -> None:
    try:
        report = qemu.check(path, fmt, limits)
    except ToolExitError as exc:
        reason = _reason(exc, path)
        problem = "is truncated" if _PAST_EOF.search(reason) else "failed its check"
        raise InvalidImage(f"{fmt} image {problem}: {reason}") from None
    end = report.get("image-end-offset")
    # qemu-img writes a last metadata cluster only as far as its contents go (a blank
    # 16M qcow2 ends 8 bytes into its L1 cluster) and reads the rest as zeros, so the
    # end offset, a multiple of the cluster size, may lie up to a cluster past EOF.
    if isinstance(end, int) and end > -(-total // cluster_size) * cluster_size:
        raise InvalidImage(
            f"{fmt} image is truncated: its data needs {end} bytes but the file has {total}"
        )
    if any(_PAST_EOF.search(line) for line in report.get("errors", [])):
        raise InvalidImage(f"{fmt} image is truncated: it refers to data past the end of the file")
    corruptions = int(report.get("corruptions", 0))
    if corruptions:
        raise InvalidImage(f"{fmt} image is corrupt: {corruptions} errors")
    check_errors = int(report.get("check-errors", 0))
    if check_errors:
        raise InvalidImage(f"{fmt} image could not be checked: {check_errors} errors")
    # Leaked clusters only waste space in the image; they are accepted.


_PAST_EOF = re.compile(r"after EOF|past the end|end of the file|beyond the end", re.IGNORECASE)
_OPEN_PREFIX = re.compile(r"^(qemu-img: )?(Could not open '[^']*': )+")


def _reason(exc: ToolExitError, path: Path) -> str:
    """qemu-img's complaint on one line, without our temporary path names."""
    lines = [line.strip() for line in exc.stderr.splitlines() if line.strip()]
    # `qemu-img check` ends with a generic "Check failed"; its ERROR lines say why.
    errors = [line for line in lines if line.startswith("ERROR")]
    text = errors[-1].removeprefix("ERROR").lstrip(": ") if errors else ""
    text = text or (lines[-1] if lines else f"exit status {exc.returncode}")
    text = _OPEN_PREFIX.sub("", text).removeprefix("qemu-img: ")
    text = text.replace(os.path.abspath(path), path.name).replace(str(path), path.name)
    return printable(text.encode(), limit=300)
