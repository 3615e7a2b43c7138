"""The corpus of images people actually have, made at test time by the real qemu-img.

Each `Case` builds one image into a directory: `qemu-img create` (blank disks,
which is what most people start from) and `qemu-img convert` (disks with data)
over qcow2's option space — sizes, cluster sizes 512 B … 2 MiB, zlib and zstd
compression, preallocation modes, extended L2, lazy refcounts, refcount widths,
compat 0.10 (v2) and 1.1 (v3) — and the other formats qemu-img writes.
No binary image is committed: the corpus is whatever this host's qemu-img makes.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rain.model import DiskFormat

from .conftest import MiB, make_iso, qemu_img


@dataclass(frozen=True)
class Case:
    name: str
    fmt: DiskFormat
    build: Callable[[Path], Path]

    def __str__(self) -> str:
        return self.name


def data_disk(directory: Path, size: int = 8 * MiB) -> Path:
    """A raw disk with data worth compressing, random data, an MBR-free start and zeros."""
    path = directory / "source.raw"
    if path.exists():
        return path
    data = bytearray(size)
    data[MiB : 2 * MiB] = os.urandom(MiB)
    data[3 * MiB : 5 * MiB] = b"rain test data, compressible " * (2 * MiB // 29) + b"x" * (
        2 * MiB % 29
    )
    data[size - 4096 :] = os.urandom(4096)  # the last cluster holds data too
    path.write_bytes(bytes(data))
    return path


def created(fmt: str, size: str, *options: str) -> Callable[[Path], Path]:
    def build(directory: Path) -> Path:
        path = directory / f"created.{fmt}"
        opts = ["-o", ",".join(options)] if options else []
        qemu_img("create", "-f", fmt, *opts, path, size)
        return path

    return build


def converted(fmt: str, *options: str, compress: bool = False) -> Callable[[Path], Path]:
    def build(directory: Path) -> Path:
        path = directory / f"converted.{fmt}"
        opts = ["-o", ",".join(options)] if options else []
        qemu_img("convert", "-f", "raw", "-O", fmt, *(["-c"] if compress else []), *opts,
                 data_disk(directory), path)
        return path

    return build


def raw(directory: Path) -> Path:
    return data_disk(directory)


def iso(directory: Path) -> Path:
    return make_iso(directory / "disc.iso", 2 * MiB)


def hybrid_iso(directory: Path) -> Path:
    """An ISO that is also an MBR disk (as isohybrid makes installer images)."""
    path = iso(directory)
    with path.open("r+b") as f:
        f.seek(446)
        f.write(struct.pack("<B3BB3BII", 0x80, 0, 1, 0, 0x17, 0, 0, 0, 0, 4096))
        f.seek(510)
        f.write(b"\x55\xaa")
    return path


Q = DiskFormat.QCOW2
GOOD: list[Case] = [
    # The issue's own example, and blank disks of other sizes.
    Case("qcow2-create-16M", Q, created("qcow2", "16M")),
    Case("qcow2-create-1M", Q, created("qcow2", "1M")),
    Case("qcow2-create-1000000B", Q, created("qcow2", "1000000")),
    Case("qcow2-create-1G", Q, created("qcow2", "1G")),
    Case("qcow2-create-100G", Q, created("qcow2", "100G")),
    Case("qcow2-create-1T", Q, created("qcow2", "1T")),  # the default cap, exactly
    *(Case(f"qcow2-create-cluster-{c}", Q, created("qcow2", "64M", f"cluster_size={c}"))
      for c in ("512", "4k", "16k", "64k", "256k", "1M", "2M")),
    Case("qcow2-create-v2", Q, created("qcow2", "16M", "compat=0.10")),
    Case("qcow2-create-v2-cluster-2M", Q, created("qcow2", "16M", "compat=0.10",
                                                  "cluster_size=2M")),
    Case("qcow2-create-zstd", Q, created("qcow2", "16M", "compression_type=zstd")),
    *(Case(f"qcow2-create-prealloc-{p}", Q, created("qcow2", "16M", f"preallocation={p}"))
      for p in ("metadata", "falloc", "full")),
    Case("qcow2-create-extended-l2", Q, created("qcow2", "16M", "extended_l2=on")),
    Case("qcow2-create-extended-l2-2M", Q, created("qcow2", "64M", "extended_l2=on",
                                                   "cluster_size=2M")),
    Case("qcow2-create-lazy-refcounts", Q, created("qcow2", "16M", "lazy_refcounts=on")),
    *(Case(f"qcow2-create-refcount-bits-{b}", Q, created("qcow2", "16M", f"refcount_bits={b}"))
      for b in ("1", "8", "64")),
    Case("qcow2-convert", Q, converted("qcow2")),
    Case("qcow2-convert-v2", Q, converted("qcow2", "compat=0.10")),
    *(Case(f"qcow2-convert-cluster-{c}", Q, converted("qcow2", f"cluster_size={c}"))
      for c in ("512", "4k", "2M")),
    Case("qcow2-convert-zlib-compressed", Q, converted("qcow2", compress=True)),
    Case("qcow2-convert-zstd-compressed", Q, converted("qcow2", "compression_type=zstd",
                                                       compress=True)),
    Case("qcow2-convert-compressed-cluster-4k", Q, converted("qcow2", "cluster_size=4k",
                                                             compress=True)),
    Case("qcow2-convert-v2-compressed", Q, converted("qcow2", "compat=0.10", compress=True)),
    Case("qcow2-convert-extended-l2", Q, converted("qcow2", "extended_l2=on")),
    Case("qcow2-convert-prealloc-metadata", Q, converted("qcow2", "preallocation=metadata")),
    Case("qcow2-convert-refcount-bits-1", Q, converted("qcow2", "refcount_bits=1")),
    Case("vmdk-create", DiskFormat.VMDK, created("vmdk", "64M")),
    Case("vmdk-convert-monolithicSparse", DiskFormat.VMDK, converted("vmdk")),
    Case("vmdk-convert-streamOptimized", DiskFormat.VMDK,
         converted("vmdk", "subformat=streamOptimized")),
    Case("vhdx-create", DiskFormat.VHDX, created("vhdx", "64M")),
    Case("vhdx-convert", DiskFormat.VHDX, converted("vhdx")),
    Case("vhdx-convert-fixed", DiskFormat.VHDX, converted("vhdx", "subformat=fixed")),
    Case("vpc-create", DiskFormat.VPC, created("vpc", "64M")),
    Case("vpc-convert", DiskFormat.VPC, converted("vpc")),
    Case("vdi-create", DiskFormat.VDI, created("vdi", "64M")),
    Case("vdi-convert", DiskFormat.VDI, converted("vdi")),
    Case("vdi-convert-static", DiskFormat.VDI, converted("vdi", "static=on")),
    Case("raw", DiskFormat.RAW, raw),
    Case("raw-create", DiskFormat.RAW, created("raw", "16M")),
    Case("iso", DiskFormat.ISO, iso),
    Case("iso-hybrid-mbr", DiskFormat.ISO, hybrid_iso),
]
