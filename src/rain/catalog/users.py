"""Users, groups and API tokens.

Tokens are 256-bit random strings shown once; only their SHA-256 is stored
(a fast hash is right for high-entropy secrets: there is nothing to brute-force).
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rain.catalog.db import Database, utcnow
from rain.catalog.schema import GroupRow, ImageRow, TokenRow, UserRow
from rain.model import Conflict, ImageStatus, InvalidRequest, NotFound, User

TOKEN_PREFIX = "rain_"
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_name(kind: str, name: str) -> str:
    if not name or len(name) > 64 or not set(name) <= _NAME_CHARS:
        raise InvalidRequest(f"bad {kind} name {name!r}: use 1-64 letters, digits, '.', '_', '-'")
    return name


def user_model(row: UserRow) -> User:
    return User(row.id, row.name, row.is_admin, sorted(g.name for g in row.groups),
                row.quota_bytes, row.quota_images)


def _ensure_group(s: Session, name: str) -> GroupRow:
    row = s.scalar(select(GroupRow).where(GroupRow.name == name))
    if row is None:
        row = GroupRow(name=check_name("group", name))
        s.add(row)
        s.flush()
    return row


class UserCatalog:
    db: Database

    def create_user(self, name: str, *, admin: bool = False, groups: list[str] | None = None,
                    quota_bytes: int | None = None, quota_images: int | None = None) -> User:
        try:
            with self.db.session() as s:
                row = UserRow(name=check_name("user", name), is_admin=admin, created=utcnow(),
                              quota_bytes=quota_bytes, quota_images=quota_images)
                row.groups = [_ensure_group(s, g) for g in groups or []]
                s.add(row)
                s.flush()
                return user_model(row)
        except IntegrityError:
            raise Conflict(f"user {name!r} already exists") from None

    def issue_token(self, user: str, label: str = "") -> str:
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.db.session() as s:
            row = self._user_row(s, user)
            s.add(TokenRow(user_id=row.id, token_hash=hash_token(token), label=label,
                           created=utcnow()))
        return token

    def user_for_token(self, token: str) -> User | None:
        with self.db.session() as s:
            row = s.scalar(
                select(UserRow).join(TokenRow).where(TokenRow.token_hash == hash_token(token))
            )
            return user_model(row) if row else None

    def get_user(self, name: str) -> User:
        with self.db.session() as s:
            return user_model(self._user_row(s, name))

    def list_users(self) -> list[User]:
        with self.db.session() as s:
            return [user_model(r) for r in s.scalars(select(UserRow).order_by(UserRow.name))]

    def count_users(self) -> int:
        with self.db.session() as s:
            return s.scalar(select(func.count()).select_from(UserRow)) or 0

    def add_to_group(self, user: str, group: str) -> User:
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
        row = s.scalar(select(UserRow).where(UserRow.name == name))
        if row is None:
            raise NotFound(f"no user {name!r}")
        return row
