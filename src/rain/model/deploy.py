"""A deployment's options, typed: what `rain deploy` flags, `POST /v1/deployments`'s
`options` object, the coordinator, the transfer methods and the agents all read.

On the wire (the API, the deployment record, the agents' fetch requests) the
options are a JSON object with the names of `docs/api.md` (`size`, `max_rate` …);
in Python the fields say their unit (`size_bytes`, `max_rate_bytes_per_s`).
`from_json` refuses unknown names and bad values with one InvalidRequest line;
`to_json` writes only what was set, so a record shows what was asked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from rain.model.errors import InvalidRequest
from rain.model.units import parse_size

# Seconds without progress after which a transfer source (a tree parent, a peer, the
# swarm) is given up on, and a node's agent that does not answer is lost: the
# `stall_seconds` option, else the server's `[distribute] stall_seconds`.
DEFAULT_STALL_SECONDS = 30.0
MAX_SECONDS = 3600.0  # for stall_seconds and owner_wait_seconds
MAX_FANOUT = 64  # fanout, stripes, stripe_unit
MAX_HOLDERS = 64
WEB_SEED_MODES = ("never", "stall", "always")

# Python field → its name on the wire (fields not listed keep their own name).
WIRE_NAMES = {"size_bytes": "size", "ephemeral_size_bytes": "ephemeral_size",
              "rate_bytes_per_s": "rate", "max_rate_bytes_per_s": "max_rate"}


@dataclass(frozen=True)
class DeployOptions:
    """None: not asked for; the method's or the server's default applies."""

    size_bytes: int | None = None  # grow each instance disk to this
    ephemeral_size_bytes: int | None = None  # add a sparse scratch disk of this size
    copy: bool = False  # full disk copies instead of overlays
    fanout: int | None = None  # tree: children per node
    stripes: int | None = None  # tree: interior-disjoint trees sharing the image
    stripe_unit: int | None = None  # tree: consecutive chunks per stripe
    encrypt: bool = False  # bittorrent: encrypted peer connections
    web_seed: str | None = None  # bittorrent: never | stall | always
    rate_bytes_per_s: float | None = None  # multicast: send rate cap
    max_rate_bytes_per_s: float | None = None  # each node's download cap
    stall_seconds: float | None = None  # see DEFAULT_STALL_SECONDS
    max_holders: int | None = None  # chunks: nodes outside the deployment asked to serve
    owner_wait_seconds: float | None = None  # chunks: wait for a silent owner's share

    def __post_init__(self) -> None:
        for name in ("size_bytes", "ephemeral_size_bytes"):
            _whole(name, getattr(self, name), 0, None)
        for name in ("copy", "encrypt"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequest(f"option {wire_name(name)} must be true or false, not "
                                     f"{_shown(getattr(self, name))}")
        for name in ("fanout", "stripes", "stripe_unit"):
            _whole(name, getattr(self, name), 1, MAX_FANOUT)
        _whole("max_holders", self.max_holders, 0, MAX_HOLDERS)
        for name in ("rate_bytes_per_s", "max_rate_bytes_per_s"):
            _positive(name, getattr(self, name), None)
        for name in ("stall_seconds", "owner_wait_seconds"):
            _positive(name, getattr(self, name), MAX_SECONDS)
        if self.web_seed is not None and self.web_seed not in WEB_SEED_MODES:
            raise InvalidRequest(f"option web_seed must be one of {', '.join(WEB_SEED_MODES)}"
                                 f", not {_shown(self.web_seed)}")

    @property
    def stall_timeout_seconds(self) -> float:
        """`stall_seconds`, or the default (the coordinator always sends the server's)."""
        return self.stall_seconds if self.stall_seconds is not None else DEFAULT_STALL_SECONDS

    @classmethod
    def from_json(cls, data: Any) -> DeployOptions:
        """The options object of a request; sizes may be `"20G"` or bytes."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise InvalidRequest("options must be an object")
        by_wire = {wire_name(f.name): f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in by_wire)
        if unknown:
            raise InvalidRequest(f"unknown options: {', '.join(unknown)} (known: "
                                 f"{', '.join(sorted(by_wire))})")
        values: dict[str, Any] = {}
        for key, value in data.items():
            name = by_wire[key]
            if name in ("size_bytes", "ephemeral_size_bytes") and isinstance(value, str):
                value = parse_size(value)
            values[name] = value
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """The options that were set, by their wire names (`from_json` reads them back)."""
        default = DeployOptions()
        return {wire_name(f.name): getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}


def wire_name(field_name: str) -> str:
    return WIRE_NAMES.get(field_name, field_name)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _whole(name: str, value: Any, low: int, high: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low or \
            (high is not None and value > high):
        span = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise InvalidRequest(f"option {wire_name(name)} must be a whole number {span}, not "
                             f"{_shown(value)}")


def _positive(name: str, value: Any, high: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not math.isfinite(value) or value <= 0 or (high is not None and value > high):
        span = f"above 0 and at most {high:g}" if high is not None else "above 0"
        raise InvalidRequest(f"option {wire_name(name)} must be a number {span}, not "
                             f"{_shown(value)}")
