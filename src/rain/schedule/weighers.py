"""Host weighers and their combination Ω(h) = Σ mᵢ · N(wᵢ(h)) (seed 002 §5).

Each weigher gives a raw value per node; `normalise` rescales one weigher's
values over the candidate nodes to [0, 1] (min–max), so multipliers, not
units, decide how much each weigher counts. A negative multiplier inverts a
weigher's preference (e.g. pack instead of spread).
"""

from __future__ import annotations

from collections.abc import Sequence

from rain.model.node import NodeState
from rain.schedule.request import PlacementRequest


class Weigher:
    """Base class: `weigh` returns a raw value, higher meaning "prefer this node"."""

    def __init__(self, multiplier: float = 1.0) -> None:
        self.multiplier = multiplier

    def weigh(self, node: NodeState, request: PlacementRequest) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(multiplier={self.multiplier})"


class CacheWeigher(Weigher):
    """1 if the image is cached on the node, `in_flight_credit` if it is on its way, else 0.

    The paper's cache weigher only counts finished copies, so a burst of
    requests for a new image spreads over many nodes that all download it;
    counting images in flight (the gap seed 002 names) keeps them together.
    """

    def __init__(self, multiplier: float = 1.0, in_flight_credit: float = 0.75) -> None:
        super().__init__(multiplier)
        self.in_flight_credit = in_flight_credit

    def weigh(self, node: NodeState, request: PlacementRequest) -> float:
        if request.image_id in node.cached:
            return 1.0
        if request.image_id in node.in_flight:
            return self.in_flight_credit
        return 0.0


class FreeCapacityWeigher(Weigher):
    """Free instance slots (Nova's RAM weigher, for slots): a positive multiplier
    prefers the emptiest node (spread), a negative one the fullest (pack)."""

    def weigh(self, node: NodeState, request: PlacementRequest) -> float:
        return float(node.free_instances)


class SiblingsWeigher(Weigher):
    """Fewer instances of this same request on the node (Nova's soft anti-affinity).

    Free slots cannot tell "this deployment chose the node a moment ago" from
    "other deployments use it", and the in-flight credit even rewards the node
    this deployment is already sending the image to. This weigher counts only
    the request's own picks: a positive multiplier larger than the cache
    weigher's spreads a deployment over its nodes (cached ones still first), a
    negative one keeps it together. It cannot tell nodes apart on the first
    pick, so a one-instance deployment is placed by the cache and the load alone.
    """

    def weigh(self, node: NodeState, request: PlacementRequest) -> float:
        return -float(request.placed.get(node.name, 0))


class FreeCacheWeigher(Weigher):
    """Free cache bytes: prefer nodes that can cache more without evicting."""

    def weigh(self, node: NodeState, request: PlacementRequest) -> float:
        return float(node.free_cache_bytes)


def normalise(values: Sequence[float]) -> list[float]:
    """Min–max rescale to [0, 1].

    When all values are equal (including a single node) the formula divides by
    zero; we return 0 for every node, so a weigher that cannot tell the nodes
    apart adds nothing to anyone's Ω and leaves the choice to the others.
    """
    if not values:
        return []
    low, high = min(values), max(values)
    if high == low:
        return [0.0] * len(values)
    span = high - low
    return [(value - low) / span for value in values]


def total_weights(
    nodes: Sequence[NodeState], request: PlacementRequest, weighers: Sequence[Weigher]
) -> dict[str, float]:
    """Ω for every node in `nodes` (the candidates after filtering), by node name."""
    totals = dict.fromkeys((node.name for node in nodes), 0.0)
    for weigher in weighers:
        raw = [weigher.weigh(node, request) for node in nodes]
        for node, value in zip(nodes, normalise(raw), strict=True):
            totals[node.name] += weigher.multiplier * value
    return totals
