"""detect_format: magic bytes only, never names or declarations."""

from __future__ import annotations

import struct

import pytest

from rain.formats.detect import (
    HEADER_BYTES,
    ISO_MAGIC_OFFSET,
    detect_format,
    foreign_format,
    is_vmdk_descriptor,
)
from rain.model import DiskFormat


def at(offset: int, data: bytes, size: int = 64 * 1024) -> bytes:
    buf = bytearray(size)
    buf[offset : offset + len(data)] = data
    return bytes(buf)


VDI_HEAD = (
    b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(0x40, b"\0")
    + struct.pack("<I", 0xBEDA107F)
    + bytes(1024)
)


@pytest.mark.parametrize(
    ("header", "fmt"),
    [
        (at(0, b"QFI\xfb\x00\x00\x00\x03"), DiskFormat.QCOW2),
        (at(0, b"KDMV\x01\x00\x00\x00"), DiskFormat.VMDK),
        (b"# Disk DescriptorFile\nversion=1\n", DiskFormat.VMDK),
        (b"# comment\n\n   \nversion=1\nCID=fffffffe\n", DiskFormat.VMDK),
        (b'version=3\r\ncreateType="monolithicFlat"\r\n', DiskFormat.VMDK),
        (at(0, b"conectix"), DiskFormat.VPC),
        (at(0, b"vhdxfile"), DiskFormat.VHDX),
        (VDI_HEAD, DiskFormat.VDI),
        (at(ISO_MAGIC_OFFSET, b"CD001"), DiskFormat.ISO),
        (at(ISO_MAGIC_OFFSET, b"BEA01"), DiskFormat.ISO),
        (bytes(64 * 1024), DiskFormat.RAW),
        (b"", DiskFormat.RAW),
        (b"#!/bin/bash\necho not a descriptor\n", DiskFormat.RAW),
        (at(1, b"QFI\xfb"), DiskFormat.RAW),  # magic must be at offset 0
    ],
)
def test_detects_by_magic(header: bytes, fmt: DiskFormat) -> None:
    assert detect_format(header) == fmt


def test_header_bytes_covers_iso_descriptor() -> None:
    assert HEADER_BYTES >= ISO_MAGIC_OFFSET + 5


def test_magic_at_offset_zero_wins_over_iso() -> None:
    header = bytearray(at(ISO_MAGIC_OFFSET, b"CD001"))
    header[:4] = b"QFI\xfb"
    assert detect_format(bytes(header)) == DiskFormat.QCOW2


def test_vmdk_descriptor_rule_follows_qemu() -> None:
    assert is_vmdk_descriptor(b"\n\n# x\nversion=2\n")
    assert not is_vmdk_descriptor(b"hello\nversion=1\n")
    assert not is_vmdk_descriptor(bytes(4096))


@pytest.mark.parametrize(
    ("header", "name"),
    [
        (b"QED\x00" + bytes(60), "QED"),
        (b"LUKS\xba\xbe" + bytes(60), "LUKS"),
        (b"WithoutFreeSpace" + bytes(60), "Parallels"),
        (b"QFI\xfb\x00\x00\x00\x01" + bytes(60), "qcow (version 1)"),
        (b"COWD" + bytes(60), "COWD"),
    ],
)
def test_names_formats_rain_does_not_accept(header: bytes, name: str) -> None:
    found = foreign_format(header)
    assert found is not None and name in found


def test_plain_data_is_not_foreign() -> None:
    assert foreign_format(bytes(4096)) is None
    assert foreign_format(b"QFI\xfb\x00\x00\x00\x03") is None
