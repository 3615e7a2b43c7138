"""Running the HTTP service.

The default front end is rain's own threaded HTTP/1.1 server (`native.py`):
image bytes go socket ↔ store without an ASGI server in between, every other
request goes to the FastAPI app. `--server uvicorn` runs the same app on
uvicorn alone (pure ASGI, e.g. behind a proxy that wants one), at a fraction
of the transfer speed (docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import signal
import sys
import threading

from rain.api.app import create_app
from rain.build.jobs import BuildQueue, load_runner
from rain.config import Config
from rain.repo import Repository


def open_repository(cfg: Config) -> Repository:
    return Repository.open(cfg.data_dir, cfg.db_url, cfg.store, cfg.repo)


def tune_malloc() -> None:
    """Keep freed memory for reuse instead of returning it to the kernel.

    Request bodies arrive as a stream of large objects; with glibc's defaults
    each can be a fresh mmap or a re-grown heap, i.e. page faults on every
    byte received — expensive in a VM. The resident set stays bounded because
    what an upload holds at once is bounded.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    libc.mallopt(m_trim_threshold, 256 * 1024 * 1024)


def start_builds(repo: Repository, cfg: Config) -> BuildQueue:
    """The build queue with the configured runner (or none: builds answer 501)."""
    runner, why_not = load_runner(repo, cfg)
    if runner is None:
        sys.stderr.write(f"rain: builds disabled: {why_not}\n")
    queue = BuildQueue(repo, runner, cfg.build, unavailable=why_not)
    repo.rebuilder = queue
    queue.start()
    return queue


def run(cfg: Config, host: str, port: int, server: str = "native") -> None:
    tune_malloc()
    repo = open_repository(cfg)
    builds = start_builds(repo, cfg)
    if server == "uvicorn":
        import uvicorn

        try:
            uvicorn.run(create_app(repo, builds), host=host, port=port, log_level="warning",
                        loop="uvloop", http="httptools")
        finally:
            builds.stop()
            repo.close()
        return
    from rain.api.native import RainHTTPServer

    httpd = RainHTTPServer((host, port), repo, create_app(repo, builds))
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=httpd.shutdown).start())
    try:
        httpd.serve_forever(poll_interval=0.5)
    finally:
        builds.stop()
        httpd.server_close()
        repo.close()
