"""Placement policies: `spread` and `pack` as signs of the load weighers' multipliers.

The `[schedule]` multipliers say what the server does by default; a request
may ask for `spread` or `pack`, which sets the sign of the two load weighers
(free slots and siblings) and keeps their configured size — a zero takes the
built-in size, so the asked policy always has an effect. The cache weigher is
never turned around: every policy prefers nodes that hold the image.

- `spread` (the default): a deployment's instances go to different nodes
  first, cached nodes before others. Instances of one job then share no
  node's CPU, disk or failure, and with the peer-to-peer methods a second
  copy of the image costs little extra time (the tree sends it once).
- `pack`: fill the nodes that hold or are getting the image, fullest first,
  before another one is used: fewest nodes touched and fewest bytes moved,
  and whole nodes left free for others.
"""

from __future__ import annotations

from dataclasses import fields, replace
from enum import StrEnum
from typing import Any

from rain.model.errors import InvalidRequest
from rain.schedule.config import ScheduleConfig
from rain.schedule.weighers import (
    CacheWeigher,
    FreeCacheWeigher,
    FreeCapacityWeigher,
    SiblingsWeigher,
    Weigher,
)

LOAD_WEIGHERS = ("instances_weight_multiplier", "siblings_weight_multiplier")


class Policy(StrEnum):
    SPREAD = "spread"
    PACK = "pack"


def check_config(config: ScheduleConfig) -> None:
    """Numbers everywhere, and a credit that is a fraction (a one-line 400 otherwise)."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequest(f"[schedule] {f.name} must be a number, not {value!r}")
    if not 0.0 <= config.in_flight_credit <= 1.0:
        raise InvalidRequest("[schedule] in_flight_credit must be between 0 and 1")


def parse_policy(value: Any) -> Policy | None:
    """A request's `policy` (None: the server's default)."""
    if value is None or value == "":
        return None
    try:
        return Policy(str(value))
    except ValueError:
        raise InvalidRequest(f"unknown placement policy {value!r}: use spread or pack"
                             ) from None


def with_policy(config: ScheduleConfig, policy: Policy | None) -> ScheduleConfig:
    """The settings with the load weighers signed for `policy` (as they are for None)."""
    if policy is None:
        return config
    sign = 1.0 if policy is Policy.SPREAD else -1.0
    builtin = ScheduleConfig()
    signed = {name: sign * abs(getattr(config, name) or getattr(builtin, name))
              for name in LOAD_WEIGHERS}
    return replace(config, **signed)


def policy_name(config: ScheduleConfig) -> str:
    """`spread` or `pack` when both load weighers agree (or one is off), else `custom`."""
    signs = {(getattr(config, n) > 0) - (getattr(config, n) < 0) for n in LOAD_WEIGHERS} - {0}
    if signs == {1}:
        return str(Policy.SPREAD)
    if signs == {-1}:
        return str(Policy.PACK)
    return "custom"


def weighers_for(config: ScheduleConfig | None = None,
                 policy: Policy | None = None) -> list[Weigher]:
    cfg = with_policy(config or ScheduleConfig(), policy)
    return [CacheWeigher(cfg.cache_weight_multiplier, in_flight_credit=cfg.in_flight_credit),
            FreeCapacityWeigher(cfg.instances_weight_multiplier),
            SiblingsWeigher(cfg.siblings_weight_multiplier),
            FreeCacheWeigher(cfg.free_cache_weight_multiplier)]


def default_weighers() -> list[Weigher]:
    """The weighers of the built-in settings (policy spread)."""
    return weighers_for()


def describe(config: ScheduleConfig, policy: Policy | None) -> dict[str, Any]:
    """What a deployment's report says about how it was placed."""
    cfg = with_policy(config, policy)
    return {"policy": policy_name(cfg), "asked": None if policy is None else str(policy),
            "default": policy_name(config),
            "multipliers": {"cache": cfg.cache_weight_multiplier,
                            "instances": cfg.instances_weight_multiplier,
                            "siblings": cfg.siblings_weight_multiplier,
                            "free_cache": cfg.free_cache_weight_multiplier},
            "in_flight_credit": cfg.in_flight_credit}
