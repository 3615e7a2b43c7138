"""Catalog tables (SQLAlchemy 2 ORM). Alembic migrations in `migrations/` create them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class UserRow(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    quota_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    quota_images: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # A disabled user's tokens answer 401; a deleted one is a tombstone: no tokens, no
    # groups, its name kept so what it left (deleted images, usage) still names it.
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    deleted: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    groups: Mapped[list[GroupRow]] = relationship(
        secondary="group_members", back_populates="users", lazy="selectin"
    )


class GroupRow(Base):
    __tablename__ = "groups"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    users: Mapped[list[UserRow]] = relationship(
        secondary="group_members", back_populates="groups"
    )


class GroupMemberRow(Base):
    __tablename__ = "group_members"
    group_id: Mapped[int] = mapped_column(
        ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )


class TokenRow(Base):
    """A user's token, or (`node` set, no user) a node agent's credential."""

    __tablename__ = "tokens"
    # Ids are what `rain token revoke` takes: SQLite must not hand a revoked one out again.
    __table_args__ = {"sqlite_autoincrement": True}
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True, nullable=True)
    node: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str] = mapped_column(String(128), default="")
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_used: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ImageRow(Base):
    __tablename__ = "images"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), index=True)
    version: Mapped[str] = mapped_column(String(64), default="")
    description: Mapped[str] = mapped_column(Text, default="")
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    visibility: Mapped[str] = mapped_column(String(16), default="private", index=True)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    os_distro: Mapped[str] = mapped_column(String(64), default="", index=True)
    os_release: Mapped[str] = mapped_column(String(64), default="")
    arch: Mapped[str] = mapped_column(String(32), default="")
    disk_format: Mapped[str | None] = mapped_column(String(16), nullable=True)
    virtual_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    stored_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    manifest_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    template_digest: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    template_text: Mapped[str | None] = mapped_column(Text, nullable=True)
    template_parents: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    build_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    build_timings: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    parent_id: Mapped[str | None] = mapped_column(
        ForeignKey("images.id", ondelete="SET NULL"), nullable=True
    )
    is_base: Mapped[bool] = mapped_column(Boolean, default=False)
    protected: Mapped[bool] = mapped_column(Boolean, default=False)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    updated: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_access: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    access_count: Mapped[int] = mapped_column(Integer, default=0)

    owner: Mapped[UserRow] = relationship(lazy="joined")
    tags: Mapped[list[TagRow]] = relationship(cascade="all, delete-orphan", lazy="selectin")
    properties: Mapped[list[PropertyRow]] = relationship(
        cascade="all, delete-orphan", lazy="selectin"
    )
    packages: Mapped[list[PackageRow]] = relationship(
        cascade="all, delete-orphan", lazy="selectin"
    )
    members: Mapped[list[MemberRow]] = relationship(cascade="all, delete-orphan", lazy="selectin")


class TagRow(Base):
    __tablename__ = "image_tags"
    image_id: Mapped[str] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(128), primary_key=True, index=True)


class PropertyRow(Base):
    __tablename__ = "image_properties"
    image_id: Mapped[str] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[str] = mapped_column(Text, default="")


class PackageRow(Base):
    __tablename__ = "image_packages"
    image_id: Mapped[str] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(128), primary_key=True, index=True)
    version: Mapped[str] = mapped_column(String(128), default="")


class MemberRow(Base):
    __tablename__ = "image_members"
    __table_args__ = (UniqueConstraint("image_id", "user_id", "group_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    image_id: Mapped[str] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=True
    )
    group_id: Mapped[int | None] = mapped_column(
        ForeignKey("groups.id", ondelete="CASCADE"), nullable=True
    )
    user: Mapped[UserRow | None] = relationship(lazy="joined")
    group: Mapped[GroupRow | None] = relationship(lazy="joined")


class VariantRow(Base):
    """A converted copy of an image (e.g. its qcow2 form), kept to serve the next pull."""

    __tablename__ = "image_variants"
    image_id: Mapped[str] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    disk_format: Mapped[str] = mapped_column(String(16), primary_key=True)
    manifest_id: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    stored_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class UsageRow(Base):
    __tablename__ = "usage"
    __table_args__ = (Index("ix_usage_image_at", "image_id", "at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    image_id: Mapped[str] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), nullable=True, index=True
    )
    action: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class BuildRow(Base):
    """A build job. The log is deferred: lists and polls read slices of it in SQL."""

    __tablename__ = "builds"
    __table_args__ = (Index("ix_builds_status_created", "status", "created"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    template_digest: Mapped[str] = mapped_column(String(64), index=True)
    template_text: Mapped[str] = mapped_column(Text)
    template_parents: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    phase: Mapped[str] = mapped_column(String(32), default="")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    log: Mapped[str] = mapped_column(Text, default="", deferred=True)
    log_size: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    image_id: Mapped[str | None] = mapped_column(
        ForeignKey("images.id", ondelete="SET NULL"), nullable=True, index=True)
    rebuild_of: Mapped[str | None] = mapped_column(
        ForeignKey("images.id", ondelete="SET NULL"), nullable=True, index=True)
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    cached: Mapped[bool] = mapped_column(Boolean, default=False)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Which server process runs it ("host:pid") and when that process last said so:
    # how a restarted or surviving server tells a dead build from a live one.
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    heartbeat: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    owner: Mapped[UserRow] = relationship(lazy="joined")


class NodeRow(Base):
    """A registered node agent, as of its last report. `agent_key` is the bearer token the
    repository sends when it calls the agent: stored in clear because it must be sent, and
    never returned by the API."""

    __tablename__ = "nodes"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    address: Mapped[str] = mapped_column(String(255))
    agent_key: Mapped[str] = mapped_column(String(128))
    owner_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), nullable=True)
    capacity_instances: Mapped[int] = mapped_column(Integer, default=0)
    running_instances: Mapped[int] = mapped_column(Integer, default=0)
    cache_capacity: Mapped[int] = mapped_column(BigInteger, default=0)
    cache_used: Mapped[int] = mapped_column(BigInteger, default=0)
    cache_pinned: Mapped[int] = mapped_column(BigInteger, default=0)
    cached: Mapped[list[str]] = mapped_column(JSON, default=list)
    in_flight: Mapped[list[str]] = mapped_column(JSON, default=list)
    version: Mapped[str] = mapped_column(String(64), default="")
    registered: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_heartbeat: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DeploymentRow(Base):
    __tablename__ = "deployments"
    __table_args__ = (Index("ix_deployments_image_created", "image_id", "created"),
                      Index("ix_deployments_created", "created"))
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    image_id: Mapped[str] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    method: Mapped[str] = mapped_column(String(16))
    count: Mapped[int] = mapped_column(Integer)
    nodes: Mapped[list[str]] = mapped_column(JSON, default=list)
    status: Mapped[str] = mapped_column(String(16))
    report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    prefetch: Mapped[bool] = mapped_column(Boolean, default=False)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    owner: Mapped[UserRow] = relationship(lazy="joined")


class InstanceRow(Base):
    __tablename__ = "instances"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    deployment_id: Mapped[str] = mapped_column(
        ForeignKey("deployments.id", ondelete="CASCADE"), index=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    # No foreign key: a node may be removed while the record of its instances stays.
    node: Mapped[str] = mapped_column(String(64), index=True)
    image_id: Mapped[str] = mapped_column(String(36))
    status: Mapped[str] = mapped_column(String(16))
    disk: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ready: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    owner: Mapped[UserRow] = relationship(lazy="joined")


class TorrentRow(Base):
    """The .torrent (bencoded metainfo) of an image's stored content."""

    __tablename__ = "image_torrents"
    image_id: Mapped[str] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    info_hash: Mapped[str] = mapped_column(String(64))
    piece_size: Mapped[int] = mapped_column(Integer)
    torrent: Mapped[bytes] = mapped_column(LargeBinary)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
