"""Host filters: yes/no questions asked before any weighing (seed 002 §5).

A filter removes nodes that cannot take one more instance of the request at
all; weighers then only rank the nodes that can. Adding a filter is adding a
subclass of `HostFilter`.
"""

from __future__ import annotations

from datetime import datetime

from rain.model.node import NodeState
from rain.schedule.request import PlacementRequest


class HostFilter:
    """Base class: `passes` is True when `node` may receive one more instance."""

    def passes(self, node: NodeState, request: PlacementRequest) -> bool:
        raise NotImplementedError

    def why_not(self, node: NodeState, request: PlacementRequest) -> str:
        """Why `node` fails this filter, in a few words (a refusal names the nodes left
        out and why, not only how many remain); "" leaves the node unmentioned."""
        return f"refused by {self!r}"

    def __repr__(self) -> str:
        return type(self).__name__


class NodeUpFilter(HostFilter):
    """The node's agent says it is up."""

    def passes(self, node: NodeState, request: PlacementRequest) -> bool:
        return node.up

    def why_not(self, node: NodeState, request: PlacementRequest) -> str:
        return "down"


class FreshHeartbeatFilter(HostFilter):
    """The node reported within `max_age_seconds` of `now`.

    The clock is passed in (not read here) so scheduling stays pure and
    repeatable; a node that never reported is stale.
    """

    def __init__(self, now: datetime, max_age_seconds: float = 30.0) -> None:
        self.now = now
        self.max_age_seconds = max_age_seconds

    def passes(self, node: NodeState, request: PlacementRequest) -> bool:
        if node.last_heartbeat is None:
            return False
        return (self.now - node.last_heartbeat).total_seconds() <= self.max_age_seconds

    def why_not(self, node: NodeState, request: PlacementRequest) -> str:
        return f"no heartbeat for over {self.max_age_seconds:g} s"


class CapacityFilter(HostFilter):
    """The node has at least one free instance slot.

    `place` always applies it, whatever filters the caller passes: capacity is
    a hard limit, not a preference.
    """

    def passes(self, node: NodeState, request: PlacementRequest) -> bool:
        return node.free_instances > 0

    def why_not(self, node: NodeState, request: PlacementRequest) -> str:
        return f"full ({node.running_instances} of {node.capacity_instances} instances)"


class CacheSpaceFilter(HostFilter):
    """The node has (or is getting) the image, or has room in its cache for it."""

    def passes(self, node: NodeState, request: PlacementRequest) -> bool:
        if request.image_id in node.cached or request.image_id in node.in_flight:
            return True
        return node.free_cache_bytes >= request.image_size

    def why_not(self, node: NodeState, request: PlacementRequest) -> str:
        return "no room for the image in its cache"


def default_filters() -> list[HostFilter]:
    """Filters that need no clock; add `FreshHeartbeatFilter(now)` when you have one."""
    return [NodeUpFilter(), CacheSpaceFilter()]
