"""Users and groups: create, list, disable, delete (as a tombstone), membership.

A deleted user stays as a row with `deleted` set: its name stays taken, so the
images it left behind, usage records, deployments and pedigrees keep naming
who it was, and nothing that points at the row dangles. Every lookup by name
for an action skips tombstones.
"""

from __future__ import annotations

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rain.catalog.db import Database, as_utc
from rain.catalog.schema import (
    BuildRow,
    GroupMemberRow,
    GroupRow,
    ImageRow,
    MemberRow,
    TokenRow,
    UserRow,
)
from rain.model import (
    ACTIVE_BUILD_STATUSES,
    Conflict,
    Group,
    ImageStatus,
    InvalidRequest,
    NotFound,
    User,
)
from rain.model.clock import utcnow
from rain.model.units import plural

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
# Statuses of images that have left for good: a user owning only these may be deleted.
DEAD_STATUSES = (str(ImageStatus.DELETED), str(ImageStatus.KILLED))


def check_name(kind: str, name: str) -> str:
    if not name or len(name) > 64 or not set(name) <= _NAME_CHARS:
        raise InvalidRequest(f"bad {kind} name {name!r}: use 1-64 letters, digits, '.', '_', '-'")
    return name


def user_model(row: UserRow) -> User:
    return User(row.id, row.name, row.is_admin, sorted(g.name for g in row.groups),
                row.quota_bytes, row.quota_images, disabled=bool(row.disabled),
                created=as_utc(row.created), deleted=as_utc(row.deleted))


def _ensure_group(s: Session, name: str) -> GroupRow:
    row = s.scalar(select(GroupRow).where(GroupRow.name == name))
    if row is None:
        row = GroupRow(name=check_name("group", name))
        s.add(row)
        s.flush()
    return row


def _group_model(s: Session, row: GroupRow) -> Group:
    members = s.scalars(select(UserRow.name).join(GroupMemberRow)
                        .where(GroupMemberRow.group_id == row.id).order_by(UserRow.name))
    return Group(row.name, list(members))


class UserCatalog:
    db: Database

    def create_user(self, name: str, *, admin: bool = False, groups: list[str] | None = None,
                    quota_bytes: int | None = None, quota_images: int | None = None) -> User:
        try:
            with self.db.session() as s:
                old = s.scalar(select(UserRow).where(UserRow.name == name))
                if old is not None and old.deleted is not None:
                    raise Conflict(f"user {name!r} was deleted; its name stays taken so what "
                                   "it left behind still names it")
                row = UserRow(name=check_name("user", name), is_admin=admin, created=utcnow(),
                              quota_bytes=quota_bytes, quota_images=quota_images,
                              disabled=False)
                row.groups = [_ensure_group(s, g) for g in groups or []]
                s.add(row)
                s.flush()
                return user_model(row)
        except IntegrityError:
            raise Conflict(f"user {name!r} already exists") from None

    def get_user(self, name: str) -> User:
        with self.db.session() as s:
            return user_model(self._user_row(s, name))

    def list_users(self, *, include_deleted: bool = False) -> list[User]:
        with self.db.session() as s:
            stmt = select(UserRow).order_by(UserRow.name)
            if not include_deleted:
                stmt = stmt.where(UserRow.deleted.is_(None))
            return [user_model(r) for r in s.scalars(stmt)]

    def count_users(self) -> int:
        with self.db.session() as s:
            return s.scalar(select(func.count()).select_from(UserRow)) or 0

    def set_user_disabled(self, name: str, disabled: bool) -> User:
        with self.db.session() as s:
            row = self._user_row(s, name)
            row.disabled = disabled
            return user_model(row)

    def delete_user(self, name: str, *, transfer_to: str | None = None) -> tuple[User, int]:
        """Make `name` a tombstone; returns it and how many images went to `transfer_to`.

        Refused while it owns images that are not deleted (unless they go to
        `transfer_to`) or has builds queued or running. Its tokens, group
        memberships and the shares made to it go; its dead images stay its own."""
        with self.db.session() as s:
            row = self._user_row(s, name)
            live = s.scalar(select(func.count()).select_from(ImageRow).where(
                ImageRow.owner_id == row.id, ImageRow.status.not_in(DEAD_STATUSES))) or 0
            target = None
            if transfer_to is not None:
                target = self._user_row(s, transfer_to)
                if target.id == row.id:
                    raise InvalidRequest("cannot transfer a user's images to that same user")
            elif live:
                raise Conflict(f"user {name!r} still owns {plural(live, 'image')}: delete their "
                               "images or transfer them to another user (--transfer-to)")
            building = s.scalar(select(func.count()).select_from(BuildRow).where(
                BuildRow.owner_id == row.id,
                BuildRow.status.in_([str(b) for b in ACTIVE_BUILD_STATUSES]))) or 0
            if building:
                raise Conflict(f"user {name!r} has {plural(building, 'build')} queued or running: "
                               "cancel their builds or wait for them to end")
            moved = 0
            if target is not None:
                moved = s.execute(update(ImageRow).where(
                    ImageRow.owner_id == row.id, ImageRow.status.not_in(DEAD_STATUSES))
                    .values(owner_id=target.id)).rowcount or 0  # type: ignore[attr-defined]
            s.execute(delete(TokenRow).where(TokenRow.user_id == row.id))
            s.execute(delete(MemberRow).where(MemberRow.user_id == row.id))
            row.groups = []
            row.disabled = True
            row.deleted = utcnow()
            s.flush()
            return user_model(row), moved

    # -- groups ------------------------------------------------------------------
    def add_to_group(self, user: str, group: str) -> User:
        """Add `user` to `group`, creating the group if needed (`create-user --group`)."""
        with self.db.session() as s:
            row = self._user_row(s, user)
            g = _ensure_group(s, group)
            if g not in row.groups:
                row.groups.append(g)
            s.flush()
            return user_model(row)

    def group_exists(self, name: str) -> bool:
        with self.db.session() as s:
            return s.scalar(select(GroupRow.id).where(GroupRow.name == name)) is not None

    def create_group(self, name: str) -> Group:
        try:
            with self.db.session() as s:
                row = GroupRow(name=check_name("group", name))
                s.add(row)
                s.flush()
                return Group(row.name)
        except IntegrityError:
            raise Conflict(f"group {name!r} already exists") from None

    def get_group(self, name: str) -> Group:
        with self.db.session() as s:
            return _group_model(s, self._group_row(s, name))

    def list_groups(self) -> list[Group]:
        with self.db.session() as s:
            return [_group_model(s, g)
                    for g in s.scalars(select(GroupRow).order_by(GroupRow.name))]

    def delete_group(self, name: str) -> Group:
        """Delete a group: its members leave it, images shared with it are no longer."""
        with self.db.session() as s:
            row = self._group_row(s, name)
            group = _group_model(s, row)
            s.execute(delete(MemberRow).where(MemberRow.group_id == row.id))
            s.execute(delete(GroupMemberRow).where(GroupMemberRow.group_id == row.id))
            s.delete(row)
            return group

    def add_group_members(self, group: str, users: list[str]) -> Group:
        """Add users to an existing group, all or none (those already in it stay)."""
        with self.db.session() as s:
            g = self._group_row(s, group)
            for row in [self._user_row(s, u) for u in users]:
                if s.get(GroupMemberRow, (g.id, row.id)) is None:
                    s.add(GroupMemberRow(group_id=g.id, user_id=row.id))
                    s.flush()
            return _group_model(s, g)

    def remove_group_members(self, group: str, users: list[str]) -> Group:
        """Remove users from a group, all or none (each must be in it)."""
        with self.db.session() as s:
            g = self._group_row(s, group)
            for user in users:
                member = s.get(GroupMemberRow, (g.id, self._user_row(s, user).id))
                if member is None:
                    raise NotFound(f"user {user!r} is not in group {group!r}")
                s.delete(member)
            s.flush()
            return _group_model(s, g)

    # -- quotas ------------------------------------------------------------------
    def set_quota(self, user: str, *, quota_bytes: int | None, quota_images: int | None) -> User:
        with self.db.session() as s:
            row = self._user_row(s, user)
            row.quota_bytes, row.quota_images = quota_bytes, quota_images
            return user_model(row)

    def usage_totals(self, user_id: int) -> tuple[int, int]:
        """(stored bytes, image count) counted against the user's quota.

        A purged image still counts as an image (it can come back) but no longer
        holds bytes (its stored_bytes is 0)."""
        live = [ImageStatus.QUEUED, ImageStatus.SAVING, ImageStatus.ACTIVE,
                ImageStatus.DEACTIVATED, ImageStatus.PURGED]
        with self.db.session() as s:
            stored, count = s.execute(
                select(func.coalesce(func.sum(ImageRow.stored_bytes), 0), func.count())
                .where(ImageRow.owner_id == user_id, ImageRow.status.in_([str(x) for x in live]))
            ).one()
            return int(stored), int(count)

    @staticmethod
    def _user_row(s: Session, name: str) -> UserRow:
        row = s.scalar(select(UserRow).where(UserRow.name == name, UserRow.deleted.is_(None)))
        if row is None:
            raise NotFound(f"no user {name!r}")
        return row

    @staticmethod
    def _group_row(s: Session, name: str) -> GroupRow:
        row = s.scalar(select(GroupRow).where(GroupRow.name == name))
        if row is None:
            raise NotFound(f"no group {name!r}")
        return row
