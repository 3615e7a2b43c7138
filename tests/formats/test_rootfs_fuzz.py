"""Fuzzing detection with mutated real disks: it answers or refuses, within its budget.

The seeds are real: an ext4 filesystem made with `mke2fs -d` from a tree with
os-release and a dpkg status, in a GPT disk, raw and as qcow2. Hypothesis
overwrites bytes in the sectors that hold something (superblock, group
descriptors, inode tables, extent trees, directories, the files, qcow2's
header and tables), and detection must either return or raise `InvalidImage`
— never another exception, never more reads or bytes than its budget. The
runs are derandomised, so CI sees the same examples every time.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rain.formats.budget import ReadBudget
from rain.formats.rootfs import detect_system
from rain.model import DiskFormat
from rain.model.errors import InvalidImage

from .conftest import MiB
from .rootfs_images import make_tree, mke2fs, partitioned, to_qcow2

pytestmark = pytest.mark.integration

BUDGET = {"max_bytes": 8 * MiB, "max_reads": 3000, "cpu_seconds": 2.0}
SECTOR = 512


def _seed(tmp: Path, fmt: DiskFormat) -> tuple[bytes, list[int]]:
    tree = make_tree(tmp / "tree", tools=40)  # fewer file bodies: more mutations hit metadata
    fs = mke2fs(tree, tmp / "fs.img", 8 * MiB)
    disk = partitioned(fs, tmp / "disk.raw")
    if fmt is DiskFormat.QCOW2:
        disk = to_qcow2(disk, tmp / "disk.qcow2", "cluster_size=4k")
    data = disk.read_bytes()
    sectors = [i for i in range(len(data) // SECTOR) if any(data[i * SECTOR : (i + 1) * SECTOR])]
    return data, sectors


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[DiskFormat, tuple[bytes, list[int]]]:
    return {fmt: _seed(tmp_path_factory.mktemp(str(fmt)), fmt)
            for fmt in (DiskFormat.RAW, DiskFormat.QCOW2)}


Mutation = tuple[int, int, int]
mutations = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, SECTOR - 1),
                               st.one_of(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]),
                                         st.integers(0, 255))), min_size=1, max_size=24)


def _run(seed: tuple[bytes, list[int]], fmt: DiskFormat, changes: list[Mutation]) -> None:
    original, sectors = seed
    data = bytearray(original)
    for sector, offset, value in changes:
        data[sectors[sector % len(sectors)] * SECTOR + offset] = value
    budget = ReadBudget(**BUDGET)  # type: ignore[arg-type]

    def read(offset: int, n: int) -> bytes:
        return bytes(data[offset : offset + n])

    with contextlib.suppress(InvalidImage):  # refusing is an answer; anything else fails
        detect_system(fmt, read, len(data), budget)
    # A read is charged before it happens: at most one read past each limit.
    assert budget.spent_reads <= BUDGET["max_reads"] + 1
    assert budget.spent_bytes <= BUDGET["max_bytes"] + 16 * MiB


FUZZ = settings(max_examples=400, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@FUZZ
@given(changes=mutations)
def test_mutated_ext4_disk(seeds: dict[DiskFormat, tuple[bytes, list[int]]],
                           changes: list[Mutation]) -> None:
    _run(seeds[DiskFormat.RAW], DiskFormat.RAW, changes)


@FUZZ
@given(changes=mutations)
def test_mutated_qcow2_disk(seeds: dict[DiskFormat, tuple[bytes, list[int]]],
                            changes: list[Mutation]) -> None:
    _run(seeds[DiskFormat.QCOW2], DiskFormat.QCOW2, changes)


def test_unmutated_seeds_are_detected(seeds: dict[DiskFormat, tuple[bytes, list[int]]]) -> None:
    for fmt, (data, _) in seeds.items():
        info = detect_system(fmt, lambda o, n, d=data: d[o : o + n], len(data),  # type: ignore[misc]
                             ReadBudget(**BUDGET))  # type: ignore[arg-type]
        assert info.os_distro == "debian" and "bash" in info.packages
