"""rain's own header checks against oslo.utils' format inspector, on good and hostile images.

Each case states three verdicts (A = accepts, R = refuses): rain's own checks
with qemu-img, the oslo inspector's, and rain's final one with the inspector
as a second opinion. A case whose verdicts change fails, so the table in
docs/formats.md stays true. Two properties hold for every case: the final
verdict never accepts what rain's own checks refuse, and it refuses whatever
the inspector refuses unless rain overrules that check by name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from rain.model import DiskFormat

from .comparison import compare
from .corpus import GOOD
from .hostile import HOSTILE

pytestmark = pytest.mark.integration

# Every case not listed here is "AAA": accepted by all three.
VERDICTS = {
    "qcow2-create-extended-l2": "ARA",
    "qcow2-create-extended-l2-2M": "ARA",
    "qcow2-convert-extended-l2": "ARA",
    "qcow2-backing-file-/etc/passwd": "RRR",
    "qcow2-backing-qcow2": "RRR",
    "qcow2-external-data-file": "RRR",
    "qcow2-external-data-file-/etc/passwd": "RRR",
    "qcow2-data-file-name-without-feature-bit": "RAR",
    "qcow2-huge-l1-table": "RAR",
    "qcow2-virtual-size-2^60": "RAR",
    "qcow2-unknown-incompatible-feature": "RRR",
    "qcow2-truncated": "RAR",
    "qcow2-encrypted-luks": "RAR",
    "raw-declared-starts-with-qcow2": "RRR",
    "raw-undeclared-starts-with-qcow2": "RRR",
    "iso-with-qcow2-in-system-area": "RRR",
    "iso-undeclared-with-qcow2-in-system-area": "RRR",
    "iso-with-backing-qcow2-in-system-area": "RRR",
    "iso-with-vmdk-descriptor-in-system-area": "RAR",
    "vmdk-flat-descriptor-/etc/passwd": "RRR",
    "vmdk-descriptor-relative-extent": "RRR",
    "vmdk-descriptor-after-comments": "RRR",
    "vmdk-descriptor-declared-raw": "RRR",
    "vmdk-twoGbMaxExtentSparse": "RRR",
    "vmdk-monolithicFlat": "RRR",
    "vmdk-embedded-extent-/etc/passwd": "RRR",
    "vmdk-zero-capacity": "RAR",
    "vmdk-parent": "RAR",
    "vmdk-footer-names-another-descriptor": "ARR",
    "vmdk-gd-at-end-without-footer": "RRR",
    "mbr-boot-code-is-qcow2": "ARR",
    "mbr-without-partitions": "ARA",
    "vpc-differencing": "RAR",
    "vdi-differencing": "RAR",
    "vhdx-parent-locator": "RAR",
    "vhdx-5000-regions": "RAR",
    "vhdx-metadata-region-past-eof": "RRR",
    "vhdx-unknown-required-region": "RAR",
    "qed": "RRR",
    "qcow-v1": "RRR",
    "luks": "RAR",
}
# The inspector's refusals rain overrules (see rain/formats/oslo_inspector.py).
OVERRULED = {"qcow2-create-extended-l2", "qcow2-create-extended-l2-2M",
             "qcow2-convert-extended-l2", "mbr-without-partitions"}
CASES = [(c.name, c.fmt, c.build) for c in GOOD] + [(c.name, c.declared, c.build)
                                                    for c in HOSTILE]


@pytest.mark.parametrize(("name", "declared", "build"), CASES, ids=[c[0] for c in CASES])
def test_rain_and_the_inspector(name: str, declared: DiskFormat | None,
                                build: Callable[[Path], Path], tmp_path: Path) -> None:
    row = compare(build(tmp_path), declared)
    seen = "".join("A" if ok else "R" for ok in
                   (row.rain_accepts, row.inspector_accepts, row.final == "accept"))
    expected = VERDICTS.get(name, "AAA")
    agreed = expected[0] == expected[1]
    assert seen == expected, (
        f"{name}: rain {row.rain!r}, inspector {row.inspector.summary()!r}, final"
        f" {row.final!r} (agreed: {agreed})")
    if not row.rain_accepts:
        assert row.final != "accept"
    if not row.inspector_accepts and name not in OVERRULED:
        assert row.final != "accept"
    assert "\n" not in row.final
