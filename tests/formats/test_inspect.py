"""inspect_file / inspect_header / verify_raw_header against real qemu-img images."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from rain.formats import HEADER_BYTES, inspect_file, inspect_header, verify_raw_header
from rain.formats import inspect as inspect_module
from rain.model import DiskFormat
from rain.model.errors import InvalidImage

from .conftest import CAP, MiB, TiB, make_iso, patch, qemu_img

pytestmark = pytest.mark.integration

MakeImage = Callable[..., Path]
ALL_FORMATS = [
    DiskFormat.RAW,
    DiskFormat.QCOW2,
    DiskFormat.VMDK,
    DiskFormat.VPC,
    DiskFormat.VHDX,
    DiskFormat.VDI,
    DiskFormat.ISO,
]


def refused(
    path: Path, phrase: str, *, declared: DiskFormat | None = None, cap: int = CAP
) -> InvalidImage:
    with pytest.raises(InvalidImage) as err:
        inspect_file(path, declared=declared, max_virtual_size=cap)
    assert phrase in err.value.message
    assert "\n" not in err.value.message
    return err.value


def header_of(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(HEADER_BYTES)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_real_images_are_accepted(fmt: DiskFormat, make_image: MakeImage) -> None:
    path = make_image(fmt)
    size = path.stat().st_size
    assert inspect_header(header_of(path), size, declared=fmt, max_virtual_size=CAP) == fmt
    info = inspect_file(path, declared=fmt, max_virtual_size=CAP)
    assert info.format == fmt
    expected = MiB if fmt is DiskFormat.ISO else 4 * MiB
    if fmt is DiskFormat.VPC:  # qemu's default dynamic VHD rounds up to a CHS geometry
        assert expected <= info.virtual_size < expected + MiB
    else:
        assert info.virtual_size == expected
    assert info.file_size == size


def test_undeclared_format_is_detected(make_image: MakeImage) -> None:
    path = make_image(DiskFormat.VDI)
    assert inspect_file(path, declared=None, max_virtual_size=CAP).format == DiskFormat.VDI


@pytest.mark.parametrize("sub", ["monolithicSparse", "streamOptimized"])
def test_vmdk_subformats_accepted(sub: str, make_image: MakeImage) -> None:
    path = make_image(DiskFormat.VMDK, f"subformat={sub}")
    info = inspect_file(path, declared=DiskFormat.VMDK, max_virtual_size=CAP)
    assert info.format_specific["create-type"] == sub


def test_fixed_vhd_accepted_when_declared_vpc(make_image: MakeImage) -> None:
    path = make_image(DiskFormat.VPC, "subformat=fixed")
    header = header_of(path)
    size = path.stat().st_size
    # Its header is plain data: only the declaration can say it is a VHD.
    assert inspect_header(header, size, declared=None, max_virtual_size=CAP) == DiskFormat.RAW
    assert (
        inspect_header(header, size, declared=DiskFormat.VPC, max_virtual_size=CAP)
        == DiskFormat.VPC
    )
    assert (
        inspect_file(path, declared=DiskFormat.VPC, max_virtual_size=CAP).format == DiskFormat.VPC
    )


def test_declared_vpc_for_raw_refused_on_the_full_file(raw_image: Path) -> None:
    refused(raw_image, "declared disk_format 'vpc' but the content is raw", declared=DiskFormat.VPC)


# --- declared format vs content ----------------------------------------------------


def test_qcow2_declared_for_raw_refused(raw_image: Path) -> None:
    with pytest.raises(InvalidImage, match="declared disk_format 'qcow2' but the content is raw"):
        inspect_header(
            header_of(raw_image),
            raw_image.stat().st_size,
            declared=DiskFormat.QCOW2,
            max_virtual_size=CAP,
        )
    refused(
        raw_image, "declared disk_format 'qcow2' but the content is raw", declared=DiskFormat.QCOW2
    )


def test_raw_declared_for_qcow2_refused(make_image: MakeImage) -> None:
    refused(
        make_image(DiskFormat.QCOW2),
        "declared disk_format 'raw' but the content is qcow2",
        declared=DiskFormat.RAW,
    )


def test_iso_declared_raw_is_kept_raw(tmp_path: Path) -> None:
    iso = make_iso(tmp_path / "disc.iso")
    assert (
        inspect_header(
            header_of(iso), iso.stat().st_size, declared=DiskFormat.RAW, max_virtual_size=CAP
        )
        == DiskFormat.RAW
    )
    assert inspect_file(iso, declared=DiskFormat.RAW, max_virtual_size=CAP).format == DiskFormat.RAW
    assert inspect_file(iso, declared=None, max_virtual_size=CAP).format == DiskFormat.ISO


def test_iso_declared_for_raw_refused(raw_image: Path) -> None:
    refused(raw_image, "declared disk_format 'iso' but the content is raw", declared=DiskFormat.ISO)


# --- references to other files ------------------------------------------------------


def test_qcow2_with_backing_file_refused(tmp_path: Path, raw_image: Path) -> None:
    overlay = tmp_path / "overlay.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", raw_image, "-F", "raw", overlay)
    refused(overlay, f"qcow2 image refers to a backing file ('{raw_image}')")
    with pytest.raises(InvalidImage, match="refers to a backing file"):
        inspect_header(
            header_of(overlay), overlay.stat().st_size, declared=None, max_virtual_size=CAP
        )


def test_qcow2_with_external_data_file_refused(tmp_path: Path) -> None:
    image = tmp_path / "split.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", image, "4M")
    refused(image, "qcow2 image uses an external data file; images must be self-contained")


def test_vmdk_descriptor_with_extent_refused(tmp_path: Path) -> None:
    descriptor = tmp_path / "flat.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", "subformat=monolithicFlat", descriptor, "1M")
    assert (tmp_path / "flat-flat.vmdk").exists()
    refused(descriptor, "vmdk image is a text descriptor, which refers to separate extent files")
    refused(descriptor, "vmdk image is a text descriptor", declared=DiskFormat.VMDK)
    # Declared raw, the descriptor is still recognised and refused.
    refused(
        descriptor, "declared disk_format 'raw' but the content is vmdk", declared=DiskFormat.RAW
    )


def test_vmdk_sparse_with_zero_capacity_refused(make_image: MakeImage) -> None:
    """qemu would follow the embedded descriptor to its extent files: refuse first."""
    path = make_image(DiskFormat.VMDK)
    patch(path, 12, struct.pack("<Q", 0))
    refused(path, "zero capacity")


def test_vpc_differencing_refused(make_image: MakeImage) -> None:
    path = make_image(DiskFormat.VPC)
    patch(path, 60, struct.pack(">I", 4))
    refused(path, "vpc image is a differencing disk")


def test_vdi_differencing_refused(make_image: MakeImage) -> None:
    path = make_image(DiskFormat.VDI)
    patch(path, 0x4C, struct.pack("<I", 4))
    refused(path, "vdi image is a differencing or undo disk")


def test_vhdx_differencing_refused(make_image: MakeImage) -> None:
    path = make_image(DiskFormat.VHDX)
    data = path.read_bytes()
    table = 192 * 1024
    metadata_guid = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
    params_guid = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B").bytes_le
    count = struct.unpack_from("<I", data, table + 8)[0]
    regions = [struct.unpack_from("<16sQ", data, table + 16 + 32 * i) for i in range(count)]
    meta = next(offset for guid, offset in regions if guid == metadata_guid)
    entries = struct.unpack_from("<H", data, meta + 10)[0]
    for i in range(entries):
        item, offset = struct.unpack_from("<16sI", data, meta + 32 + 32 * i)
        if item == params_guid:
            flags = struct.unpack_from("<I", data, meta + offset + 4)[0]
            patch(path, meta + offset + 4, struct.pack("<I", flags | 2))
            break
    else:
        raise AssertionError("no file parameters item")
    refused(path, "vhdx image is a differencing disk")


# --- damage -----------------------------------------------------------------------


def test_truncated_qcow2_refused(make_image: MakeImage) -> None:
    path = make_image(DiskFormat.QCOW2)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)
    refused(path, "qcow2 image is truncated")


def test_truncated_vdi_refused(make_image: MakeImage) -> None:
    path = make_image(DiskFormat.VDI)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)
    refused(path, "vdi image is truncated")


def test_truncated_vmdk_refused(make_image: MakeImage) -> None:
    path = make_image(DiskFormat.VMDK)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)
    refused(path, "vmdk image is truncated")


def test_truncated_vpc_refused(make_image: MakeImage) -> None:
    path = make_image(DiskFormat.VPC)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 3)
    refused(path, "qemu-img cannot read the vpc image")


def test_qcow2_cluster_bits_40_refused(make_image: MakeImage) -> None:
    path = make_image(DiskFormat.QCOW2)
    patch(path, 20, struct.pack(">I", 40))
    refused(path, "qcow2 cluster_bits 40 is out of range")


def test_qcow2_l1_offset_beyond_eof_refused(make_image: MakeImage) -> None:
    path = make_image(DiskFormat.QCOW2)
    patch(path, 40, struct.pack(">Q", 1 << 40))
    refused(path, "qcow2 image is truncated: its L1 table")


def test_qcow2_corrupt_l2_entry_refused(make_image: MakeImage) -> None:
    """Metadata damage only qemu-img check can see: an L2 entry pointing into the header."""
    path = make_image(DiskFormat.QCOW2)
    data = path.read_bytes()
    l1_offset = struct.unpack_from(">Q", data, 40)[0]
    l2_offset = struct.unpack_from(">Q", data, l1_offset)[0] & 0x00FFFFFFFFFFFE00
    entry = struct.unpack_from(">Q", data, l2_offset)[0]
    assert entry, "the test image should have its first cluster allocated"
    # Point guest cluster 0 at the refcount table's cluster (flag COPIED = refcount 1).
    patch(path, l2_offset, struct.pack(">Q", (1 << 63) | 0x10000))
    refused(path, "qcow2 image is corrupt")


def test_qcow2_16_eib_refused(make_image: MakeImage) -> None:
    path = make_image(DiskFormat.QCOW2)
    patch(path, 24, struct.pack(">Q", (1 << 64) - 512))
    refused(path, "virtual size 16.0 EiB exceeds the limit of 1.0 TiB")


def test_qcow2_over_the_cap_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.qcow2"
    qemu_img("create", "-f", "qcow2", big, "2T")
    refused(big, "virtual size 2.0 TiB exceeds the limit of 1.0 TiB")
    with pytest.raises(InvalidImage, match=r"virtual size 2\.0 TiB exceeds the limit of 1\.0 TiB"):
        inspect_header(header_of(big), big.stat().st_size, declared=None, max_virtual_size=TiB)


def test_raw_over_the_cap_refused(raw_image: Path) -> None:
    refused(raw_image, "virtual size 4.0 MiB exceeds the limit of 1.0 MiB", cap=MiB)


# --- raw cross-check with qemu's own prober -----------------------------------------


def test_verify_raw_header_accepts_raw(raw_image: Path) -> None:
    verify_raw_header(header_of(raw_image))


def test_verify_raw_header_refuses_other_formats(make_image: MakeImage) -> None:
    with pytest.raises(InvalidImage, match="the content is qcow2, not raw"):
        verify_raw_header(header_of(make_image(DiskFormat.QCOW2)))


def test_qemu_prober_is_a_second_opinion(
    make_image: MakeImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even if rain's detection missed a format, qemu-img's probe refuses the upload."""
    monkeypatch.setattr(inspect_module, "detect_format", lambda header: DiskFormat.RAW)
    header = header_of(make_image(DiskFormat.VDI))
    with pytest.raises(InvalidImage, match="the content is vdi according to qemu-img, not raw"):
        verify_raw_header(header)


def test_raw_file_that_qemu_probes_otherwise_refused(tmp_path: Path, raw_image: Path) -> None:
    # qemu recognises .dmg files by name; rain's raw file must still read as raw.
    dmg = tmp_path / "disk.dmg"
    dmg.write_bytes(raw_image.read_bytes())
    refused(dmg, "qemu-img does not read the content as raw")


def test_foreign_format_refused(tmp_path: Path) -> None:
    qed = tmp_path / "disk.qed"
    qemu_img("create", "-f", "qed", qed, "4M")
    refused(qed, "the content is a QED image, which rain does not accept")
