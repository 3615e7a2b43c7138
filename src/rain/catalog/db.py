"""Opening the catalog database and keeping its schema current.

SQLite (WAL, foreign keys on) is the embedded default; any SQLAlchemy URL
works, PostgreSQL is the tested production choice. Alembic migrations run
in-process at open, so an upgraded rain upgrades its database by itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event, inspect, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from rain.model.errors import RainError

MIGRATIONS = Path(__file__).with_name("migrations")


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything rain stores is UTC."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def catalog_exists(url: str) -> bool:
    """Whether `url` already holds a rain catalog, found without creating anything (opening
    a Database creates and migrates one)."""
    if url.startswith("sqlite"):
        path = make_url(url).database
        if not path or path == ":memory:" or not Path(path).is_file():
            return False
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return inspect(conn).has_table("alembic_version")
    except SQLAlchemyError as exc:
        from rain.model import Unavailable

        raise Unavailable(f"cannot open the catalog database {url.split('@')[-1]}: "
                          f"{str(exc).splitlines()[0]}") from None
    finally:
        engine.dispose()


def _safe_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (SQLAlchemyError, ValueError):
        return url.rsplit("@", 1)[-1]


def migrate(engine: Engine) -> None:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class Database:
    """An engine plus a session factory; every catalog call is one short transaction."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.engine = make_engine(url)
            migrate(self.engine)
        except (SQLAlchemyError, ValueError) as exc:
            # A wrong --db, a server that is down, a file that cannot be written:
            # one line that names the database, without its password.
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            raise RainError(f"cannot open the catalog database {_safe_url(url)}: "
                            f"{reason[0] if reason else type(exc).__name__}") from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s

    def close(self) -> None:
        self.engine.dispose()
