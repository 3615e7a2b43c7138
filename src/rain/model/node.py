"""Compute nodes as the scheduler sees them, and where instances go."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class NodeState:
    """A snapshot of one node's agent report; the scheduler never mutates it."""

    name: str
    address: str = ""
    up: bool = True
    capacity_instances: int = 0
    running_instances: int = 0
    free_cache_bytes: int = 0
    # Image ids fully cached (verified) on the node.
    cached: frozenset[str] = field(default_factory=frozenset)
    # Image ids being fetched to the node right now (counted by the cache weigher).
    in_flight: frozenset[str] = field(default_factory=frozenset)
    last_heartbeat: datetime | None = None

    @property
    def free_instances(self) -> int:
        return max(0, self.capacity_instances - self.running_instances)


@dataclass(frozen=True)
class Placement:
    """`count` instances of one deployment go to node `node`."""

    node: str
    count: int
