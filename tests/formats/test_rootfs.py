"""Reading OS, release, arch and packages from real disks made with sfdisk and mke2fs -d."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from rain.formats.budget import BudgetExceeded, ReadBudget
from rain.formats.rootfs import SystemInfo, detect_system, parse_os_release
from rain.model import DiskFormat
from rain.model.errors import InvalidImage

from .conftest import MiB, qemu_img
from .corpus import data_disk
from .rootfs_images import PACKAGES, elf_header, make_tree, mke2fs, partitioned, to_qcow2

pytestmark = pytest.mark.integration


def detect(path: Path, fmt: DiskFormat = DiskFormat.RAW,
           budget: ReadBudget | None = None) -> SystemInfo:
    with path.open("rb") as f:
        fd = f.fileno()
        return detect_system(fmt, lambda offset, n: os.pread(fd, n, offset),
                             os.fstat(fd).st_size, budget or ReadBudget())


def assert_debian(info: SystemInfo) -> None:
    assert (info.os_distro, info.os_release, info.arch) == ("debian", "bookworm", "amd64")
    assert info.packages == PACKAGES  # telnet is only config-files: not installed


@pytest.mark.parametrize("options", [
    ("-t", "ext2"), ("-t", "ext3"), ("-t", "ext4"), ("-t", "ext4", "-O", "^64bit"),
    ("-t", "ext4", "-b", "1024"), ("-t", "ext4", "-O", "inline_data"),
    ("-t", "ext4", "-O", "^dir_index"), ("-t", "ext4", "-I", "128"),
], ids=" ".join)
def test_filesystem_flavours(options: tuple[str, ...], tmp_path: Path) -> None:
    fs = mke2fs(make_tree(tmp_path / "tree"), tmp_path / "fs.img", 64 * MiB, *options)
    info = detect(partitioned(fs, tmp_path / "disk.raw"))
    assert_debian(info)
    assert info.source.startswith("partition 2 (gpt), ext")


@pytest.mark.parametrize("layout", ["whole", "gpt", "dos"])
def test_partition_layouts(layout: str, tmp_path: Path) -> None:
    fs = mke2fs(make_tree(tmp_path / "tree"), tmp_path / "fs.img")
    disk = fs if layout == "whole" else partitioned(fs, tmp_path / "disk.raw", layout)
    info = detect(disk)
    assert_debian(info)
    assert info.source == {"whole": "whole disk, ext4", "gpt": "partition 2 (gpt), ext4",
                           "dos": "partition 2 (mbr), ext4"}[layout]


def test_logical_partition_in_an_extended_one(tmp_path: Path) -> None:
    fs = mke2fs(make_tree(tmp_path / "tree"), tmp_path / "fs.img", 32 * MiB)
    disk = tmp_path / "disk.raw"
    with disk.open("wb") as f:
        f.truncate(40 * MiB)
    script = ("label: dos\nstart=2048, size=2048, type=83\nstart=8192, type=5\n"
              "start=10240, type=83\n")
    subprocess.run(["sfdisk", "--quiet", str(disk)], input=script.encode(), check=True,
                   capture_output=True)
    with disk.open("r+b") as f:
        f.seek(10240 * 512)
        f.write(fs.read_bytes()[: 40 * MiB - 10240 * 512])
    info = detect(disk)
    assert_debian(info)
    assert info.source == "partition 5 (mbr), ext4"


@pytest.mark.parametrize("options,compress", [
    ((), False), (("compat=0.10",), False), (("cluster_size=512",), False),
    (("cluster_size=2M",), False), ((), True), (("compression_type=zstd",), True),
    (("extended_l2=on",), False), (("preallocation=metadata",), False),
], ids=lambda v: ",".join(v) if isinstance(v, tuple) else ("compressed" if v else "plain"))
def test_qcow2_disks(options: tuple[str, ...], compress: bool, tmp_path: Path) -> None:
    fs = mke2fs(make_tree(tmp_path / "tree"), tmp_path / "fs.img", 32 * MiB)
    raw = partitioned(fs, tmp_path / "disk.raw")
    qcow2 = to_qcow2(raw, tmp_path / "disk.qcow2", *options, compress=compress)
    assert_debian(detect(qcow2, DiskFormat.QCOW2))


@pytest.mark.parametrize("options,compress", [
    ((), False), (("compat=0.10", "cluster_size=512"), False), ((), True),
    (("compression_type=zstd", "cluster_size=4k"), True), (("extended_l2=on",), False),
    (("cluster_size=2M",), True),
])
def test_qcow2_reader_reads_what_qemu_reads(options: tuple[str, ...], compress: bool,
                                            tmp_path: Path) -> None:
    """The whole virtual disk, byte for byte, against the raw disk it was converted from."""
    from rain.formats.budget import BoundedReader
    from rain.formats.vdisk import Qcow2Disk

    raw = data_disk(tmp_path)
    qcow2 = to_qcow2(raw, tmp_path / "d.qcow2", *options, compress=compress)
    with qcow2.open("rb") as f:
        fd = f.fileno()
        source = BoundedReader(lambda o, n: os.pread(fd, n, o), os.fstat(fd).st_size,
                               ReadBudget(max_bytes=1 << 30, max_reads=10**6, cpu_seconds=60))
        disk = Qcow2Disk(source)
        assert disk.size == raw.stat().st_size
        assert disk.read(0, disk.size) == raw.read_bytes()


def test_extended_l2_subclusters(tmp_path: Path) -> None:
    """Subclusters written one by one (qemu-io), some zeroed: the reader agrees with qemu."""
    from rain.formats.budget import BoundedReader
    from rain.formats.vdisk import Qcow2Disk

    path = tmp_path / "sub.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", path, "4M")
    for command in ("write -P 0xab 4k 2k", "write -P 0xcd 70k 6k", "write -z 72k 2k",
                    "write -P 0xef 1M 64k", "write -z 1M 4k"):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(path)], check=True,
                       capture_output=True)
    expected = tmp_path / "sub.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", path, expected)
    with path.open("rb") as f:
        fd = f.fileno()
        disk = Qcow2Disk(BoundedReader(lambda o, n: os.pread(fd, n, o), os.fstat(fd).st_size,
                                       ReadBudget()))
        assert disk.read(0, disk.size) == expected.read_bytes()


def test_arch_from_elf_when_dpkg_does_not_say(tmp_path: Path) -> None:
    status = "Package: bash\nStatus: install ok installed\nVersion: 5.2.15-2\n"
    tree = make_tree(tmp_path / "tree", arch_file=False, status=status)
    (tree / "usr/bin/dash").write_bytes(elf_header(machine=183) + bytes(100))  # aarch64
    info = detect(mke2fs(tree, tmp_path / "fs.img", 16 * MiB))
    assert info.arch == "arm64" and info.packages == {"bash": "5.2.15-2"}


def test_arch_from_the_dpkg_package(tmp_path: Path) -> None:
    info = detect(mke2fs(make_tree(tmp_path / "tree", arch_file=False), tmp_path / "fs.img",
                         16 * MiB))
    assert info.arch == "amd64"


def test_absolute_symlink_stays_inside_the_filesystem(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    (tree / "etc/os-release").unlink()
    (tree / "etc/os-release").symlink_to("/../../../../usr/lib/os-release")
    assert_debian(detect(mke2fs(tree, tmp_path / "fs.img", 16 * MiB)))


def test_symlink_loop_is_refused(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    (tree / "etc/os-release").unlink()
    (tree / "etc/os-release").symlink_to("loop-b")
    (tree / "etc/loop-b").symlink_to("os-release")
    with pytest.raises(InvalidImage, match="too many symlinks"):
        detect(mke2fs(tree, tmp_path / "fs.img", 16 * MiB))


def test_values_an_image_says_about_itself_are_cleaned(tmp_path: Path) -> None:
    release = 'ID="debian; rm -rf /"\nVERSION_CODENAME="book worm"\n'
    tree = make_tree(tmp_path / "tree", os_release=release)
    info = detect(mke2fs(tree, tmp_path / "fs.img", 16 * MiB))
    assert info.os_distro == "" and info.os_release == ""
    assert info.arch == "amd64" and info.packages == PACKAGES


def test_no_root_filesystem_says_why(tmp_path: Path) -> None:
    with pytest.raises(InvalidImage, match=r"no root filesystem found \(no partition table;"
                       r" whole disk: no ext2/3/4 superblock\)"):
        detect(data_disk(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    fs = mke2fs(empty, tmp_path / "fs.img", 16 * MiB)
    with pytest.raises(InvalidImage, match="ext4 without /etc/os-release"):
        detect(partitioned(fs, tmp_path / "disk.raw"))


def test_formats_without_a_reader_say_so(tmp_path: Path) -> None:
    with pytest.raises(InvalidImage, match="inside vmdk images is not supported"):
        detect(data_disk(tmp_path), DiskFormat.VMDK)


def test_budget_stops_reading(tmp_path: Path) -> None:
    fs = mke2fs(make_tree(tmp_path / "tree"), tmp_path / "fs.img", 16 * MiB)
    with pytest.raises(BudgetExceeded, match="more than 8192 bytes"):
        detect(fs, budget=ReadBudget(max_bytes=8192))
    with pytest.raises(BudgetExceeded, match="more than 5 reads"):
        detect(fs, budget=ReadBudget(max_reads=5))


def test_os_release_quoting() -> None:
    fields = parse_os_release('ID=ubuntu\nVERSION_ID="22.04"\nNAME=\'Ubuntu\'\n# c\nX="a\\"b"\n')
    assert fields == {"ID": "ubuntu", "VERSION_ID": "22.04", "NAME": "Ubuntu", "X": 'a"b'}


def test_a_large_dpkg_status_is_read_in_bounded_pieces(tmp_path: Path) -> None:
    """~20 MiB of status (longer than one bounded read) and 50 000 packages."""
    stanza = ("Package: pkg-{i}\nStatus: install ok installed\nArchitecture: amd64\n"
              "Version: 1.{i}-1\nDescription: filler\n" + " more description text\n" * 12)
    status = "\n".join(stanza.format(i=i) for i in range(50_000))
    assert len(status) > 16 * MiB
    tree = make_tree(tmp_path / "tree", status=status, tools=0)
    info = detect(mke2fs(tree, tmp_path / "fs.img", 64 * MiB))
    assert len(info.packages) == 50_000 and info.packages["pkg-49999"] == "1.49999-1"


def test_a_status_over_its_limit_is_refused(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from rain.formats import rootfs

    monkeypatch.setattr(rootfs, "MAX_DPKG_STATUS", 1024)
    fs = mke2fs(make_tree(tmp_path / "tree"), tmp_path / "fs.img", 16 * MiB)
    with pytest.raises(InvalidImage, match="is larger than 1024 bytes"):
        detect(fs)
