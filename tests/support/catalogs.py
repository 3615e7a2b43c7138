"""Catalog rows and databases at old schema revisions, for catalog tests."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig

from rain.catalog import Catalog
from rain.catalog.db import MIGRATIONS, make_engine
from rain.model import User


def active(c: Catalog, owner: User, name: str, **kw) -> str:  # type: ignore[no-untyped-def]
    kw.setdefault("size", 1000)
    image = c.create_image(owner, name=name, status="active", **kw)
    return image.id


def migrated_to(url: str, revision: str) -> tuple[sa.Engine, AlembicConfig]:
    """A database at an old revision, to check what the next migrations do to its rows."""
    engine = make_engine(url)
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return engine, cfg
