"""Options every command shares, and the client they make."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rain.client import Client

Url = Annotated[str | None, typer.Option("--url", envvar="RAIN_URL",
                                         help="Server URL [default: http://127.0.0.1:8480]")]
Token = Annotated[str | None, typer.Option("--token", envvar="RAIN_TOKEN", help="API token")]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable output")]
DataDir = Annotated[Path | None, typer.Option("--data-dir", envvar="RAIN_DATA_DIR",
                                              help="Data directory [default: ./var]")]
Db = Annotated[str | None, typer.Option("--db", envvar="RAIN_DB",
                                        help="Catalog database URL [default: SQLite in data dir]")]


def client(url: str | None, token: str | None) -> Client:
    return Client(url, token)
