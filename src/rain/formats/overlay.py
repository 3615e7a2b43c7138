"""Instance disks: copy-on-write overlays over a cached image, full copies, ephemeral disks.

Only for files rain made or verified itself (the node cache admits an image
only after its SHA-256 matches the repository's), so these never inspect
untrusted headers beyond reading a virtual size.
"""

from __future__ import annotations

import os
from pathlib import Path

from rain.formats import qemu
from rain.formats.tool import CONVERT_LIMITS, ToolLimits
from rain.model import DiskFormat
from rain.model.errors import InvalidRequest

# qcow2 header: magic at 0, big-endian u64 virtual size at 24.
_QCOW2_MAGIC = b"QFI\xfb"
_QCOW2_SIZE_END = 32


def virtual_size(path: Path, fmt: DiskFormat) -> int:
    """The guest-visible size of a disk: a raw file's length, else what qemu-img reports.

    Raw and qcow2 (the node cache's usual formats) need no tool run: a
    `qemu-img info` costs about as much as creating the overlay itself.
    """
    if fmt in (DiskFormat.RAW, DiskFormat.ISO):
        return os.stat(path).st_size
    if fmt is DiskFormat.QCOW2:
        with open(path, "rb") as f:
            header = f.read(_QCOW2_SIZE_END)
        if len(header) == _QCOW2_SIZE_END and header[:4] == _QCOW2_MAGIC:
            return int.from_bytes(header[24:_QCOW2_SIZE_END], "big")
    return int(qemu.info(path, fmt)["virtual-size"])


def create_overlay(
    backing: Path, backing_format: DiskFormat, out: Path, *, size: int | None = None
) -> int:
    """Create qcow2 overlay `out` over `backing` and return its virtual size.

    The backing format is always explicit (`-F`) and its path absolute (see
    `qemu.create_overlay`). `size` may only grow the disk: a smaller size would
    cut off the end of the backing image's data under the guest.
    """
    base = virtual_size(backing, backing_format)
    if size is not None and size < base:
        raise InvalidRequest(
            f"disk size {size} is smaller than the image's virtual size {base}: disks only grow"
        )
    qemu.create_overlay(backing, backing_format, out, size)
    return base if size is None else size


def create_copy(
    src: Path,
    fmt: DiskFormat,
    out: Path,
    *,
    size: int | None = None,
    limits: ToolLimits = CONVERT_LIMITS,
) -> int:
    """Write a standalone copy of `src` to `out` in the same format and return its virtual size.

    The baseline an overlay is measured against (a full copy per instance);
    `qemu-img convert` skips zero blocks, so a raw copy stays sparse.
    """
    base = virtual_size(src, fmt)
    if size is not None and size < base:
        raise InvalidRequest(
            f"disk size {size} is smaller than the image's virtual size {base}: disks only grow"
        )
    out_fmt = DiskFormat.RAW if fmt is DiskFormat.ISO else fmt
    qemu.convert(src, fmt, out, out_fmt, limits)
    if size is not None and size > base:
        qemu.resize(out, out_fmt, size)
    return base if size is None else size


def create_ephemeral(out: Path, size: int) -> None:
    """Create `out` as a sparse raw file of `size` bytes (scratch space: no bytes written).

    Refuses to overwrite an existing file, so a mistaken path never clobbers a disk.
    """
    if size <= 0:
        raise InvalidRequest(f"ephemeral disk size must be positive, not {size}")
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
