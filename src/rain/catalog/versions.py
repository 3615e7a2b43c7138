"""Debian package version ordering and version constraints (`nginx>=1.22`).

Software-stack search compares versions the way dpkg does, so `1.22.1-7`
satisfies `>=1.22` and `1.0~rc1` sorts before `1.0`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rain.model.errors import InvalidRequest

_CONSTRAINT = re.compile(
    r"^\s*([A-Za-z0-9][A-Za-z0-9.+\-_:]*)\s*(?:(>=|<=|==|!=|=|>|<)\s*([0-9A-Za-z][^\s<>=!]*))?\s*$"
)


def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isdigit():
        return 0
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _compare_part(a: str, b: str) -> int:
    i = j = 0
    while i < len(a) or j < len(b):
        first_diff = 0
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i]) if i < len(a) and not a[i].isdigit() else 0
            bc = _order(b[j]) if j < len(b) and not b[j].isdigit() else 0
            if ac != bc:
                return ac - bc
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        while i < len(a) and a[i].isdigit() and j < len(b) and b[j].isdigit():
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if i < len(a) and a[i].isdigit():
            return 1
        if j < len(b) and b[j].isdigit():
            return -1
        if first_diff:
            return first_diff
    return 0


def _split(v: str) -> tuple[int, str, str]:
    epoch = 0
    if ":" in v:
        e, v = v.split(":", 1)
        epoch = int(e) if e.isdigit() else 0
    upstream, _, revision = v.rpartition("-") if "-" in v else (v, "", "")
    return epoch, upstream, revision


def compare_versions(a: str, b: str) -> int:
    """<0, 0, >0 like dpkg --compare-versions."""
    ea, ua, ra = _split(a)
    eb, ub, rb = _split(b)
    if ea != eb:
        return ea - eb
    return _compare_part(ua, ub) or _compare_part(ra, rb)


@dataclass(frozen=True)
class VersionConstraint:
    name: str
    op: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> VersionConstraint:
        m = _CONSTRAINT.match(text)
        if not m:
            raise InvalidRequest(f"bad package constraint {text!r} (expected e.g. 'nginx>=1.22')")
        name, op, version = m.groups()
        return cls(name, "==" if op == "=" else op, version)

    def satisfied_by(self, version: str | None) -> bool:
        if version is None:
            return False
        if self.op is None or self.version is None:
            return True
        c = compare_versions(version, self.version)
        return {
            ">=": c >= 0, "<=": c <= 0, ">": c > 0, "<": c < 0, "==": c == 0, "!=": c != 0,
        }[self.op]

    def __str__(self) -> str:
        return self.name + (f"{self.op}{self.version}" if self.op else "")
