"""The agent's settings (flags of `rain agent`, or `[agent]` in rain.toml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PORT = 8481


@dataclass
class AgentConfig:
    name: str = ""
    repo_url: str = "http://127.0.0.1:8480"
    token: str = ""  # this node's token (`rain token create --node NAME`), or an admin's
    cache_dir: Path = field(default_factory=lambda: Path("var/agent"))
    cache_size: int = 16 * 1024**3
    listen_host: str = "0.0.0.0"
    listen_port: int = DEFAULT_PORT
    # The URL the repository and the other nodes use to reach this agent;
    # empty: http://<the address this host uses to reach the repository>:<port>.
    advertise: str = ""
    capacity_instances: int = 8
    heartbeat_seconds: float = 5.0
    # Seconds a deployment's peer token stays valid after its transfer ended.
    peer_token_seconds: float = 3600.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    ca_file: Path | None = None  # to verify the repository's and peers' certificates
