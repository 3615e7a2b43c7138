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

import ctypes
import os

from fastapi import FastAPI

from rain.api.app import create_app
from rain.config import Config, load_config
from rain.repo import Repository


def open_repository(cfg: Config) -> Repository:
    return Repository.open(cfg.data_dir, cfg.db_url, cfg.store, cfg.repo)


def tune_malloc() -> None:
    """Keep freed memory for reuse instead of returning it to the kernel.

    Request bodies arrive as a stream of ~256 KiB objects; with glibc's
    defaults each can be a fresh mmap or a re-grown heap, i.e. page faults on
    every byte received — the dominant cost of an upload in a VM. The
    resident set is still bounded: what an upload holds at once is bounded.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    libc.mallopt(m_trim_threshold, 256 * 1024 * 1024)


def app_from_env() -> FastAPI:
    """Granian's factory: the worker's app, configured like its parent."""
    tune_malloc()
    return create_app(open_repository(load_config()))


def run(cfg: Config, host: str, port: int, server: str = "granian") -> None:
    if server == "uvicorn":
        import uvicorn

        tune_malloc()
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
