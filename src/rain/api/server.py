"""Running the HTTP service.

The default front end is rain's own threaded HTTP/1.1 server (`native.py`):
image bytes go socket ↔ store without an ASGI server in between, every other
request goes to the FastAPI app. `--server uvicorn` runs the same app on
uvicorn alone (pure ASGI, e.g. behind a proxy that wants one), at a fraction
of the transfer speed (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import signal
import ssl
import sys
import threading
from collections.abc import Callable

from rain.api.app import create_app
from rain.api.memory import tune_malloc
from rain.build.jobs import BuildQueue, load_runner
from rain.catalog import Catalog
from rain.config import Config
from rain.deploy.coordinator import Coordinator
from rain.deploy.prefetch import Prefetcher
from rain.distribute.methods.base import RepoSide
from rain.distribute.methods.bittorrent.torrent import torrent_on_activate
from rain.model import Image
from rain.repo import Repository


def open_repository(cfg: Config) -> tuple[Repository, Catalog]:
    """The repository and its database, which the deploy side keeps its tables in."""
    cfg.data_dir.mkdir(parents=True, exist_ok=True)  # a SQLite catalog may live in it
    catalog = Catalog(cfg.db_url)
    return Repository.over(catalog, cfg.data_dir, cfg.store, cfg.repo), catalog


# Seconds `rain serve` waits, once told to stop, for the uploads it stopped to wind down
# (they notice within a fraction of a second) and, under uvicorn, for requests to end.
STOP_GRACE = 5.0


def start_builds(repo: Repository, cfg: Config) -> BuildQueue:
    """The build queue with the configured runner (or none: builds answer 501)."""
    runner, why_not = load_runner(repo, cfg)
    if runner is None:
        sys.stderr.write(f"rain: builds disabled: {why_not}\n")
    queue = BuildQueue(repo, runner, cfg.build, unavailable=why_not)
    repo.rebuilder = queue
    queue.start()
    return queue


def start_distribution(repo: Repository, catalog: Catalog, cfg: Config, host: str,
                       port: int) -> tuple[Coordinator, Prefetcher]:
    """The deployment coordinator (with what the transfer methods hook into the
    repository; nodes and deployments in `catalog`) and the popularity prefetcher."""
    side = RepoSide(repo, cfg.distribute, host, port, cfg.data_dir)
    coordinator = Coordinator(repo, side, catalog)
    for hook in activation_hooks(repo, cfg):
        repo.activation_hooks.append(hook)
    prefetcher = Prefetcher(repo, coordinator, cfg.prefetch)
    prefetcher.start()
    return coordinator, prefetcher


def activation_hooks(repo: Repository, cfg: Config) -> list[Callable[[Image], None]]:
    """What runs when an image becomes active: the BitTorrent method's torrent is made
    (in a thread of its own; making it needs no libtorrent)."""
    return [torrent_on_activate(repo, cfg.distribute.bittorrent)]


def tls_context(cfg: Config) -> ssl.SSLContext | None:
    if not (cfg.server.tls_cert and cfg.server.tls_key):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cfg.server.tls_cert, cfg.server.tls_key)
    return context


def run(cfg: Config, host: str, port: int, server: str = "native") -> None:
    tune_malloc()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s "
                        "%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    repo, catalog = open_repository(cfg)
    builds = start_builds(repo, cfg)
    coordinator, prefetcher = start_distribution(repo, catalog, cfg, host, port)
    app = create_app(repo, builds, coordinator, cfg.schedule)
    try:
        if server == "uvicorn":
            import uvicorn

            uvicorn.run(app, host=host, port=port, log_level="warning", loop="uvloop",
                        http="httptools", ssl_certfile=cfg.server.tls_cert,
                        ssl_keyfile=cfg.server.tls_key,
                        timeout_graceful_shutdown=int(STOP_GRACE))
            return
        from rain.api.native import RainHTTPServer

        httpd = RainHTTPServer((host, port), repo, app, coordinator, tls_context(cfg))

        def stop() -> None:
            # Uploads first: a long one (declared zeros are hashed for minutes) must not
            # keep the process alive; then the accept loop.
            httpd.transfers.stop()
            httpd.shutdown()

        # The handler only starts a thread: shutdown() waits for the loop it interrupts.
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=stop).start())
        try:
            httpd.serve_forever(poll_interval=0.5)
        finally:
            httpd.transfers.stop()  # also after Ctrl-C
            if not httpd.transfers.wait_uploads(STOP_GRACE):
                logging.getLogger("rain.api").warning("uploads still running at exit")
            httpd.transfers.close()
            httpd.server_close()
    finally:
        prefetcher.stop()
        coordinator.close()
        builds.stop()
        repo.close()
