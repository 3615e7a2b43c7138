"""Header checks on crafted bytes: refusals happen before qemu-img sees anything."""

from __future__ import annotations

import struct

import pytest

from rain.formats import inspect_header
from rain.formats.headers import ImageBytes, check_vmdk_descriptor
from rain.model import DiskFormat
from rain.model.errors import InvalidImage

from .conftest import CAP, MiB, TiB

CLUSTER = 64 * 1024


def qcow2(
    size: int = 4 * MiB,
    *,
    version: int = 3,
    cluster_bits: int = 16,
    backing: bytes = b"",
    incompatible: int = 0,
    crypt: int = 0,
    l1_size: int | None = None,
    l1_offset: int = 3 * CLUSTER,
    refcount_offset: int = CLUSTER,
    extensions: bytes = b"",
    length: int = 4 * CLUSTER,
) -> bytes:
    """A qcow2 image's first clusters, laid out like qemu-img does."""
    if l1_size is None:
        per_l1 = (1 << cluster_bits) * ((1 << cluster_bits) // 8)
        l1_size = max(1, -(-size // per_l1))
    header_length = 112
    backing_offset = header_length + len(extensions) + 8 if backing else 0
    head = struct.pack(
        ">4sIQIIQIIQQIIQ",
        b"QFI\xfb",
        version,
        backing_offset,
        len(backing),
        cluster_bits,
        size,
        crypt,
        l1_size,
        l1_offset,
        refcount_offset,
        1,
        0,
        0,
    )
    if version == 3:
        head += struct.pack(">QQQII", incompatible, 0, 0, 4, header_length)
        head = head.ljust(header_length, b"\0")
    head += extensions + bytes(8) + backing  # extensions end with a zero header
    return head.ljust(length, b"\0")


def refused(
    header: bytes,
    phrase: str,
    *,
    total: int | None = None,
    declared: DiskFormat | None = None,
    cap: int = CAP,
) -> None:
    with pytest.raises(InvalidImage) as err:
        inspect_header(
            header, len(header) if total is None else total, declared=declared, max_virtual_size=cap
        )
    assert phrase in err.value.message
    assert "\n" not in err.value.message


def test_plain_qcow2_header_passes() -> None:
    assert (
        inspect_header(qcow2(), 4 * CLUSTER, declared=None, max_virtual_size=CAP)
        == DiskFormat.QCOW2
    )


def test_qcow2_backing_file_refused_with_its_name() -> None:
    refused(
        qcow2(backing=b"/etc/passwd"),
        "qcow2 image refers to a backing file ('/etc/passwd'); images must be self-contained",
    )


def test_qcow2_external_data_file_bit_refused() -> None:
    refused(qcow2(incompatible=1 << 2), "uses an external data file")


def test_qcow2_data_file_name_extension_refused() -> None:
    name = b"/dev/sda"
    ext = struct.pack(">II", 0x44415441, len(name)) + name.ljust(8, b"\0")
    refused(qcow2(extensions=ext), "refers to a data file ('/dev/sda')")


def test_qcow2_unknown_incompatible_features_refused() -> None:
    refused(qcow2(incompatible=1 << 40), "unknown incompatible features (0x10000000000)")


def test_qcow2_marked_corrupt_refused() -> None:
    refused(qcow2(incompatible=1 << 1), "marked corrupt")


def test_qcow2_encrypted_refused() -> None:
    refused(qcow2(crypt=2), "encrypted")


@pytest.mark.parametrize("bits", [8, 22, 40])
def test_qcow2_cluster_bits_out_of_range(bits: int) -> None:
    refused(qcow2(cluster_bits=bits, l1_size=1), f"cluster_bits {bits} is out of range")


def test_qcow2_version_1_refused() -> None:
    refused(qcow2(version=1), "qcow (version 1)")


def test_qcow2_version_4_refused() -> None:
    refused(qcow2(version=4), "qcow2 version 4 is not supported")


def test_qcow2_l1_table_beyond_end_is_truncated() -> None:
    refused(qcow2(l1_offset=100 * CLUSTER), "qcow2 image is truncated: its L1 table")


def test_qcow2_refcount_table_beyond_declared_total_is_truncated() -> None:
    header = qcow2(refcount_offset=20 * CLUSTER)
    refused(header, "its refcount table", total=10 * CLUSTER)


def test_qcow2_l1_too_small_for_size_refused() -> None:
    refused(qcow2(size=100 * TiB // 1024, l1_size=1), "L1 table is too small")


def test_qcow2_16_eib_refused_by_the_cap() -> None:
    refused(
        qcow2(size=(1 << 64) - 1, l1_size=1), "virtual size 16.0 EiB exceeds the limit of 1.0 TiB"
    )


def test_qcow2_over_cap_refused() -> None:
    refused(qcow2(size=2 * TiB), "virtual size 2.0 TiB exceeds the limit of 1.0 TiB")


def test_truncated_qcow2_header() -> None:
    refused(qcow2()[:50], "header is incomplete")


def test_declared_mismatch_refused() -> None:
    refused(
        qcow2(), "declared disk_format 'vmdk' but the content is qcow2", declared=DiskFormat.VMDK
    )


def test_declared_iso_for_other_content_refused() -> None:
    refused(qcow2(), "declared disk_format 'iso' but the content is qcow2", declared=DiskFormat.ISO)


# --- vmdk -------------------------------------------------------------------


def vmdk_sparse(capacity: int = 8192, descriptor: str = "") -> bytes:
    head = struct.pack(
        "<4sIIQQQQIQQQ",
        b"KDMV",
        1,
        3,
        capacity,
        128,
        1 if descriptor else 0,
        20 if descriptor else 0,
        512,
        21,
        26,
        128,
    )
    data = bytearray(64 * CLUSTER)
    data[: len(head)] = head
    data[512 : 512 + len(descriptor)] = descriptor.encode()
    return bytes(data)


GOOD_DESCRIPTOR = """# Disk DescriptorFile
version=1
CID=1e140008
parentCID=ffffffff
createType="monolithicSparse"

# Extent description
RW 8192 SPARSE "disk.vmdk"
"""


def test_vmdk_sparse_header_passes() -> None:
    header = vmdk_sparse(descriptor=GOOD_DESCRIPTOR)
    assert (
        inspect_header(header, len(header), declared=DiskFormat.VMDK, max_virtual_size=CAP)
        == DiskFormat.VMDK
    )


def test_vmdk_text_descriptor_refused() -> None:
    text = (
        b"# Disk DescriptorFile\nversion=1\n"
        b'createType="monolithicFlat"\nRW 2048 FLAT "/etc/shadow" 0\n'
    )
    refused(text, "vmdk image is a text descriptor, which refers to separate extent files")


def test_vmdk_zero_capacity_refused() -> None:
    flat = GOOD_DESCRIPTOR.replace('SPARSE "disk.vmdk"', 'FLAT "/etc/shadow" 0')
    refused(vmdk_sparse(capacity=0, descriptor=flat), "zero capacity")


def test_vmdk_embedded_descriptor_with_parent_refused() -> None:
    text = GOOD_DESCRIPTOR.replace(
        "parentCID=ffffffff", 'parentCID=12345678\nparentFileNameHint="base.vmdk"'
    )
    refused(vmdk_sparse(descriptor=text), "vmdk image refers to a parent image")


def test_vmdk_embedded_descriptor_other_create_type_refused() -> None:
    text = GOOD_DESCRIPTOR.replace("monolithicSparse", "twoGbMaxExtentSparse")
    refused(vmdk_sparse(descriptor=text), "create type 'twoGbMaxExtentSparse' is not supported")


def test_vmdk_descriptor_with_several_extents_refused() -> None:
    with pytest.raises(InvalidImage, match="has 2 extents"):
        check_vmdk_descriptor(GOOD_DESCRIPTOR + 'RW 8192 SPARSE "other.vmdk"\n')


def test_vmdk_capacity_over_cap_refused() -> None:
    refused(vmdk_sparse(capacity=(2 * TiB) // 512), "virtual size 2.0 TiB exceeds the limit")


# --- vpc / vdi / vhdx ---------------------------------------------------------


def vpc_dynamic(disk_type: int = 3, size: int = 4 * MiB) -> bytes:
    footer = bytearray(512)
    footer[0:8] = b"conectix"
    struct.pack_into(">Q", footer, 16, 512)
    struct.pack_into(">QQII", footer, 40, size, size, 0, disk_type)
    dyn = bytearray(1024)
    dyn[0:8] = b"cxsparse"
    struct.pack_into(">QQII", dyn, 8, (1 << 64) - 1, 1536, 0x10000, 2)
    return bytes(footer + dyn).ljust(4096, b"\xff")


def test_vpc_dynamic_header_passes() -> None:
    header = vpc_dynamic()
    assert (
        inspect_header(header, len(header), declared=None, max_virtual_size=CAP) == DiskFormat.VPC
    )


def test_vpc_differencing_refused() -> None:
    refused(vpc_dynamic(disk_type=4), "vpc image is a differencing disk")


def vdi(image_type: int = 1, parent: bytes = bytes(16), blocks: int = 4) -> bytes:
    head = bytearray(0x200)
    head[:40] = b"<<< Oracle VM VirtualBox Disk Image >>>\n"
    struct.pack_into("<IIII", head, 0x40, 0xBEDA107F, 0x00010001, 0x180, image_type)
    struct.pack_into("<II", head, 0x154, 0x200, 0x400)
    struct.pack_into("<Q", head, 0x170, blocks * MiB)
    struct.pack_into("<IIII", head, 0x178, MiB, 0, blocks, 1)
    head[0x1B8:0x1C8] = parent
    return bytes(head).ljust(0x400 + MiB, b"\0")


def test_vdi_header_passes() -> None:
    header = vdi()
    assert (
        inspect_header(header, len(header), declared=None, max_virtual_size=CAP) == DiskFormat.VDI
    )


@pytest.mark.parametrize("kind", [{"image_type": 4}, {"parent": b"\x01" * 16}])
def test_vdi_differencing_refused(kind: dict[str, object]) -> None:
    refused(vdi(**kind), "vdi image is a differencing or undo disk")  # type: ignore[arg-type]


def test_vdi_truncated_data_refused() -> None:
    refused(vdi()[: 0x400 + 1000], "vdi image is truncated")


def test_vhdx_without_region_table_refused() -> None:
    refused(b"vhdxfile".ljust(MiB, b"\0"), "vhdx region table is missing or invalid")


def test_foreign_format_refused_by_name() -> None:
    refused(b"QED\x00".ljust(4096, b"\0"), "the content is a QED image, which rain does not accept")


# --- helpers -------------------------------------------------------------------


def test_image_bytes_defers_what_has_not_arrived() -> None:
    view = ImageBytes(b"abcd", 100)
    assert view.get(1, 2) == b"bc"
    assert view.get(50, 4) is None
    assert ImageBytes(b"abcd", 4).get(2, 10) == b"cd"  # complete: short read at EOF


def test_absurd_offsets_read_as_nothing() -> None:
    view = ImageBytes(b"abcd", 10, lambda offset, n: b"x" * n)
    assert view.get((1 << 64) - 1, 8) == b""
    assert view.get(6, 2) == b"xx"


def test_qcow2_backing_offset_past_eof_still_refused() -> None:
    header = bytearray(qcow2())
    struct.pack_into(">QI", header, 8, (1 << 64) - 1, 100)
    refused(bytes(header), "qcow2 image refers to a backing file; images must be self-contained")
