"""rain's configuration: one file (`rain.toml`), `RAIN_*` variables, then flags.

Each component declares its own dataclass with working defaults; this module
only assembles them. Precedence, lowest first: defaults, `rain.toml` in the
data directory (or `$RAIN_CONFIG`), environment, command-line flags.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from rain.build.config import BuildConfig
from rain.catalog.db import catalog_exists
from rain.deploy.config import DistributeConfig, PrefetchConfig
from rain.model.errors import InvalidRequest, NotFound
from rain.repo.config import RepoConfig
from rain.sandbox.config import SandboxConfig
from rain.schedule.config import ScheduleConfig
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
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{(self.data_dir / 'catalog.db').resolve()}"


def _apply(obj: Any, values: dict[str, Any], where: str) -> None:
    known = {f.name: f for f in fields(obj)}
    for key, value in values.items():
        if key not in known:
            raise InvalidRequest(f"{where}: unknown setting {key!r}")
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise InvalidRequest(f"{where}: {key!r} is a section: write it as [{key}] "
                                     "with its settings under it")
            _apply(current, value, f"{where} [{key}]")
        elif isinstance(value, dict) and not isinstance(current, dict | None):
            raise InvalidRequest(f"{where}: {key!r} is a setting, not a section ({key} = …)")
        else:
            setattr(obj, key, _converted(current, value, f"{where}: {key}"))


def _converted(current: Any, value: Any, what: str) -> Any:
    """`value` (from TOML or an environment variable) as the type of the default it
    replaces; a wrong type is one line naming the setting, not a traceback later."""
    if isinstance(current, Path):
        if not isinstance(value, str):
            raise InvalidRequest(f"{what} must be a path, not {value!r}")
        return Path(value)
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOLEANS:
            return _BOOLEANS[value.lower()]
        raise InvalidRequest(f"{what} must be true or false, not {value!r}")
    if isinstance(current, int | float) and not isinstance(value, bool):
        kind = type(current)
        if isinstance(value, int | float) and (kind is float or isinstance(value, int)):
            return kind(value)
        if isinstance(value, str):
            try:
                return kind(value)
            except ValueError:
                pass
        raise InvalidRequest(f"{what} must be {'an integer' if kind is int else 'a number'}, "
                             f"not {value!r}")
    if isinstance(current, int | float) or (isinstance(current, str)
                                            and not isinstance(value, str)):
        raise InvalidRequest(f"{what} must be {type(current).__name__}, not {value!r}")
    return value


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True,
             "0": False, "false": False, "no": False, "off": False}


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


def require_repository(cfg: Config) -> None:
    """Refuse a data directory (or catalog database) that holds no repository.

    Every server-side command but `serve` works on an existing repository:
    opening a missing one would silently make a new, empty one, whose admin
    token no running server knows."""
    where = cfg.data_dir.absolute()
    missing = [] if (cfg.data_dir / "store").is_dir() else ["store/"]
    if not catalog_exists(cfg.db_url):
        missing.insert(0, "catalog.db" if not cfg.db else f"catalog in {cfg.db.split('@')[-1]}")
    if missing:
        raise NotFound(f"no rain repository in {where} (missing: {', '.join(missing)}): run this "
                       "where `rain serve` keeps its data, or point at it with --data-dir DIR, "
                       "RAIN_DATA_DIR or data_dir in $RAIN_CONFIG")
