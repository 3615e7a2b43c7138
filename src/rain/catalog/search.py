"""Search: filters over every catalog field, visibility, sorting and pagination.

Visibility is part of every query (never a post-filter), so a user can neither
list nor resolve nor count an image they may not see.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, false, func, or_, select, true
from sqlalchemy.sql import Select

from rain.catalog.db import Database
from rain.catalog.images import image_model
from rain.catalog.schema import (
    GroupRow,
    ImageRow,
    MemberRow,
    PackageRow,
    PropertyRow,
    TagRow,
    UserRow,
)
from rain.catalog.versions import VersionConstraint
from rain.model import Image, ImageStatus, InvalidRequest, User
from rain.model.clock import utcnow

SORT_FIELDS = {
    "name": ImageRow.name, "created": ImageRow.created, "updated": ImageRow.updated,
    "size": ImageRow.size, "virtual_size": ImageRow.virtual_size,
    "last_access": ImageRow.last_access, "access_count": ImageRow.access_count,
    "stored_bytes": ImageRow.stored_bytes, "version": ImageRow.version,
}
# A purged image keeps its metadata in view: pulling it rebuilds it.
DEFAULT_STATUSES = (ImageStatus.ACTIVE, ImageStatus.DEACTIVATED, ImageStatus.PURGED)
OWNER_STATUSES = (ImageStatus.QUEUED, ImageStatus.SAVING, ImageStatus.ACTIVE,
                  ImageStatus.DEACTIVATED, ImageStatus.PURGED)


@dataclass
class ImageQuery:
    name: str | None = None  # exact, or a glob with '*'
    text: str | None = None  # substring of name or description
    owner: str | None = None
    visibility: str | None = None
    status: list[str] = field(default_factory=list)
    os_distro: str | None = None
    os_release: str | None = None
    arch: str | None = None
    disk_format: str | None = None
    tags: list[str] = field(default_factory=list)
    properties: dict[str, str] = field(default_factory=dict)
    packages: list[str] = field(default_factory=list)
    min_size: int | None = None  # the image file's bytes (`size`)
    max_size: int | None = None
    min_virtual_size: int | None = None  # the disk the guest sees (`virtual_size`)
    max_virtual_size: int | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    unused_for: timedelta | None = None
    base: bool | None = None
    parent: str | None = None
    template_digest: str | None = None
    sort: str = "created"
    descending: bool = True
    limit: int = 100
    offset: int = 0

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> ImageQuery:
        q = cls()
        for key, value in params.items():
            if value is None or not hasattr(q, key):
                continue
            setattr(q, key, value)
        if q.sort.startswith("-"):
            q.sort, q.descending = q.sort[1:], True
        elif q.sort.startswith("+"):
            q.sort, q.descending = q.sort[1:], False
        if q.sort not in SORT_FIELDS:
            raise InvalidRequest(f"cannot sort by {q.sort!r}; use one of "
                                 f"{', '.join(sorted(SORT_FIELDS))}")
        if not 1 <= q.limit <= 1000 or q.offset < 0:
            raise InvalidRequest("limit must be 1..1000 and offset >= 0")
        return q


def member_clause(viewer: User) -> ColumnElement[bool]:
    """The image is shared with the viewer, by name or through one of their groups."""
    return exists().where(
        MemberRow.image_id == ImageRow.id,
        or_(MemberRow.user_id == viewer.id,
            MemberRow.group_id.in_(select(GroupRow.id).where(GroupRow.name.in_(viewer.groups)))
            if viewer.groups else false()),
    )


def visible_clause(viewer: User | None) -> ColumnElement[bool]:
    if viewer is None:
        return and_(ImageRow.visibility == "public",
                    ImageRow.status.in_([str(s) for s in DEFAULT_STATUSES]))
    if viewer.is_admin:
        return true()
    member = member_clause(viewer)
    others = and_(
        ImageRow.status.in_([str(s) for s in DEFAULT_STATUSES]),
        or_(ImageRow.visibility == "public", and_(ImageRow.visibility == "shared", member)),
    )
    own = and_(ImageRow.owner_id == viewer.id,
               ImageRow.status.in_([str(s) for s in OWNER_STATUSES]))
    return or_(own, others)


class SearchCatalog:
    db: Database

    def _filtered(self, q: ImageQuery, viewer: User | None) -> Select[ImageRow]:
        stmt = select(ImageRow).where(visible_clause(viewer))
        statuses = q.status or [str(s) for s in DEFAULT_STATUSES]
        if "any" not in statuses:
            stmt = stmt.where(ImageRow.status.in_(statuses))
        if viewer is None or not viewer.is_admin or "deleted" not in statuses:
            stmt = stmt.where(ImageRow.status != "deleted")
        if q.name:
            stmt = stmt.where(ImageRow.name.like(q.name.replace("*", "%")) if "*" in q.name
                              else ImageRow.name == q.name)
        if q.text:
            like = f"%{q.text}%"
            stmt = stmt.where(or_(ImageRow.name.like(like), ImageRow.description.like(like)))
        if q.owner:
            stmt = stmt.where(ImageRow.owner.has(UserRow.name == q.owner))
        for attr in ("visibility", "os_distro", "os_release", "arch", "disk_format",
                     "template_digest"):
            value = getattr(q, attr)
            if value:
                stmt = stmt.where(getattr(ImageRow, attr) == value)
        if q.parent:
            stmt = stmt.where(ImageRow.parent_id == q.parent)
        if q.base is not None:
            stmt = stmt.where(ImageRow.is_base == q.base)
        for tag in q.tags:
            stmt = stmt.where(exists().where(TagRow.image_id == ImageRow.id, TagRow.tag == tag))
        for key, value in q.properties.items():
            stmt = stmt.where(exists().where(PropertyRow.image_id == ImageRow.id,
                                             PropertyRow.key == key, PropertyRow.value == value))
        for constraint in self._constraints(q):
            stmt = stmt.where(exists().where(PackageRow.image_id == ImageRow.id,
                                             PackageRow.name == constraint.name))
        if q.min_size is not None:
            stmt = stmt.where(ImageRow.size >= q.min_size)
        if q.max_size is not None:
            stmt = stmt.where(ImageRow.size <= q.max_size)
        disk = func.coalesce(ImageRow.virtual_size, ImageRow.size)  # raw: the same
        if q.min_virtual_size is not None:
            stmt = stmt.where(disk >= q.min_virtual_size)
        if q.max_virtual_size is not None:
            stmt = stmt.where(disk <= q.max_virtual_size)
        if q.created_after is not None:
            stmt = stmt.where(ImageRow.created >= q.created_after)
        if q.created_before is not None:
            stmt = stmt.where(ImageRow.created <= q.created_before)
        if q.unused_for is not None:
            cutoff = utcnow() - q.unused_for
            stmt = stmt.where(func.coalesce(ImageRow.last_access, ImageRow.created) < cutoff)
        return stmt

    @staticmethod
    def _constraints(q: ImageQuery) -> list[VersionConstraint]:
        return [VersionConstraint.parse(p) for p in q.packages]

    def search(self, q: ImageQuery, viewer: User | None) -> tuple[list[Image], int]:
        """One page of images the viewer may see, and the total number matching."""
        stmt = self._filtered(q, viewer)
        col = SORT_FIELDS[q.sort]
        order = [col.desc().nulls_last() if q.descending else col.asc().nulls_first(),
                 ImageRow.id]
        constraints = [c for c in self._constraints(q) if c.op]
        with self.db.session() as s:
            if not constraints:
                total = s.scalar(select(func.count()).select_from(stmt.subquery())) or 0
                rows = s.scalars(stmt.order_by(*order).limit(q.limit).offset(q.offset)).all()
                return [image_model(r) for r in rows], total
            # Version ranges are compared the dpkg way, in Python, after SQL narrowed it down.
            images = [image_model(r) for r in s.scalars(stmt.order_by(*order)).all()]
        images = [i for i in images
                  if all(c.satisfied_by(i.packages.get(c.name)) for c in constraints)]
        return images[q.offset : q.offset + q.limit], len(images)
