"""Images, users and usage as plain dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class Visibility(StrEnum):
    PRIVATE = "private"
    SHARED = "shared"
    PUBLIC = "public"


class ImageStatus(StrEnum):
    QUEUED = "queued"
    SAVING = "saving"
    ACTIVE = "active"
    KILLED = "killed"
    DEACTIVATED = "deactivated"
    DELETED = "deleted"
    # Content dropped, metadata and template kept: pulling it rebuilds it first.
    PURGED = "purged"


class DiskFormat(StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"
    VMDK = "vmdk"
    VPC = "vpc"
    VHDX = "vhdx"
    VDI = "vdi"
    ISO = "iso"


@dataclass(frozen=True)
class Member:
    """Who an image is shared with: exactly one of user or group is set."""

    user: str | None = None
    group: str | None = None


@dataclass
class User:
    id: int
    name: str
    is_admin: bool = False
    groups: list[str] = field(default_factory=list)
    quota_bytes: int | None = None
    quota_images: int | None = None
    disabled: bool = False
    created: datetime | None = None
    deleted: datetime | None = None  # a deleted user is kept as a tombstone
    # Set when the credential is a node token: the caller is node agent `node`, not a
    # user, and every check that wants a user refuses it (rain.repo.access).
    node: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "admin": self.is_admin, "groups": list(self.groups),
                "quota_bytes": self.quota_bytes, "quota_images": self.quota_images,
                "disabled": self.disabled, "created": _iso(self.created),
                "deleted": _iso(self.deleted)}


@dataclass
class Group:
    name: str
    members: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "members": list(self.members)}


@dataclass
class ApiToken:
    """A token as listings show it: never its secret. Exactly one of `user` (a user's
    token) and `node` (a node agent's credential) is set."""

    id: int
    label: str
    created: datetime
    last_used: datetime | None = None
    user: str | None = None
    node: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "label": self.label, "user": self.user, "node": self.node,
                "created": _iso(self.created), "last_used": _iso(self.last_used)}


@dataclass
class Image:
    id: str
    name: str
    owner: str
    version: str = ""
    description: str = ""
    visibility: Visibility = Visibility.PRIVATE
    status: ImageStatus = ImageStatus.QUEUED
    os_distro: str = ""
    os_release: str = ""
    arch: str = ""
    disk_format: DiskFormat | None = None
    virtual_size: int | None = None
    size: int | None = None
    stored_bytes: int = 0
    sha256: str | None = None
    tags: list[str] = field(default_factory=list)
    properties: dict[str, str] = field(default_factory=dict)
    packages: dict[str, str] = field(default_factory=dict)
    members: list[Member] = field(default_factory=list)
    template_digest: str | None = None
    # For built images: the template text, the texts of the templates it
    # extends (nearest first), the build that made the current content and
    # the seconds that build spent in each phase.
    template: str | None = None
    template_parents: list[str] = field(default_factory=list)
    build_id: str | None = None
    build_timings: dict[str, float] = field(default_factory=dict)
    parent: str | None = None
    base: bool = False
    protected: bool = False
    created: datetime | None = None
    updated: datetime | None = None
    last_access: datetime | None = None
    access_count: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form used by the API and `--json` output."""
        return {
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "owner": self.owner,
            "visibility": str(self.visibility),
            "status": str(self.status),
            "os_distro": self.os_distro,
            "os_release": self.os_release,
            "arch": self.arch,
            "disk_format": str(self.disk_format) if self.disk_format else None,
            "virtual_size": self.virtual_size,
            "size": self.size,
            "stored_bytes": self.stored_bytes,
            "sha256": self.sha256,
            "tags": sorted(self.tags),
            "properties": dict(self.properties),
            "packages": dict(self.packages),
            "members": [
                {"user": m.user} if m.user else {"group": m.group} for m in self.members
            ],
            "template_digest": self.template_digest,
            "template": self.template,
            "template_parents": list(self.template_parents),
            "build_id": self.build_id,
            "build_timings": dict(self.build_timings),
            "parent": self.parent,
            "base": self.base,
            "protected": self.protected,
            "created": _iso(self.created),
            "updated": _iso(self.updated),
            "last_access": _iso(self.last_access),
            "access_count": self.access_count,
        }


@dataclass
class UsageRecord:
    image_id: str
    image_name: str
    user: str
    action: str
    bytes: int
    at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_id": self.image_id,
            "image_name": self.image_name,
            "user": self.user,
            "action": self.action,
            "bytes": self.bytes,
            "at": _iso(self.at),
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
