"""The one clock rain stamps records with: aware UTC datetimes, so times from the
catalog, the agents and the API compare without guessing a zone."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)
