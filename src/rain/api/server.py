"""Running the HTTP service.

The default server is Granian (a Rust HTTP server running the ASGI app): on
this project's 2-core reference machine uvicorn alone tops out at about
0.9 GB/s receiving a request body — below the SHA-256 rate the repository
must keep up with — while Granian moves the same body at about 2.3 GB/s
(docs/benchmarks.md). uvicorn remains selectable with `--server uvicorn`.

Granian starts the app in a worker process from an import string, so the
worker rebuilds its configuration from the environment `serve` sets up.
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from rain.api.app import create_app
from rain.config import Config, load_config
from rain.repo import Repository


def open_repository(cfg: Config) -> Repository:
    return Repository.open(cfg.data_dir, cfg.db_url, cfg.store, cfg.repo)


def app_from_env() -> FastAPI:
    """Granian's factory: the worker's app, configured like its parent."""
    return create_app(open_repository(load_config()))


def run(cfg: Config, host: str, port: int, server: str = "granian") -> None:
    if server == "uvicorn":
        import uvicorn

        uvicorn.run(create_app(open_repository(cfg)), host=host, port=port,
                    log_level="warning", loop="uvloop", http="httptools")
        return
    from granian import Granian
    from granian.constants import Interfaces

    os.environ["RAIN_DATA_DIR"] = str(cfg.data_dir.resolve())
    os.environ["RAIN_DB"] = cfg.db_url
    Granian("rain.api.server:app_from_env", factory=True, address=host, port=port,
            interface=Interfaces.ASGI, workers=1, log_level="warning",  # type: ignore[arg-type]
            ).serve()
