"""Image references: the one rule every command and endpoint resolves them by.

A reference is an image id, a unique prefix of one, or `name[:version]`. A
name is looked up tier by tier through the viewer's visibility — their own
images, then images shared with them (as a user or through a group), then
public ones, then (admins only) everyone else's — and the first tier with a
match decides. Within that tier every candidate must have one owner, or the
reference is refused as ambiguous with the candidates' ids: otherwise anyone
could publish an image named like someone else's and have it pulled instead
(name squatting). Without a version, the tier's newest one wins: active
before any other status, then the highest version in dpkg order, then the
latest created.

Precedence: a full id, then a name, then an id prefix (at least
MIN_PREFIX hex digits). New names cannot look like an id prefix
(rain.repo.metadata), so a name and a prefix only meet in older catalogs.
Prefixes only ever match what the viewer may see, so an ambiguous or unknown
prefix reveals nothing about other users' images.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

from sqlalchemy import ColumnElement, and_, or_, select, true
from sqlalchemy.orm import InstrumentedAttribute

from rain.catalog.images import image_model
from rain.catalog.schema import ImageRow
from rain.catalog.search import ImageQuery, SearchCatalog, member_clause, visible_clause
from rain.catalog.versions import compare_versions
from rain.model import AmbiguousReference, Image, ImageStatus, NotFound, User

MIN_PREFIX = 4
MAX_PREFIX_MATCHES = 1000
MAX_LISTED = 10
_PREFIX = re.compile(r"[0-9a-f][0-9a-f-]{3,35}")
TIERS = ("your own", "shared with you", "public", "other users'")


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


T = TypeVar("T", bound=_HasId)


def is_id_prefix(ref: str) -> bool:
    """Whether `ref` can be read as the start of a (UUID) id: ≥ MIN_PREFIX hex digits."""
    ref = ref.lower()
    return bool(_PREFIX.fullmatch(ref)) and sum(c != "-" for c in ref) >= MIN_PREFIX


def unique_prefix(kind: str, ref: str, candidates: Sequence[T],
                  describe: Callable[[T], str]) -> T:
    """The one candidate an id prefix matches; NotFound for none, AmbiguousReference
    listing them for several. `candidates` must already be what the viewer may see."""
    if not candidates:
        raise NotFound(f"no {kind} {ref!r}")
    if len(candidates) > 1:
        listed = [describe(c) for c in candidates[:MAX_LISTED]]
        more = f" and {len(candidates) - MAX_LISTED} more" if len(candidates) > MAX_LISTED else ""
        raise AmbiguousReference(
            f"{kind} id prefix {ref!r} is ambiguous: it matches {len(candidates)} {kind}s "
            f"({', '.join(listed)}{more}); give more of the id",
            details={"candidates": [c.id for c in candidates]})
    return candidates[0]


def ids_with_prefix(session: Any, column: InstrumentedAttribute[str], prefix: str,
                    *where: ColumnElement[bool]) -> list[str]:
    """Ids in `column` starting with `prefix` (already checked by is_id_prefix, so it
    holds no LIKE wildcards), under the extra `where` conditions, in id order."""
    stmt = select(column).where(column.like(prefix.lower() + "%"), *where)
    return list(session.scalars(stmt.order_by(column).limit(MAX_PREFIX_MATCHES)))


def tier(image: Image, viewer: User | None) -> int:
    """0 own, 1 shared with the viewer, 2 public, 3 anything else an admin sees."""
    if viewer is not None and image.owner == viewer.name:
        return 0
    if viewer is not None and any(m.user == viewer.name or (m.group and m.group in viewer.groups)
                                  for m in image.members):
        return 1
    return 2 if str(image.visibility) == "public" else 3


def describe_image(image: Image) -> str:
    version = f":{image.version}" if image.version else ""
    return f"{image.id} ({image.owner}'s {image.name}{version}, {image.visibility})"


def newest(images: Iterable[Image], *, by_version: bool) -> Image:
    """Active first; then (without a version asked for) the highest version, dpkg order;
    then the latest created."""
    def key(i: Image) -> tuple[Any, ...]:
        created = i.created.timestamp() if i.created else 0.0
        return (i.status == ImageStatus.ACTIVE, _VersionKey(i.version if by_version else ""),
                created)
    return max(images, key=key)


class ReferenceCatalog(SearchCatalog):
    def resolve(self, ref: str, viewer: User | None, *, statuses: tuple[str, ...] = ()) -> Image:
        """The image `ref` names for the viewer (module docstring); NotFound for what the
        viewer may not see, AmbiguousReference (409) when the rule cannot choose."""
        exact = self.visible_image(ref, viewer)
        if exact is not None:
            return exact
        name, _, version = ref.partition(":")
        if name and "*" not in name:
            named = self._named(name, version, viewer, list(statuses) or ["any"])
            if named:
                return self._choose(ref, named, viewer, by_version=not version)
        if not version and is_id_prefix(ref):
            with self.db.session() as s:
                ids = ids_with_prefix(s, ImageRow.id, ref, visible_clause(viewer),
                                      ImageRow.status != "deleted")
                found = [image_model(r) for r in s.scalars(
                    select(ImageRow).where(ImageRow.id.in_(ids)).order_by(ImageRow.id))]
            return unique_prefix("image", ref, found, describe_image)
        raise NotFound(f"no image {ref!r}")

    def _named(self, name: str, version: str, viewer: User | None,
               statuses: list[str]) -> list[Image]:
        stmt = self._filtered(ImageQuery(name=name, status=statuses), viewer)
        if version:
            stmt = stmt.where(ImageRow.version == version)
        with self.db.session() as s:
            rows = s.scalars(stmt.order_by(ImageRow.created.desc()).limit(1000)).all()
            return [image_model(r) for r in rows]

    @staticmethod
    def _choose(ref: str, images: list[Image], viewer: User | None, *,
                by_version: bool) -> Image:
        first = min(tier(i, viewer) for i in images)
        here = [i for i in images if tier(i, viewer) == first]
        owners = sorted({i.owner for i in here})
        if len(owners) > 1:
            listed = [describe_image(newest([i for i in here if i.owner == o],
                                            by_version=by_version)) for o in owners]
            raise AmbiguousReference(
                f"image {ref!r} is ambiguous: {TIERS[first]} images of {len(owners)} owners "
                f"match ({'; '.join(listed[:MAX_LISTED])}); use an id or an id prefix",
                details={"candidates": [i.id for i in here]})
        return newest(here, by_version=by_version)

    def image_with_template(self, digest: str, viewer: User | None,
                            status: ImageStatus = ImageStatus.ACTIVE) -> Image | None:
        """The image with this template digest and status the viewer would reach first:
        their own, then shared with them, then public (the newest within a tier)."""
        images, _ = self.search(ImageQuery(template_digest=digest, status=[str(status)],
                                           limit=1000), viewer)
        if not images:
            return None
        first = min(tier(i, viewer) for i in images)
        return newest([i for i in images if tier(i, viewer) == first], by_version=False)

    def visible_image(self, image_id: str, viewer: User | None) -> Image | None:
        """The image with exactly this id, if the viewer may see it."""
        with self.db.session() as s:
            row = s.scalar(select(ImageRow).where(ImageRow.id == image_id, visible_clause(viewer),
                                                  ImageRow.status != "deleted"))
            return image_model(row) if row is not None else None

    def deleted_image(self, image_id: str, viewer: User | None) -> Image | None:
        """A deleted image the viewer could see before it was deleted (pedigrees show it)."""
        if viewer is None:
            seen: ColumnElement[bool] = ImageRow.visibility == "public"
        elif viewer.is_admin:
            seen = true()
        else:
            seen = or_(ImageRow.owner_id == viewer.id, ImageRow.visibility == "public",
                       and_(ImageRow.visibility == "shared", member_clause(viewer)))
        with self.db.session() as s:
            row = s.scalar(select(ImageRow).where(ImageRow.id == image_id,
                                                  ImageRow.status == "deleted", seen))
            return image_model(row) if row is not None else None

    def visible_image_ids(self, ids: Iterable[str], viewer: User | None) -> set[str]:
        """Those of `ids` the viewer may see (e.g. in a node's cache list)."""
        wanted = list(dict.fromkeys(ids))
        found: set[str] = set()
        with self.db.session() as s:
            for start in range(0, len(wanted), 500):
                found |= set(s.scalars(select(ImageRow.id).where(
                    ImageRow.id.in_(wanted[start:start + 500]), visible_clause(viewer),
                    ImageRow.status != "deleted")))
        return found


class _VersionKey:
    __slots__ = ("v",)

    def __init__(self, v: str) -> None:
        self.v = v

    def __lt__(self, other: _VersionKey) -> bool:
        return compare_versions(self.v, other.v) < 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _VersionKey) and compare_versions(self.v, other.v) == 0
