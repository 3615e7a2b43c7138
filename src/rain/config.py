"""rain's configuration: one file (`rain.toml`), `RAIN_*` variables, then flags.

Each component declares its own dataclass with working defaults; this module
only assembles them. Precedence, lowest first: defaults, `rain.toml` in the
data directory (or `$RAIN_CONFIG`), environment, command-line flags.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rain.build.config import BuildConfig
from rain.distribute.config import DistributeConfig, PrefetchConfig
from rain.model.errors import InvalidRequest
from rain.repo.config import RepoConfig
from rain.sandbox.config import SandboxConfig
from rain.store.chunks import StoreConfig

DEFAULT_PORT = 8480


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    # HTTPS when both are set (PEM files).
    tls_cert: str | None = None
    tls_key: str | None = None


@dataclass
class Config:
    data_dir: Path = field(default_factory=lambda: Path("var"))
    db: str = ""  # empty: SQLite file in data_dir
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    repo: RepoConfig = field(default_factory=RepoConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    distribute: DistributeConfig = field(default_factory=DistributeConfig)
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{(self.data_dir / 'catalog.db').resolve()}"


def _apply(obj: Any, values: dict[str, Any], where: str) -> None:
    known = {f.name: f for f in fields(obj)}
    for key, value in values.items():
        if key not in known:
            raise InvalidRequest(f"{where}: unknown setting {key!r}")
        current = getattr(obj, key)
        if isinstance(value, dict):
            _apply(current, value, f"{where}.{key}")
        elif isinstance(current, Path):
            setattr(obj, key, Path(value))
        elif isinstance(current, bool) and isinstance(value, str):
            setattr(obj, key, value.lower() in ("1", "true", "yes", "on"))
        elif isinstance(current, int) and not isinstance(current, bool) and isinstance(value, str):
            setattr(obj, key, int(value))
        elif isinstance(current, float) and isinstance(value, str):
            setattr(obj, key, float(value))
        else:
            setattr(obj, key, value)


def load_config(data_dir: str | Path | None = None, db: str | None = None,
                env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ if env is None else env)
    cfg = Config()
    chosen_dir = data_dir or env.get("RAIN_DATA_DIR")
    if chosen_dir:
        cfg.data_dir = Path(chosen_dir)
    path = Path(env["RAIN_CONFIG"]) if env.get("RAIN_CONFIG") else cfg.data_dir / "rain.toml"
    if path.exists():
        try:
            _apply(cfg, tomllib.loads(path.read_text()), str(path))
        except tomllib.TOMLDecodeError as exc:
            raise InvalidRequest(f"{path}: {exc}") from None
        if chosen_dir:
            cfg.data_dir = Path(chosen_dir)
    # RAIN_STORE__CHUNK_SIZE=... style overrides for nested settings
    for key, value in env.items():
        if key.startswith("RAIN_") and "__" in key:
            section, _, name = key[5:].lower().partition("__")
            _apply(cfg, {section: {name: value}}, key)
    if env.get("RAIN_DB"):
        cfg.db = env["RAIN_DB"]
    if db:
        cfg.db = db
    return cfg
