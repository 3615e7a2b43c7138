"""Shared fixtures: a real `rain serve` process on loopback, and a throwaway PostgreSQL."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.servers import ThreadServer, serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
RAIN = [sys.executable, "-m", "rain.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    token: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def env(self, token: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(RAIN_URL=self.url, RAIN_TOKEN=token or self.token,
                   RAIN_DATA_DIR=str(self.data_dir))
        return env


def start_server(data_dir: Path, *, extra_env: dict[str, str] | None = None,
                 db: str | None = None, args: tuple[str, ...] = ()) -> Server:
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = data_dir / "server.log"
    env = dict(os.environ)
    env.update(extra_env or {})
    argv = [*RAIN, "serve", "--port", str(port), "--data-dir", str(data_dir)]
    if db:
        argv += ["--db", db]
    argv += list(args)
    with open(log, "wb") as logf:
        proc = subprocess.Popen(argv, stdout=logf, stderr=logf, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rain serve exited: {log.read_text()}")
        try:
            if httpx.get(url + "/v1/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    else:
        stop_server(proc)
        raise RuntimeError(f"rain serve did not come up: {log.read_text()}")
    token = (data_dir / "admin.token").read_text().strip()
    return Server(url, token, data_dir, proc, log)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("rain-server"))
    try:
        yield s
    finally:
        stop_server(s.proc)


def run_cli(*args: str, env: dict[str, str], check: bool = True,
            cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`timeout` only guards against a hung test; the server bounds its own work."""
    result = subprocess.run([*RAIN, *args], env=env, capture_output=True, text=True, cwd=cwd,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"rain {' '.join(args)} failed: {result.stderr}")
    return result


# -- PostgreSQL -------------------------------------------------------------------
def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway PostgreSQL cluster (installed with apt if missing), stopped afterwards."""
    if _pg_bin("initdb") is None or _pg_bin("pg_ctl") is None:
        subprocess.run([str(ROOT / "scripts" / "apt-ensure"), "postgresql"], check=True)
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    assert initdb and pg_ctl, "PostgreSQL binaries not found after install"
    base = tmp_path_factory.mktemp("pg")
    data = base / "data"
    run_as: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
            pw = pwd.getpwnam("postgres")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        os.chmod(base, 0o700)
        for parent in list(base.parents)[:3]:
            os.chmod(parent, os.stat(parent).st_mode | 0o711)
        run_as = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*run_as, initdb, "-D", str(data), "-U", "postgres", "--auth=trust",
                    "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*run_as, pg_ctl, "-D", str(data), "-o", opts, "-l", str(base / "pg.log"),
                    "-w", "start"], check=True, capture_output=True)
    try:
        subprocess.run([*run_as, _pg_bin("createdb") or "createdb", "-h", "127.0.0.1", "-p",
                        str(port), "-U", "postgres", "rain"], check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/rain"
    finally:
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)


def fresh_postgres_db(postgres_url: str, prefix: str = "t") -> str:
    """A new, empty database on the throwaway cluster; returns its URL."""
    import uuid

    import sqlalchemy as sa

    name = prefix + uuid.uuid4().hex[:12]
    engine = sa.create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://"),
                              isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return postgres_url.rsplit("/", 1)[0] + "/" + name


# -- in-process layer ---------------------------------------------------------------
@pytest.fixture(scope="module")
def thread_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    """The repository service served by a thread of this process (tests/support/servers.py):
    for client and CLI tests that need HTTP but not a `rain serve` process."""
    with serve_in_thread(tmp_path_factory.mktemp("rain-thread-server")) as s:
        yield s
