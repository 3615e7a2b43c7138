"""Conversion and overlays through the qemu-img wrapper."""

from __future__ import annotations

from pathlib import Path

import pytest

from rain.formats import convert_file, create_overlay, inspect_file, qemu
from rain.model import DiskFormat
from rain.model.errors import InvalidImage, InvalidRequest

from .conftest import CAP, MiB, qemu_img

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "target", [DiskFormat.VMDK, DiskFormat.VHDX, DiskFormat.VDI, DiskFormat.VPC, DiskFormat.RAW]
)
def test_raw_to_qcow2_to_target_round_trips(
    target: DiskFormat, raw_image: Path, tmp_path: Path
) -> None:
    q = tmp_path / "step.qcow2"
    info = convert_file(raw_image, DiskFormat.RAW, q, DiskFormat.QCOW2)
    assert (info.format, info.virtual_size) == (DiskFormat.QCOW2, 4 * MiB)

    out = tmp_path / f"out.{target}"
    info = convert_file(q, DiskFormat.QCOW2, out, target)
    assert info.format == target
    assert info.virtual_size == 4 * MiB  # vpc too: force_size keeps the exact size
    assert qemu.compare(raw_image, DiskFormat.RAW, out, target)
    # Everything rain writes passes rain's own inspection.
    assert inspect_file(out, declared=target, max_virtual_size=CAP).format == target

    back = tmp_path / "back.raw"
    convert_file(out, target, back, DiskFormat.RAW)
    assert back.read_bytes() == raw_image.read_bytes()


def test_compare_sees_a_difference(raw_image: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.raw"
    data = bytearray(raw_image.read_bytes())
    data[3 * MiB] ^= 0xFF
    other.write_bytes(bytes(data))
    assert not qemu.compare(raw_image, DiskFormat.RAW, other, DiskFormat.RAW)


def test_compressed_qcow2(raw_image: Path, tmp_path: Path) -> None:
    out = tmp_path / "small.qcow2"
    convert_file(raw_image, DiskFormat.RAW, out, DiskFormat.QCOW2, compress=True)
    assert qemu.compare(raw_image, DiskFormat.RAW, out, DiskFormat.QCOW2)


def test_vmdk_stream_optimized_option(raw_image: Path, tmp_path: Path) -> None:
    out = tmp_path / "stream.vmdk"
    info = convert_file(
        raw_image, DiskFormat.RAW, out, DiskFormat.VMDK, options=["subformat=streamOptimized"]
    )
    assert info.format_specific["create-type"] == "streamOptimized"


def test_iso_is_not_an_output_format(raw_image: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="iso is not an output format"):
        convert_file(raw_image, DiskFormat.RAW, tmp_path / "x.iso", DiskFormat.ISO)


def test_bad_output_option_refused(raw_image: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="key=value"):
        convert_file(
            raw_image,
            DiskFormat.RAW,
            tmp_path / "x.qcow2",
            DiskFormat.QCOW2,
            options=["cluster_size=65536,backing_file=/etc/passwd"],
        )


def test_compression_only_for_qcow2(raw_image: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="compression"):
        convert_file(raw_image, DiskFormat.RAW, tmp_path / "x.vdi", DiskFormat.VDI, compress=True)


def test_overlay_over_a_cached_image(raw_image: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    convert_file(raw_image, DiskFormat.RAW, base, DiskFormat.QCOW2)
    disk = tmp_path / "instance.qcow2"
    create_overlay(base, DiskFormat.QCOW2, disk, size=8 * MiB)
    info = qemu_img("info", "--output=json", disk)
    assert '"backing-filename-format": "qcow2"' in info
    assert f'"backing-filename": "{base}"' in info
    assert '"virtual-size": 8388608' in info
    # The guest sees the base through the overlay (rain's compare never opens backing files).
    compared = qemu_img("compare", "-f", "raw", "-F", "qcow2", raw_image, disk)
    assert "Images are identical" in compared
    # An overlay is exactly what an upload must never be.
    with pytest.raises(InvalidImage, match="refers to a backing file"):
        inspect_file(disk, declared=DiskFormat.QCOW2, max_virtual_size=CAP)
