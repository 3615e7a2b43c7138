"""The usage log: who pulled (later: registered, deployed) which image, when, how much."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select

from rain.catalog.db import Database, as_utc
from rain.catalog.schema import ImageRow, UsageRow, UserRow
from rain.model import UsageRecord


class UsageCatalog:
    db: Database

    def record_usage(self, image_id: str, user_id: int | None, action: str, nbytes: int,
                     at: datetime) -> None:
        with self.db.session() as s:
            s.add(UsageRow(image_id=image_id, user_id=user_id, action=action, bytes=nbytes, at=at))

    def usage(self, *, image_id: str | None = None, user: str | None = None,
              since: datetime | None = None, limit: int = 1000) -> list[UsageRecord]:
        stmt = (select(UsageRow, ImageRow.name, UserRow.name)
                .join(ImageRow, ImageRow.id == UsageRow.image_id)
                .outerjoin(UserRow, UserRow.id == UsageRow.user_id)
                .order_by(UsageRow.at.desc(), UsageRow.id.desc()).limit(limit))
        if image_id:
            stmt = stmt.where(UsageRow.image_id == image_id)
        if user:
            stmt = stmt.where(UserRow.name == user)
        if since:
            stmt = stmt.where(UsageRow.at >= since)
        with self.db.session() as s:
            return [UsageRecord(row.image_id, iname, uname or "(anonymous)", row.action,
                                row.bytes, as_utc(row.at) or row.at)
                    for row, iname, uname in s.execute(stmt).all()]
