"""Hostile images: what CVE-2024-32498 and the oslo inspector's safety checks are about.

Each builder writes one file (made by the real qemu-img where it can, then
patched byte by byte) and returns it with the format the attacker declares.
The families: references to other files (backing, external data file, VMDK
extents and flat descriptors naming /etc/passwd, differencing disks), tables
that buy work or memory (huge L1, huge size), truncation, polyglots (a file
that is two formats: raw declared over a qcow2 header, an ISO with a qcow2 or
VMDK descriptor in its system area, an MBR disk whose boot code is another
format's header), formats rain does not take (QED, LUKS, qcow v1, encrypted
qcow2), and VHDX region-table tricks.
"""

from __future__ import annotations

import struct
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rain.model import DiskFormat

from .conftest import MiB, make_iso, patch, qemu_img
from .corpus import data_disk


@dataclass(frozen=True)
class Hostile:
    name: str
    declared: DiskFormat | None
    build: Callable[[Path], Path]

    def __str__(self) -> str:
        return self.name


def _qcow2(directory: Path, *options: str, size: str = "16M") -> Path:
    path = directory / "image.qcow2"
    qemu_img("create", "-f", "qcow2", *(["-o", ",".join(options)] if options else []),
             path, size)
    return path


def patched(build: Callable[[Path], Path], *patches: tuple[int, bytes]) -> Callable[[Path], Path]:
    """A builder: what `build` makes, with bytes overwritten at the given offsets."""

    def make(d: Path) -> Path:
        path = build(d)
        for offset, data in patches:
            patch(path, offset, data)
        return path

    return make


def backing_passwd(d: Path) -> Path:
    path = _qcow2(d, "backing_file=/etc/passwd", "backing_fmt=raw")
    return path


def backing_qcow2(d: Path) -> Path:
    base = _qcow2(d)
    top = d / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    return top


def data_file(d: Path) -> Path:
    return _qcow2(d, f"data_file={d / 'data.raw'}")


def data_file_passwd(d: Path) -> Path:
    """An external data file (incompatible bit 2 and the extension) renamed to /etc/passwd."""
    path = data_file(d)
    raw = path.read_bytes()
    at = raw.index(str(d / "data.raw").encode())
    name = b"/etc/passwd".ljust(len(str(d / "data.raw")), b"\0")
    patch(path, at, name)
    return path


def data_file_extension_only(d: Path) -> Path:
    """The data-file name extension without the incompatible bit (qemu ignores the name)."""
    path = data_file_passwd(d)
    raw = bytearray(path.read_bytes())
    (incompatible,) = struct.unpack_from(">Q", raw, 72)
    patch(path, 72, struct.pack(">Q", incompatible & ~(1 << 2)))
    return path


def truncated_qcow2(d: Path) -> Path:
    src = data_disk(d)
    path = d / "t.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", src, path)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)
    return path


def encrypted_qcow2(d: Path) -> Path:
    path = d / "enc.qcow2"
    qemu_img("create", "--object", "secret,id=s0,data=hunter2", "-f", "qcow2", "-o",
             "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", path, "16M")
    return path


def raw_with_qcow2_header(d: Path) -> Path:
    """'raw' declared, but it starts with a qcow2 header: qemu would open it as qcow2."""
    path = backing_passwd(d)
    content = path.read_bytes() + bytes(4 * MiB)
    out = d / "disk.raw"
    out.write_bytes(content)
    return out


def iso_with_qcow2(d: Path) -> Path:
    """A qcow2 header in the ISO's system area (its first 32 KiB): a polyglot."""
    iso = make_iso(d / "disc.iso", 2 * MiB)
    header = _qcow2(d).read_bytes()[:512]
    patch(iso, 0, header)
    return iso


def iso_with_backing_qcow2(d: Path) -> Path:
    iso = make_iso(d / "disc.iso", 2 * MiB)
    patch(iso, 0, backing_passwd(d).read_bytes()[:1024])
    return iso


def iso_with_qcow2_deep(d: Path) -> Path:
    """A qcow2 image inside the ISO at 1 MiB: qemu probes only offset 0, so it is data."""
    iso = make_iso(d / "disc.iso", 4 * MiB)
    patch(iso, MiB, backing_passwd(d).read_bytes())
    return iso


def iso_with_vmdk_descriptor(d: Path) -> Path:
    iso = make_iso(d / "disc.iso", 2 * MiB)
    patch(iso, 0, VMDK_FLAT_PASSWD)
    return iso


VMDK_FLAT_PASSWD = (
    b"# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
    b'createType="monolithicFlat"\n\n# Extent description\n'
    b'RW 2048 FLAT "/etc/passwd" 0\n\nddb.virtualHWVersion = "4"\n'
)


def vmdk_flat_passwd(d: Path) -> Path:
    path = d / "disk.vmdk"
    path.write_bytes(VMDK_FLAT_PASSWD)
    return path


def vmdk_flat_relative(d: Path) -> Path:
    """A descriptor naming a file beside it (no '/': the inspector's extent rule passes it)."""
    path = d / "disk.vmdk"
    (d / "passwd").write_bytes(b"root:x:0:0::/root:/bin/sh\n".ljust(512 * 2048, b"\0"))
    path.write_bytes(VMDK_FLAT_PASSWD.replace(b"/etc/passwd", b"passwd").replace(
        b"monolithicFlat", b"monolithicSparse"))
    return path


def vmdk_version_line(d: Path) -> Path:
    """qemu's own descriptor probe: comment lines, then `version=1`."""
    path = d / "disk.vmdk"
    path.write_bytes(b"# a comment\n\n" + VMDK_FLAT_PASSWD.split(b"\n", 1)[1])
    return path


def vmdk_two_gb_extents(d: Path) -> Path:
    path = d / "split.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", path, "64M")
    return path


def vmdk_monolithic_flat(d: Path) -> Path:
    path = d / "flat.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", "subformat=monolithicFlat", path, "16M")
    return path


def _sparse_vmdk(d: Path, *options: str) -> Path:
    path = d / "sparse.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", *(["-o", ",".join(options)] if options
                                                        else []), data_disk(d), path)
    return path


def _embedded_descriptor(path: Path) -> tuple[int, bytes]:
    raw = path.read_bytes()
    desc_offset, desc_size = struct.unpack_from("<QQ", raw, 28)
    return desc_offset * 512, raw[desc_offset * 512 : (desc_offset + desc_size) * 512]


def vmdk_embedded_extent_passwd(d: Path) -> Path:
    """A monolithicSparse whose embedded descriptor adds a flat extent on /etc/passwd."""
    path = _sparse_vmdk(d)
    at, text = _embedded_descriptor(path)
    body = text.split(b"\0", 1)[0]
    body = body.replace(b"# The Disk Data Base", b'RW 2048 FLAT "/etc/passwd" 0\n'
                        b"# The Disk Data Base")
    patch(path, at, body.ljust(len(text), b"\0")[: len(text)])
    return path


def vmdk_zero_capacity(d: Path) -> Path:
    """Capacity 0 makes qemu ignore the sparse extent and open what the descriptor names."""
    path = _sparse_vmdk(d)
    patch(path, 12, struct.pack("<Q", 0))
    return path


def vmdk_parent(d: Path) -> Path:
    path = _sparse_vmdk(d)
    at, text = _embedded_descriptor(path)
    body = text.split(b"\0", 1)[0].replace(b"parentCID=ffffffff",
                                           b'parentCID=12345678\nparentFileNameHint="/etc/passwd"')
    patch(path, at, body.ljust(len(text), b"\0")[: len(text)])
    return path


def _stream_vmdk(d: Path) -> Path:
    return _sparse_vmdk(d, "subformat=streamOptimized")


def vmdk_footer_elsewhere(d: Path) -> Path:
    """Grain directory "at end" and a footer whose header names another descriptor."""
    path = _stream_vmdk(d)
    raw = path.read_bytes()
    header = bytearray(raw[:512])
    patch(path, 56, struct.pack("<Q", 0xFFFFFFFFFFFFFFFF))  # gd_offset: see the footer
    footer = bytearray(header)
    footer[28:44] = struct.pack("<QQ", 2, 1)  # descriptor: one sector at sector 2
    marker = struct.pack("<QII", 1, 0, 3).ljust(512, b"\0")  # footer marker
    with path.open("ab") as f:
        f.write(marker + bytes(footer) + bytes(512))  # + end-of-stream marker
    return path


def mbr_gap_with_magic(d: Path) -> Path:
    """A raw MBR disk with qcow2 and VMDK magic in the gap before the first partition."""
    path = d / "disk.raw"
    path.write_bytes(bytes(4 * MiB))
    patch(path, 446, struct.pack("<B3BB3BII", 0x80, 0, 2, 0, 0x83, 0, 0, 0, 2048, 6144))
    patch(path, 510, b"\x55\xaa")
    patch(path, 512, backing_passwd(d).read_bytes()[:1024])
    patch(path, 4096, VMDK_FLAT_PASSWD)
    return path


def gpt_partition_with_qcow2(d: Path) -> Path:
    """A GPT disk whose first partition holds a qcow2 image with a backing file."""
    path = d / "disk.raw"
    path.write_bytes(bytes(8 * MiB))
    subprocess.run(["sfdisk", "--quiet", str(path)], input=b"label: gpt\n,4M\n", check=True,
                   capture_output=True)
    patch(path, MiB, backing_passwd(d).read_bytes())
    return path


def mbr_without_partitions(d: Path) -> Path:
    """Only an MBR signature (boot code, no partitions): harmless, and the inspector refuses."""
    path = d / "disk.raw"
    path.write_bytes(bytes(4 * MiB))
    patch(path, 0, b"\xeb\x63\x90rain-boot-code")
    patch(path, 510, b"\x55\xaa")
    return path


def _create(d: Path, fmt: str, *args: str, size: str = "16M") -> Path:
    """`qemu-img create [args] -f fmt disk.fmt size`."""
    path = d / f"disk.{fmt}"
    qemu_img("create", *args, "-f", fmt, path, size)
    return path


def _vhdx(d: Path) -> Path:
    return _create(d, "vhdx", size="64M")


def vhdx_parent_locator(d: Path) -> Path:
    """The metadata table's virtual-disk-size entry renamed to a parent locator."""
    path = _vhdx(d)
    raw = path.read_bytes()
    vds = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8").bytes_le
    parent = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C").bytes_le
    at = raw.index(vds, 256 * 1024)
    patch(path, at, parent)
    return path


def vhdx_too_many_regions(d: Path) -> Path:
    path = _vhdx(d)
    for table in (192 * 1024, 256 * 1024):
        patch(path, table + 8, struct.pack("<I", 5000))
    return path


def _vhdx_metadata_entries(path: Path) -> list[int]:
    """Where the metadata region's entry is in each of the two region tables."""
    raw = path.read_bytes()
    meta = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
    return [raw.index(meta, table) for table in (192 * 1024, 256 * 1024)]


def vhdx_region_past_eof(d: Path) -> Path:
    """The metadata region's offset moved far past the end of the file."""
    path = _vhdx(d)
    for at in _vhdx_metadata_entries(path):
        patch(path, at + 16, struct.pack("<Q", 1 << 40))
    return path


def vhdx_unknown_required_region(d: Path) -> Path:
    path = _vhdx(d)
    for at in _vhdx_metadata_entries(path):
        patch(path, at, uuid.uuid4().bytes_le)
        patch(path, at + 28, struct.pack("<I", 1))
    return path


def qed(d: Path) -> Path:
    return _create(d, "qed")


def qcow1(d: Path) -> Path:
    return _create(d, "qcow")


def luks(d: Path) -> Path:
    return _create(d, "luks", "--object", "secret,id=s0,data=hunter2", "-o",
                   "key-secret=s0,iter-time=10")


Q, V = DiskFormat.QCOW2, DiskFormat.VMDK
HOSTILE: list[Hostile] = [
    Hostile("qcow2-backing-file-/etc/passwd", Q, backing_passwd),
    Hostile("qcow2-backing-qcow2", Q, backing_qcow2),
    Hostile("qcow2-external-data-file", Q, data_file),
    Hostile("qcow2-external-data-file-/etc/passwd", Q, data_file_passwd),
    Hostile("qcow2-data-file-name-without-feature-bit", Q, data_file_extension_only),
    Hostile("qcow2-huge-l1-table", Q,  # l1_size: 2 GiB of L1 table
            patched(_qcow2, (36, struct.pack(">I", 0x10000000)))),
    Hostile("qcow2-virtual-size-2^60", Q, patched(_qcow2, (24, struct.pack(">Q", 1 << 60)))),
    Hostile("qcow2-unknown-incompatible-feature", Q,
            patched(_qcow2, (72, struct.pack(">Q", 1 << 10)))),
    Hostile("qcow2-truncated", Q, truncated_qcow2),
    Hostile("qcow2-encrypted-luks", Q, encrypted_qcow2),
    Hostile("raw-declared-starts-with-qcow2", DiskFormat.RAW, raw_with_qcow2_header),
    Hostile("raw-undeclared-starts-with-qcow2", None, raw_with_qcow2_header),
    Hostile("iso-with-qcow2-in-system-area", DiskFormat.ISO, iso_with_qcow2),
    Hostile("iso-undeclared-with-qcow2-in-system-area", None, iso_with_qcow2),
    Hostile("iso-with-backing-qcow2-in-system-area", DiskFormat.ISO, iso_with_backing_qcow2),
    Hostile("iso-with-qcow2-at-1MiB", DiskFormat.ISO, iso_with_qcow2_deep),
    Hostile("iso-with-vmdk-descriptor-in-system-area", DiskFormat.ISO,
            iso_with_vmdk_descriptor),
    Hostile("vmdk-flat-descriptor-/etc/passwd", V, vmdk_flat_passwd),
    Hostile("vmdk-descriptor-relative-extent", V, vmdk_flat_relative),
    Hostile("vmdk-descriptor-after-comments", V, vmdk_version_line),
    Hostile("vmdk-descriptor-declared-raw", DiskFormat.RAW, vmdk_flat_passwd),
    Hostile("vmdk-twoGbMaxExtentSparse", V, vmdk_two_gb_extents),
    Hostile("vmdk-monolithicFlat", V, vmdk_monolithic_flat),
    Hostile("vmdk-embedded-extent-/etc/passwd", V, vmdk_embedded_extent_passwd),
    Hostile("vmdk-zero-capacity", V, vmdk_zero_capacity),
    Hostile("vmdk-parent", V, vmdk_parent),
    Hostile("vmdk-footer-names-another-descriptor", V, vmdk_footer_elsewhere),
    Hostile("vmdk-gd-at-end-without-footer", V,
            patched(_stream_vmdk, (56, struct.pack("<Q", 0xFFFFFFFFFFFFFFFF)))),
    Hostile("mbr-boot-code-is-qcow2", Q,  # a qcow2 header as boot code, a partition, 0x55AA
            patched(_qcow2, (446, struct.pack("<B3BB3BII", 0, 0, 2, 0, 0x83, 0, 0, 0, 2048, 8192)),
                    (510, b"\x55\xaa"))),
    Hostile("mbr-gap-with-qcow2-and-vmdk-magic", DiskFormat.RAW, mbr_gap_with_magic),
    Hostile("gpt-partition-holding-backing-qcow2", DiskFormat.RAW, gpt_partition_with_qcow2),
    Hostile("mbr-without-partitions", DiskFormat.RAW, mbr_without_partitions),
    Hostile("vpc-differencing", DiskFormat.VPC,
            patched(lambda d: _create(d, "vpc"), (60, struct.pack(">I", 4)))),
    Hostile("vdi-differencing", DiskFormat.VDI,  # a parent UUID
            patched(lambda d: _create(d, "vdi"), (0x1B8, uuid.uuid4().bytes))),
    Hostile("vhdx-parent-locator", DiskFormat.VHDX, vhdx_parent_locator),
    Hostile("vhdx-5000-regions", DiskFormat.VHDX, vhdx_too_many_regions),
    Hostile("vhdx-metadata-region-past-eof", DiskFormat.VHDX, vhdx_region_past_eof),
    Hostile("vhdx-unknown-required-region", DiskFormat.VHDX, vhdx_unknown_required_region),
    Hostile("qed", None, qed),
    Hostile("qcow-v1", None, qcow1),
    Hostile("luks", None, luks),
]
