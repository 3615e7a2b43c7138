"""The repository service inside the test process: the same `RainHTTPServer` and FastAPI
app that `rain serve` runs, on 127.0.0.1 with a port the kernel picks, served by a thread
instead of a subprocess. Requests still cross a real loopback socket (the client's bulk
transfers use http.client, so no in-memory transport would do), but starting one takes
milliseconds and a failing test shows the server's traceback in its own output."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import HTTPServer
from pathlib import Path

from rain.api.app import create_app
from rain.api.native import RainHTTPServer
from rain.config import load_config
from rain.repo import Repository


def serve_http(server: HTTPServer) -> Iterator[str]:
    """Serve any stdlib-style HTTP server from a thread; yields its URL, shuts it on exit."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class ThreadServer:
    url: str
    token: str  # the bootstrap admin's
    data_dir: Path
    repo: Repository  # the server's own: read it to check what a request did

    def env(self, token: str | None = None) -> dict[str, str]:
        """What `rain` commands read to find this server (for monkeypatch.setenv)."""
        return {"RAIN_URL": self.url, "RAIN_TOKEN": token or self.token,
                "RAIN_DATA_DIR": str(self.data_dir)}


def open_repository(data_dir: Path) -> Repository:
    """A repository as `rain serve --data-dir DATA_DIR` opens it (SQLite catalog)."""
    cfg = load_config(data_dir, env={k: v for k, v in os.environ.items()
                                     if not k.startswith("RAIN_")})
    return Repository.open(cfg.data_dir, cfg.db_url, cfg.store, cfg.repo)


@contextmanager
def serve_in_thread(data_dir: Path) -> Iterator[ThreadServer]:
    repo = open_repository(data_dir)
    token = repo.bootstrap_admin()
    assert token is not None, f"{data_dir} already has users"
    # No build queue (builds answer 501), a loopback coordinator.
    app = create_app(repo, catalog=repo.catalog)
    httpd = RainHTTPServer(("127.0.0.1", 0), repo, app, app.state.coordinator)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              name="rain-test-server", daemon=True)
    thread.start()
    try:
        yield ThreadServer(f"http://127.0.0.1:{httpd.server_address[1]}", token, data_dir,
                           repo)
    finally:
        httpd.transfers.stop()
        httpd.shutdown()
        thread.join(10)
        httpd.transfers.close()
        httpd.server_close()
        app.state.coordinator.close()
        repo.close()
