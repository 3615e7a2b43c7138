"""The service on PostgreSQL, and with anonymous reads of public images switched on."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from rain.client import Client
from rain.model.errors import NotFound
from tests.conftest import fresh_postgres_db, start_server, stop_server
from tests.support.images import make_raw, sha256

pytestmark = pytest.mark.integration


@pytest.mark.postgres
def test_push_pull_search_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", db=fresh_postgres_db(postgres_url, "srv"))
    try:
        c = Client(server.url, server.token)
        img = make_raw(tmp_path / "pg.raw", size=4 * 1024 * 1024, seed=21)
        pushed = c.push(img, name="on-pg", tags=["pg"], packages={"nginx": "1.22.1-9"})
        assert c.images(tag=["pg"], package=["nginx>=1.22"])["total"] == 1
        c.pull(pushed["id"], tmp_path / "out")
        assert sha256(tmp_path / "out") == sha256(img)
        assert c.usage(pushed["id"])["pulls"] == 1
    finally:
        stop_server(server.proc)


def test_anonymous_read_of_public_images_when_configured(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", extra_env={"RAIN_REPO__ANONYMOUS_READ": "true"})
    try:
        owner = Client(server.url, server.token)
        img = make_raw(tmp_path / "a.raw", size=1024 * 1024, seed=22)
        public = owner.push(img, name="open", visibility="public")
        private = owner.push(img, name="closed")
        anon = Client(server.url, "")
        assert [i["name"] for i in anon.images()["images"]] == ["open"]
        anon.pull(public["id"], tmp_path / "o")
        assert sha256(tmp_path / "o") == public["sha256"]
        with pytest.raises(NotFound):
            anon.show(private["id"])
        r = httpx.post(f"{server.url}/v1/images", json={"name": "x"})
        assert r.status_code == 401  # anonymous clients never write
        records = owner.usage(public["id"])["usage"]
        assert [u["user"] for u in records] == ["(anonymous)"]
    finally:
        stop_server(server.proc)
