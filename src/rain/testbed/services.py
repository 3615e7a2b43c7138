"""The repository server and the node agents a testbed runs, and waiting for them.

Each runs `python -m rain.cli.main …` with this interpreter inside its
namespace, in its own session, logging to a file in the testbed's data
directory. Waiting is done from the host over the host link, the way the
`rain` CLI and the benchmarks will talk to them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from rain.model.errors import RainError, Unavailable
from rain.testbed import iproute
from rain.testbed.plan import AGENT_PORT, REPO_PORT, Host

RAIN = [sys.executable, "-m", "rain.cli.main"]
# These name the user's own repository; the testbed's processes must not use it.
_DROPPED_ENV = ("RAIN_URL", "RAIN_TOKEN", "RAIN_DATA_DIR", "RAIN_DB", "RAIN_CONFIG")
# Nothing inside the testbed can reach a proxy (there is no route out).
_PROXY_ENV = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
_POLL = 0.1


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of testbed processes: ours, minus repository and proxy settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in _DROPPED_ENV and k.lower() not in _PROXY_ENV}
    env.update(extra or {})
    return env


def server_argv(repo: Host, data_dir: Path, extra: Sequence[str] = ()) -> list[str]:
    return [*RAIN, "serve", "--host", repo.address, "--port", str(REPO_PORT),
            "--data-dir", str(data_dir), *extra]


def agent_argv(node: Host, url: str, token: str, cache_dir: Path, cache_size: str,
               capacity: int, extra: Sequence[str] = ()) -> list[str]:
    return [*RAIN, "agent", "--name", node.name, "--repo", url, "--token", token,
            "--cache-dir", str(cache_dir), "--cache-size", cache_size,
            "--listen", f"{node.address}:{AGENT_PORT}", "--capacity", str(capacity), *extra]


def start(host: Host, argv: Sequence[str], log: Path,
          env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start a service in `host`'s namespace; its log is private (it may show tokens)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    log.touch(mode=0o600, exist_ok=True)
    with open(log, "ab") as f:
        f.write(f"--- {datetime.now(UTC).isoformat()} starting rain {argv[3]}\n".encode())
    return iproute.spawn_in(host.namespace, argv, log=log, env=env)


def log_tail(log: Path, lines: int = 3) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "(no log)"
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " / ".join(kept)[-400:] or "(empty log)"


def _exited(what: str, proc: subprocess.Popen[bytes], log: Path) -> RainError:
    return RainError(f"{what} exited with status {proc.returncode} during start-up "
                     f"({log}): {log_tail(log)}")


def wait_for_server(url: str, proc: subprocess.Popen[bytes], log: Path,
                    timeout: float) -> None:
    """Until GET /v1/health answers 200 through the host link."""
    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False, timeout=2) as http:
        while True:
            if proc.poll() is not None:
                raise _exited("the repository server", proc, log)
            try:
                if http.get(url + "/v1/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise Unavailable(f"the repository server did not answer {url}/v1/health "
                                  f"within {timeout:g} s ({log}): {log_tail(log)}")
            time.sleep(_POLL)


@dataclass(frozen=True)
class Started:
    """A service process just started, and where it logs."""

    host: Host
    proc: subprocess.Popen[bytes]
    log: Path


def node_token(url: str, admin_token: str, node: str) -> str:
    """A fresh node token for `node` (one per agent start; earlier ones stay valid)."""
    with httpx.Client(trust_env=False, timeout=30,
                      headers={"Authorization": f"Bearer {admin_token}"}) as http:
        response = http.post(url + "/v1/tokens", json={"node": node, "label": "testbed"})
    if response.status_code not in (200, 201):
        raise Unavailable(f"the repository refused a node token for {node}: "
                          f"HTTP {response.status_code} {response.text[:200]}")
    return str(response.json()["token"])


def wait_for_agents(url: str, token: str, agents: Sequence[Started], started: datetime,
                    timeout: float) -> None:
    """Until every agent listens on its port and is registered in GET /v1/nodes.

    A node that was registered before (a restarted agent) counts only once it
    has reported again since `started`, when the repository says when.
    """
    waiting = {a.host.name: a for a in agents}
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(trust_env=False, timeout=5, headers=headers) as http:
        while waiting:
            for name, agent in waiting.items():
                if agent.proc.poll() is not None:
                    raise _exited(f"the agent of {name}", agent.proc, agent.log)
            registered = _registered(http, url, started)
            for name in [n for n in waiting if n in registered]:
                if _listening(waiting[name].host.address, AGENT_PORT):
                    del waiting[name]
            if not waiting:
                return
            if time.monotonic() > deadline:
                name, agent = next(iter(waiting.items()))
                more = f" (and {len(waiting) - 1} more)" if len(waiting) > 1 else ""
                raise Unavailable(f"node {name}{more} did not register with the repository "
                                  f"within {timeout:g} s ({agent.log}): {log_tail(agent.log)}")
            time.sleep(_POLL * 3)


def _registered(http: httpx.Client, url: str, since: datetime) -> set[str]:
    try:
        response = http.get(url + "/v1/nodes")
    except httpx.TransportError:
        return set()
    if response.status_code != 200:
        return set()
    body: Any = response.json()
    entries = body.get("nodes", []) if isinstance(body, dict) else body
    names = set()
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, str):
            names.add(entry)
        elif isinstance(entry, dict) and entry.get("name") and _fresh(entry, since):
            names.add(str(entry["name"]))
    return names


def _fresh(entry: dict[str, Any], since: datetime) -> bool:
    stamps = [entry.get(k) for k in ("last_heartbeat", "registered")]
    present = [s for s in stamps if isinstance(s, str) and s]
    if not present:
        return True  # the repository does not say when: being listed is enough
    for stamp in present:
        try:
            when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        except ValueError:
            return True
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        if when.timestamp() >= since.timestamp() - 1:
            return True
    return False


def _listening(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False
