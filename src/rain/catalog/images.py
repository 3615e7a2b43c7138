"""Image records: create, read, update, members, tags, properties, packages, variants."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from rain.catalog.db import Database, as_utc
from rain.catalog.schema import (
    GroupRow,
    ImageRow,
    MemberRow,
    PackageRow,
    PropertyRow,
    TagRow,
    UserRow,
    VariantRow,
)
from rain.model import (
    DiskFormat,
    Image,
    ImageStatus,
    InvalidRequest,
    Member,
    NotFound,
    User,
    Visibility,
)
from rain.model.clock import utcnow

# Fields a caller may set directly on the image row (the rest have their own methods).
ROW_FIELDS = {
    "name", "version", "description", "visibility", "status", "os_distro", "os_release", "arch",
    "disk_format", "virtual_size", "size", "stored_bytes", "sha256", "manifest_id",
    "template_digest", "parent_id", "is_base", "protected", "last_access", "access_count",
    "created", "template_text", "template_parents", "build_id", "build_timings",
}


@dataclass
class Variant:
    disk_format: DiskFormat
    manifest_id: str
    sha256: str
    size: int
    stored_bytes: int


def image_model(row: ImageRow) -> Image:
    members = [
        Member(user=m.user.name) if m.user is not None else Member(group=m.group.name if m.group
                                                                  else None)
        for m in row.members
    ]
    return Image(
        id=row.id, name=row.name, owner=row.owner.name, version=row.version,
        description=row.description, visibility=Visibility(row.visibility),
        status=ImageStatus(row.status), os_distro=row.os_distro, os_release=row.os_release,
        arch=row.arch, disk_format=DiskFormat(row.disk_format) if row.disk_format else None,
        virtual_size=row.virtual_size, size=row.size, stored_bytes=row.stored_bytes,
        sha256=row.sha256, tags=sorted(t.tag for t in row.tags),
        properties={p.key: p.value for p in row.properties},
        packages={p.name: p.version for p in row.packages}, members=members,
        template_digest=row.template_digest, template=row.template_text,
        template_parents=list(row.template_parents or []), build_id=row.build_id,
        build_timings={str(k): float(v) for k, v in (row.build_timings or {}).items()},
        parent=row.parent_id, base=row.is_base,
        protected=row.protected, created=as_utc(row.created), updated=as_utc(row.updated),
        last_access=as_utc(row.last_access), access_count=row.access_count,
    )


class ImageCatalog:
    db: Database

    def create_image(self, owner: User, *, name: str, tags: Iterable[str] = (),
                     properties: dict[str, str] | None = None,
                     packages: dict[str, str] | None = None, **fields: Any) -> Image:
        bad = set(fields) - ROW_FIELDS
        if bad:
            raise InvalidRequest(f"unknown image fields: {', '.join(sorted(bad))}")
        if not name or len(name) > 255:
            raise InvalidRequest("an image needs a name of 1-255 characters")
        now = utcnow()
        with self.db.session() as s:
            row = ImageRow(id=str(uuid.uuid4()), name=name, owner_id=owner.id, created=now,
                           updated=now, stored_bytes=0, access_count=0, is_base=False,
                           protected=False, version="", description="", os_distro="",
                           os_release="", arch="", visibility="private", status="queued")
            for key, value in fields.items():
                setattr(row, key, str(value) if isinstance(value, Visibility) else value)
            row.tags = [TagRow(tag=t) for t in sorted(set(tags))]
            row.properties = [PropertyRow(key=k, value=v) for k, v in (properties or {}).items()]
            row.packages = [PackageRow(name=k, version=v) for k, v in (packages or {}).items()]
            s.add(row)
            s.flush()
            s.refresh(row)
            return image_model(row)

    def get_image(self, image_id: str) -> Image:
        with self.db.session() as s:
            return image_model(self._image_row(s, image_id))

    def manifest_id(self, image_id: str) -> str | None:
        with self.db.session() as s:
            return self._image_row(s, image_id).manifest_id

    def update_image(self, image_id: str, **fields: Any) -> Image:
        bad = set(fields) - ROW_FIELDS
        if bad:
            raise InvalidRequest(f"unknown image fields: {', '.join(sorted(bad))}")
        with self.db.session() as s:
            row = self._image_row(s, image_id)
            for key, value in fields.items():
                setattr(row, key, str(value) if isinstance(value, Visibility | ImageStatus |
                                                           DiskFormat) else value)
            row.updated = utcnow()
            s.flush()
            return image_model(row)

    def transition(self, image_id: str, expect: Iterable[ImageStatus], to: ImageStatus,
                   **fields: Any) -> bool:
        """Compare-and-set on status, so two racing requests cannot both win."""
        values: dict[str, Any] = {"status": str(to), "updated": utcnow(), **fields}
        with self.db.session() as s:
            res = s.execute(
                update(ImageRow)
                .where(ImageRow.id == image_id, ImageRow.status.in_([str(e) for e in expect]))
                .values(**values)
            )
            return bool(res.rowcount)  # type: ignore[attr-defined]

    def edit_tags(self, image_id: str, add: Iterable[str] = (), remove: Iterable[str] = ()) -> None:
        with self.db.session() as s:
            row = self._image_row(s, image_id)
            have = {t.tag for t in row.tags}
            drop = set(remove)
            row.tags = [t for t in row.tags if t.tag not in drop]
            row.tags += [TagRow(tag=t) for t in sorted(set(add) - have - drop)]
            row.updated = utcnow()

    def edit_properties(self, image_id: str, set_: dict[str, str],
                        remove: Iterable[str] = ()) -> None:
        with self.db.session() as s:
            row = self._image_row(s, image_id)
            drop = set(remove) | set(set_)
            row.properties = [p for p in row.properties if p.key not in drop]
            s.flush()
            row.properties += [PropertyRow(key=k, value=v) for k, v in set_.items()]
            row.updated = utcnow()

    def set_packages(self, image_id: str, packages: dict[str, str]) -> None:
        with self.db.session() as s:
            s.execute(delete(PackageRow).where(PackageRow.image_id == image_id))
            s.add_all(PackageRow(image_id=image_id, name=k, version=v)
                      for k, v in packages.items())

    def add_member(self, image_id: str, *, user: str | None = None,
                   group: str | None = None) -> None:
        with self.db.session() as s:
            row = self._image_row(s, image_id)
            member = self._member_target(s, user, group)
            for m in row.members:
                if (m.user_id, m.group_id) == member:
                    return
            row.members.append(MemberRow(user_id=member[0], group_id=member[1]))
            row.updated = utcnow()

    def remove_member(self, image_id: str, *, user: str | None = None,
                      group: str | None = None) -> bool:
        with self.db.session() as s:
            row = self._image_row(s, image_id)
            member = self._member_target(s, user, group)
            before = len(row.members)
            row.members = [m for m in row.members if (m.user_id, m.group_id) != member]
            row.updated = utcnow()
            return len(row.members) != before

    def get_variant(self, image_id: str, fmt: DiskFormat) -> Variant | None:
        with self.db.session() as s:
            v = s.get(VariantRow, (image_id, str(fmt)))
            return Variant(DiskFormat(v.disk_format), v.manifest_id, v.sha256, v.size,
                           v.stored_bytes) if v else None

    def put_variant(self, image_id: str, variant: Variant) -> None:
        with self.db.session() as s:
            s.merge(VariantRow(image_id=image_id, disk_format=str(variant.disk_format),
                               manifest_id=variant.manifest_id, sha256=variant.sha256,
                               size=variant.size, stored_bytes=variant.stored_bytes,
                               created=utcnow()))

    def drop_variants(self, image_id: str) -> None:
        with self.db.session() as s:
            s.execute(delete(VariantRow).where(VariantRow.image_id == image_id))

    def live_manifest_ids(self) -> set[str]:
        """Manifests that must survive gc: every image not deleted/killed/purged, and their
        variants. (Purging also clears the image's manifest id; both guards are kept.)"""
        dead = [str(ImageStatus.DELETED), str(ImageStatus.KILLED), str(ImageStatus.PURGED)]
        with self.db.session() as s:
            ids = set(s.scalars(select(ImageRow.manifest_id).where(
                ImageRow.manifest_id.is_not(None), ImageRow.status.not_in(dead))))
            ids |= set(s.scalars(select(VariantRow.manifest_id).join(
                ImageRow, ImageRow.id == VariantRow.image_id).where(ImageRow.status.not_in(dead))))
            return {i for i in ids if i}

    def child_ids(self, image_id: str) -> list[str]:
        """Images whose parent is `image_id` and that still exist (not deleted or killed)."""
        gone = [str(ImageStatus.DELETED), str(ImageStatus.KILLED)]
        with self.db.session() as s:
            return list(s.scalars(select(ImageRow.id).where(
                ImageRow.parent_id == image_id, ImageRow.status.not_in(gone))
                .order_by(ImageRow.created, ImageRow.id)))

    def record_access(self, image_id: str, when: datetime) -> None:
        with self.db.session() as s:
            s.execute(update(ImageRow).where(ImageRow.id == image_id).values(
                access_count=ImageRow.access_count + 1, last_access=when))

    @staticmethod
    def _image_row(s: Session, image_id: str) -> ImageRow:
        row = s.get(ImageRow, image_id)
        if row is None:
            raise NotFound(f"no image {image_id!r}")
        return row

    @staticmethod
    def _member_target(s: Session, user: str | None, group: str | None) -> tuple[int | None,
                                                                                  int | None]:
        if (user is None) == (group is None):
            raise InvalidRequest("name exactly one of a user or a group")
        if user is not None:
            uid = s.scalar(select(UserRow.id).where(UserRow.name == user,
                                                      UserRow.deleted.is_(None)))
            if uid is None:
                raise NotFound(f"no user {user!r}")
            return uid, None
        gid = s.scalar(select(GroupRow.id).where(GroupRow.name == group))
        if gid is None:
            raise NotFound(f"no group {group!r}")
        return None, gid
