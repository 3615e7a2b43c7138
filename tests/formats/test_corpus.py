"""Every image in the corpus of real qemu-img output is accepted, with qemu's virtual size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rain.formats import HEADER_BYTES, inspect_file, inspect_header
from rain.model import DiskFormat
from rain.model.errors import InvalidImage

from .conftest import CAP, qemu_img
from .corpus import GOOD, Case

pytestmark = pytest.mark.integration
GOOD_BY_NAME = {case.name: case for case in GOOD}


@pytest.mark.parametrize("case", GOOD, ids=str)
def test_real_image_is_accepted(case: Case, tmp_path: Path) -> None:
    path = case.build(tmp_path)
    size = path.stat().st_size
    with path.open("rb") as f:
        header = f.read(HEADER_BYTES)
    assert inspect_header(header, size, declared=case.fmt, max_virtual_size=CAP) == case.fmt
    assert inspect_header(header, size, declared=None, max_virtual_size=CAP) == case.fmt
    info = inspect_file(path, declared=case.fmt, max_virtual_size=CAP)
    assert info.format == case.fmt
    qemu = json.loads(qemu_img("info", "--output=json", path))
    assert info.virtual_size == qemu["virtual-size"]


def test_qcow2_missing_its_last_whole_cluster_is_refused(tmp_path: Path) -> None:
    """The partial-last-cluster allowance stops at one cluster: a whole missing one is refused."""
    path = GOOD_BY_NAME["qcow2-convert"].build(tmp_path)
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size - 65536)
    with pytest.raises(InvalidImage, match="qcow2 image is truncated"):
        inspect_file(path, declared=DiskFormat.QCOW2, max_virtual_size=CAP)


def test_qcow2_blank_16M_ends_inside_its_last_cluster(tmp_path: Path) -> None:
    """The issue's case: qemu-img 7.2 writes 196616 bytes; the L1 cluster ends past EOF."""
    path = GOOD_BY_NAME["qcow2-create-16M"].build(tmp_path)
    assert path.stat().st_size % 65536 != 0
    assert inspect_file(path, declared=None, max_virtual_size=CAP).virtual_size == 16 << 20
