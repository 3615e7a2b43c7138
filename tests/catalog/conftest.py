"""The catalog fixture: every catalog test runs on SQLite and on a real PostgreSQL
(modules that need another database name or revision define their own)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rain.catalog import Catalog
from tests.conftest import fresh_postgres_db


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def catalog(request: pytest.FixtureRequest, tmp_path) -> Iterator[Catalog]:  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'c.db'}"
    else:
        url = fresh_postgres_db(request.getfixturevalue("postgres_url"))
    c = Catalog(url)
    yield c
    c.close()
