"""Instance disk primitives in rain.formats.overlay, with the real qemu-img."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rain.formats import create_copy, create_ephemeral, create_overlay
from rain.model import DiskFormat
from rain.model.errors import InvalidRequest
from tests.distribute.conftest import MiB, pattern_disk, qemu_img


def read_through(disk: Path, fmt: str, tmp_path: Path) -> bytes:
    """What the guest sees: the overlay flattened to raw by qemu-img (following its backing)."""
    out = tmp_path / "flat.raw"
    qemu_img("convert", "-f", fmt, "-O", "raw", disk, out)
    return out.read_bytes()


def test_overlay_names_backing_format_and_reads_through(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    data = pattern_disk(base)
    disk = tmp_path / "disk.qcow2"
    assert create_overlay(base, DiskFormat.RAW, disk) == len(data)
    info = json.loads(qemu_img("info", "--output=json", disk))
    assert info["format"] == "qcow2"
    assert info["backing-filename-format"] == "raw"
    assert info["backing-filename"] == str(base.absolute())
    assert info["virtual-size"] == len(data)
    assert read_through(disk, "qcow2", tmp_path) == data


def test_overlay_over_relative_backing_path_records_it_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pattern_disk(tmp_path / "base.raw")
    monkeypatch.chdir(tmp_path)
    create_overlay(Path("base.raw"), DiskFormat.RAW, Path("disk.qcow2"))
    info = json.loads(qemu_img("info", "--output=json", tmp_path / "disk.qcow2"))
    assert info["backing-filename"] == str(tmp_path / "base.raw")


def test_overlay_over_qcow2_grows(tmp_path: Path) -> None:
    raw = tmp_path / "base.raw"
    data = pattern_disk(raw)
    base = tmp_path / "base.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, base)
    disk = tmp_path / "disk.qcow2"
    assert create_overlay(base, DiskFormat.QCOW2, disk, size=8 * MiB) == 8 * MiB
    info = json.loads(qemu_img("info", "--output=json", disk))
    assert info["backing-filename-format"] == "qcow2"
    assert info["virtual-size"] == 8 * MiB
    seen = read_through(disk, "qcow2", tmp_path)
    assert seen[: len(data)] == data
    assert seen[len(data) :] == bytes(8 * MiB - len(data))


def test_overlay_refuses_to_shrink(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    pattern_disk(base)
    disk = tmp_path / "disk.qcow2"
    with pytest.raises(InvalidRequest, match="smaller than the image's virtual size"):
        create_overlay(base, DiskFormat.RAW, disk, size=2 * MiB)
    assert not disk.exists()


def test_copy_is_standalone_and_sparse(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    data = pattern_disk(base, 64 * MiB)
    disk = tmp_path / "disk.raw"
    assert create_copy(base, DiskFormat.RAW, disk, size=80 * MiB) == 80 * MiB
    base.unlink()  # a copy does not need its source any more
    seen = disk.read_bytes()
    assert seen[: len(data)] == data and len(seen) == 80 * MiB
    assert disk.stat().st_blocks * 512 < 8 * MiB  # zeros were not written


def test_ephemeral_is_sparse_and_never_overwrites(tmp_path: Path) -> None:
    eph = tmp_path / "eph.raw"
    create_ephemeral(eph, 1 << 30)
    assert eph.stat().st_size == 1 << 30
    assert eph.stat().st_blocks == 0
    with pytest.raises(FileExistsError):
        create_ephemeral(eph, MiB)
    with pytest.raises(InvalidRequest):
        create_ephemeral(tmp_path / "zero.raw", 0)
