"""Node snapshots for scheduler tests."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rain.model import NodeState

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def node(name: str, *, capacity: int = 8, running: int = 0, free_cache: int = 100 * 2**30,
         cached: tuple[str, ...] = (), in_flight: tuple[str, ...] = (),
         **kwargs: Any) -> NodeState:
    kwargs.setdefault("last_heartbeat", NOW)
    return NodeState(
        name=name,
        address=f"198.18.0.{len(name)}",
        capacity_instances=capacity,
        running_instances=running,
        free_cache_bytes=free_cache,
        cached=frozenset(cached),
        in_flight=frozenset(in_flight),
        **kwargs,
    )
