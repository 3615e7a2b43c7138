"""Matchmaking: hard requirements filter, weighted soft preferences rank, reasons explain.

This is VMRC's idea (seed 001): the user describes what they need and gets a
ranked list with why each image scored what it did — Glance and AMIs only list.
Score = Σ weight × satisfaction, satisfaction in [0, 1]; numeric preferences
(newest, popular, smallest) are min–max normalised over the candidates.
When few or none match, `MatchReport.eliminated` says which requirement removed
how many of the images the caller can see, applied one after another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from rain.catalog.search import ImageQuery, SearchCatalog
from rain.catalog.versions import VersionConstraint
from rain.model import Image, InvalidRequest, User
from rain.model.units import format_bytes_exact

NUMERIC_PREFS = {"newest", "popular", "smallest"}
# One requirement in the elimination count: its label, then the query and the
# release test with it and every requirement before it.
Step = tuple[str, ImageQuery, Callable[[Image], bool]]


@dataclass
class Requirements:
    os_distro: str | None = None
    release: str | None = None  # "12", ">=11", "<13"
    arch: str | None = None
    packages: list[str] = field(default_factory=list)
    min_disk: int | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class Preference:
    """`tag:hpc`, `package:python3-numpy>=1.24`, `property:k=v`, `base`, `newest`, ..."""

    spec: str
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> Preference:
        spec, sep, weight = text.rpartition("=")
        if sep and _is_number(weight) and spec:
            return cls(spec, float(weight))
        return cls(text, 1.0)


@dataclass
class Match:
    image: Image
    score: float
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image.to_dict(), "score": round(self.score, 4),
                "reasons": self.reasons}


@dataclass
class MatchReport:
    matches: list[Match]
    candidates: int  # active images the caller may see, before any requirement
    eliminated: list[dict[str, Any]]  # {"requirement", "removed", "left"}, in order

    def to_dict(self) -> dict[str, Any]:
        return {"matches": [m.to_dict() for m in self.matches], "candidates": self.candidates,
                "eliminated": self.eliminated}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _satisfaction(pref: Preference, image: Image) -> tuple[float, str]:
    kind, _, arg = pref.spec.partition(":")
    if kind == "tag":
        return (1.0 if arg in image.tags else 0.0), f"tag {arg}"
    if kind == "package":
        c = VersionConstraint.parse(arg)
        have = image.packages.get(c.name)
        ok = c.satisfied_by(have)
        return (1.0 if ok else 0.0), f"package {c}" + (f" (has {have})" if have else "")
    if kind == "property":
        key, _, value = arg.partition("=")
        return (1.0 if image.properties.get(key) == value else 0.0), f"property {key}={value}"
    if kind == "base":
        return (1.0 if image.base else 0.0), "base image"
    if kind == "arch":
        return (1.0 if image.arch == arg else 0.0), f"arch {arg}"
    if kind == "release":
        rc = VersionConstraint.parse("x" + arg if arg[:1] in "<>=!" else f"x=={arg}")
        return (1.0 if rc.satisfied_by(image.os_release) else 0.0), f"release {arg}"
    raise InvalidRequest(f"unknown preference {pref.spec!r}; use tag:, package:, property:, "
                         "arch:, release:, base, newest, popular or smallest")


def rank(images: list[Image], prefs: list[Preference]) -> list[Match]:
    numeric: dict[str, dict[str, float]] = {}
    for p in prefs:
        if p.spec in NUMERIC_PREFS:
            values = {i.id: _numeric_value(p.spec, i) for i in images}
            lo, hi = min(values.values(), default=0.0), max(values.values(), default=0.0)
            numeric[p.spec] = {k: (v - lo) / (hi - lo) if hi > lo else 1.0
                               for k, v in values.items()}
    out: list[Match] = []
    for image in images:
        score, reasons = 0.0, []
        for p in prefs:
            if p.spec in NUMERIC_PREFS:
                sat, label = numeric[p.spec][image.id], p.spec
            else:
                sat, label = _satisfaction(p, image)
            gained = p.weight * sat
            score += gained
            reasons.append(f"{'+' if gained > 0 else ' '}{gained:.2f} {label}"
                           + ("" if sat in (0.0, 1.0) else f" ({sat:.2f} of {p.weight:g})"))
        out.append(Match(image, score, reasons))
    out.sort(key=lambda m: (-m.score, -(m.image.created.timestamp() if m.image.created else 0)))
    return out


def _numeric_value(kind: str, image: Image) -> float:
    if kind == "newest":
        return image.created.timestamp() if image.created else 0.0
    if kind == "popular":
        return float(image.access_count)
    return -float(image.virtual_size or image.size or 0)  # smallest


class MatchCatalog(SearchCatalog):
    def match(self, req: Requirements, prefs: list[Preference], viewer: User | None,
              limit: int = 20) -> list[Match]:
        for p in prefs:  # fail fast on a typo, even when no image matches
            if p.spec not in NUMERIC_PREFS and p.spec.partition(":")[0] not in {
                    "tag", "package", "property", "base", "arch", "release"}:
                raise InvalidRequest(f"unknown preference {p.spec!r}")
        q = ImageQuery(os_distro=req.os_distro, arch=req.arch, packages=list(req.packages),
                       tags=list(req.tags), min_virtual_size=req.min_disk, status=["active"],
                       limit=1000)
        images, _ = self.search(q, viewer)
        release = _release_test(req.release)
        return rank([i for i in images if release(i)], prefs)[:limit]

    def match_report(self, req: Requirements, prefs: list[Preference], viewer: User | None,
                     limit: int = 20) -> MatchReport:
        """The matches, and how many candidates each requirement removed."""
        matches = self.match(req, prefs, viewer, limit)
        everything = ImageQuery(status=["active"], limit=1000)
        left = candidates = self._count(everything, _any_release, viewer)
        eliminated = []
        for label, q, release in self._steps(req, everything):
            now = self._count(q, release, viewer)
            eliminated.append({"requirement": label, "removed": left - now, "left": now})
            left = now
        return MatchReport(matches, candidates, eliminated)

    @staticmethod
    def _steps(req: Requirements, q: ImageQuery) -> list[Step]:
        """The requirements, one `Step` each, in the order they are counted."""
        steps: list[Step] = []
        release: Callable[[Image], bool] = _any_release
        if req.os_distro:
            q = replace(q, os_distro=req.os_distro)
            steps.append((f"os_distro {req.os_distro}", q, release))
        if req.release:
            release = _release_test(req.release)
            steps.append((f"release {req.release}", q, release))
        if req.arch:
            q = replace(q, arch=req.arch)
            steps.append((f"arch {req.arch}", q, release))
        if req.min_disk is not None:
            q = replace(q, min_virtual_size=req.min_disk)
            steps.append((f"min_disk {format_bytes_exact(req.min_disk)}", q, release))
        for tag in req.tags:
            q = replace(q, tags=[*q.tags, tag])
            steps.append((f"tag {tag}", q, release))
        for package in req.packages:
            q = replace(q, packages=[*q.packages, package])
            steps.append((f"package {package}", q, release))
        return steps

    def _count(self, q: ImageQuery, release: Callable[[Image], bool],
               viewer: User | None) -> int:
        if release is _any_release:
            return self.search(replace(q, limit=1), viewer)[1]
        images, _ = self.search(q, viewer)  # release ranges are compared here, not in SQL
        return sum(1 for i in images if release(i))


def _any_release(_image: Image) -> bool:
    return True


def _release_test(text: str | None) -> Callable[[Image], bool]:
    """`12`, `>=11`, `<13`: a test of an image's os_release."""
    if not text:
        return _any_release
    c = VersionConstraint.parse("release" + (text if text[:1] in "<>=!" else f"=={text}"))
    return lambda i: bool(i.os_release) and c.satisfied_by(i.os_release)
