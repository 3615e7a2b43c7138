"""Popularity prefetch: copy the most deployed images to nodes before they are asked for.

Seed 002 observes that a few images account for most instances, so having
them cached ahead of time removes the download from most deployments. Both
functions are pure: the caller reads the usage log and node reports, and
hands the plan to the distribution layer, which throttles the actual bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from rain.model.errors import InvalidRequest
from rain.model.node import NodeState


@dataclass(frozen=True)
class PrefetchOrder:
    """Copy `image_id` (`size` bytes) into `node`'s cache."""

    node: str
    image_id: str
    size: int


def popular_images(
    deployments: Sequence[tuple[str, datetime]],
    window_seconds: float,
    top_k: int,
    *,
    now: datetime | None = None,
) -> list[str]:
    """The `top_k` most deployed image ids in the window `[now - window, now]`, most first.

    `now` defaults to the latest deployment so the function needs no clock.
    Ties go to the image deployed most recently, then to the smaller id, so
    the answer is repeatable.
    """
    if window_seconds < 0 or top_k < 0:
        raise InvalidRequest("window_seconds and top_k must not be negative")
    if not deployments or top_k == 0:
        return []
    end = now if now is not None else max(when for _, when in deployments)
    start = end - timedelta(seconds=window_seconds)
    counts: dict[str, int] = {}
    latest: dict[str, datetime] = {}
    for image_id, when in deployments:
        if start <= when <= end:
            counts[image_id] = counts.get(image_id, 0) + 1
            if image_id not in latest or when > latest[image_id]:
                latest[image_id] = when
    ranked = sorted(
        counts, key=lambda i: (-counts[i], -(latest[i] - start).total_seconds(), i)
    )
    return ranked[:top_k]


def prefetch_plan(
    popular: Sequence[str],
    nodes: Sequence[NodeState],
    max_per_node: int,
    budget_bytes: int,
    sizes: Mapping[str, int],
) -> list[PrefetchOrder]:
    """Which images to copy where, most popular image first.

    An image goes to every up node that neither has it nor is fetching it and
    has room in its cache, nodes with the most free cache first (then by name),
    before the next image gets any: the most popular image is the one most
    likely to be asked for next. At most `max_per_node` orders per node, and
    at most `budget_bytes` in total; an image too big for the budget left is
    skipped and smaller ones after it may still fit.
    """
    if max_per_node < 0 or budget_bytes < 0:
        raise InvalidRequest("max_per_node and budget_bytes must not be negative")
    missing = [image_id for image_id in popular if image_id not in sizes]
    if missing:
        raise InvalidRequest(f"no size known for images: {', '.join(missing)}")

    free = {node.name: node.free_cache_bytes for node in nodes}
    planned = dict.fromkeys(free, 0)
    budget = budget_bytes
    orders: list[PrefetchOrder] = []
    for image_id in dict.fromkeys(popular):  # drop repeats, keep order
        size = sizes[image_id]
        if size > budget:
            continue
        lacking = [
            node
            for node in nodes
            if node.up and image_id not in node.cached and image_id not in node.in_flight
        ]
        for node in sorted(lacking, key=lambda n: (-free[n.name], n.name)):
            if size > budget:
                break
            if planned[node.name] >= max_per_node or free[node.name] < size:
                continue
            orders.append(PrefetchOrder(node=node.name, image_id=image_id, size=size))
            free[node.name] -= size
            planned[node.name] += 1
            budget -= size
    return orders
