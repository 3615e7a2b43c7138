"""dpkg version ordering."""

from __future__ import annotations

import pytest

from rain.catalog.versions import VersionConstraint, compare_versions


@pytest.mark.parametrize("a,b", [
    ("1.0", "1.1"), ("1.9", "1.10"), ("1.0~rc1", "1.0"), ("1.0", "1.0-1"), ("1.0-1", "1.0-2"),
    ("2.0", "1:0.1"), ("1.22.1-9", "1.22.2"), ("2.4.57", "2.4.57+b1"), ("1.0a", "1.0b"),
    ("3.0.11-1~deb12u1", "3.0.11-1~deb12u2"), ("1.0.0", "1.0.1~"),
])
def test_ordering(a: str, b: str) -> None:
    assert compare_versions(a, b) < 0
    assert compare_versions(b, a) > 0
    assert compare_versions(a, a) == 0


def test_constraints() -> None:
    assert VersionConstraint.parse("nginx>=1.22").satisfied_by("1.22.1-9")
    assert not VersionConstraint.parse("nginx>=1.22").satisfied_by("1.18.0")
    assert VersionConstraint.parse("nginx").satisfied_by("0")
    assert not VersionConstraint.parse("nginx").satisfied_by(None)
    assert VersionConstraint.parse("x=1.0").op == "=="
