"""Place N instances of one image on nodes, one instance at a time.

Each pick re-filters and re-weighs over the state left by the previous picks:
the chosen node has one slot less, one more of the request's own instances
(`PlacementRequest.placed`, what the siblings weigher counts) and, if it
lacked the image, now has it in flight. Whether later instances then spread
or gather is the weighers' multipliers' call (rain.schedule.policy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from rain.model.errors import Conflict, InvalidRequest
from rain.model.node import NodeState, Placement
from rain.model.units import plural
from rain.schedule.filters import CapacityFilter, HostFilter, default_filters
from rain.schedule.policy import default_weighers
from rain.schedule.request import PlacementRequest
from rain.schedule.weighers import Weigher, total_weights

# Ω is a sum of floats; round before comparing so equal nodes tie exactly and
# the name decides, whatever order the weighers were summed in.
_OMEGA_DIGITS = 9


def place(
    image_id: str,
    count: int,
    nodes: Sequence[NodeState],
    weighers: Sequence[Weigher] | None = None,
    filters: Sequence[HostFilter] | None = None,
    *,
    image_size: int = 0,
) -> list[Placement]:
    """Where `count` instances of `image_id` go, best node first.

    All or nothing: raises `Conflict` when the eligible nodes have fewer free
    slots than `count`, before placing anything. Ties in Ω go to the node whose
    name sorts first, so the same input always gives the same plan.
    """
    if count < 1:
        raise InvalidRequest(f"instance count must be at least 1, got {count}")
    names = [node.name for node in nodes]
    if len(set(names)) != len(names):
        raise InvalidRequest("node names must be unique")
    request = PlacementRequest(image_id=image_id, image_size=image_size)
    weighers = default_weighers() if weighers is None else list(weighers)
    checks = [*(default_filters() if filters is None else filters), CapacityFilter()]

    state = {node.name: node for node in nodes}
    eligible = _eligible(list(state.values()), request, checks)
    free = sum(node.free_instances for node in eligible)
    if free < count:
        room = (f"{plural(free, 'free slot')} on {plural(len(eligible), 'eligible node')}"
                if eligible else "no node can take one")
        raise Conflict(
            f"not enough capacity for {plural(count, 'instance')} of {image_id}: {room}"
            f"{_left_out(list(state.values()), eligible, request, checks)}",
            details={"requested": count, "free": free, "eligible_nodes": len(eligible)},
        )

    counts: dict[str, int] = {}
    for _ in range(count):
        candidates = _eligible(list(state.values()), request, checks)
        if not candidates:  # a caller's filter changed its mind mid-way
            raise Conflict(f"no node left for instance {sum(counts.values()) + 1} of {image_id}")
        picked = replace(request, placed=dict(counts))
        omega = total_weights(candidates, picked, weighers)
        best = min(candidates, key=lambda n: (-round(omega[n.name], _OMEGA_DIGITS), n.name))
        state[best.name] = _after_one_more(best, request)
        counts[best.name] = counts.get(best.name, 0) + 1
    # dicts keep insertion order: nodes appear in the order they were first chosen.
    return [Placement(node=name, count=n) for name, n in counts.items()]


def _left_out(nodes: list[NodeState], eligible: list[NodeState], request: PlacementRequest,
              checks: Sequence[HostFilter], shown: int = 8) -> str:
    """`; left out: n1 full (8 of 8 instances), n2 down` (the first few nodes)."""
    kept = {node.name for node in eligible}
    said = []
    for node in sorted(nodes, key=lambda n: n.name):
        if node.name in kept:
            continue
        why = next(check.why_not(node, request) for check in checks
                   if not check.passes(node, request))
        if why:  # "" (e.g. a node the request did not name): not worth a word
            said.append(f"{node.name} {why}")
    if not said:
        return ""
    more = f" and {len(said) - shown} more" if len(said) > shown else ""
    return "; left out: " + ", ".join(said[:shown]) + more


def _eligible(
    nodes: list[NodeState], request: PlacementRequest, checks: Sequence[HostFilter]
) -> list[NodeState]:
    return [node for node in nodes if all(check.passes(node, request) for check in checks)]


def _after_one_more(node: NodeState, request: PlacementRequest) -> NodeState:
    """The node as the next pick should see it: one slot used, image on its way."""
    if request.image_id in node.cached or request.image_id in node.in_flight:
        return replace(node, running_instances=node.running_instances + 1)
    return replace(
        node,
        running_instances=node.running_instances + 1,
        in_flight=node.in_flight | {request.image_id},
        free_cache_bytes=max(0, node.free_cache_bytes - request.image_size),
    )
