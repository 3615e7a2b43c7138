"""Images for the formats tests: made with the real qemu-img, or crafted byte by byte."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from rain.model import DiskFormat

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
CAP = TiB  # max_virtual_size used by the tests

QEMU_NAME = {fmt: ("raw" if fmt is DiskFormat.ISO else str(fmt)) for fmt in DiskFormat}


def qemu_img(*args: str | Path) -> str:
    """Run qemu-img directly (test set-up only; rain itself goes through rain.formats.qemu)."""
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed")
    proc = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"qemu-img {args} failed: {proc.stderr}")
    return proc.stdout


def patch(path: Path, offset: int, data: bytes) -> None:
    """Overwrite bytes in place."""
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.fixture
def raw_image(tmp_path: Path) -> Path:
    """4 MiB raw disk: 1 MiB of pseudo-random data, a text block, zeros elsewhere."""
    path = tmp_path / "disk.raw"
    data = bytearray(4 * MiB)
    data[:MiB] = os.urandom(MiB)
    data[3 * MiB : 3 * MiB + 11] = b"hello world"
    # Keep the first bytes free of any format signature.
    data[:16] = b"\xeb\x63\x90rain-test-mbr"
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def make_image(tmp_path: Path, raw_image: Path) -> Callable[..., Path]:
    """make_image(fmt, *options) converts the raw test disk into `fmt` with qemu-img."""

    def make(fmt: DiskFormat, *options: str) -> Path:
        if fmt is DiskFormat.RAW:
            return raw_image
        if fmt is DiskFormat.ISO:
            return make_iso(tmp_path / "disc.iso")
        dst = tmp_path / f"disk-{'-'.join(options) or 'default'}.{fmt}"
        opts = ["-o", ",".join(options)] if options else []
        qemu_img("convert", "-f", "raw", "-O", str(fmt), *opts, raw_image, dst)
        return dst

    return make


def make_iso(path: Path, size: int = MiB) -> Path:
    """A minimal ISO 9660 image: an empty system area and a primary volume descriptor."""
    data = bytearray(size)
    data[0x8000:0x8007] = b"\x01CD001\x01"  # primary volume descriptor
    data[0x8800:0x8807] = b"\xffCD001\x01"  # volume descriptor set terminator
    path.write_bytes(bytes(data))
    return path
