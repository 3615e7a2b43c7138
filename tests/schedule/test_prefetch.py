from __future__ import annotations

from datetime import timedelta

import pytest

from rain.model import InvalidRequest
from rain.schedule import PrefetchOrder, popular_images, prefetch_plan
from tests.schedule.conftest import NOW, node

HOUR = 3600


def test_popular_images_counts_only_the_window() -> None:
    deployments = (
        [("old", NOW - timedelta(hours=3))] * 10  # popular once, not any more
        + [("a", NOW - timedelta(minutes=m)) for m in (1, 5, 50)]
        + [("b", NOW - timedelta(minutes=m)) for m in (2, 30)]
        + [("c", NOW - timedelta(minutes=10))]
    )
    assert popular_images(deployments, HOUR, 2, now=NOW) == ["a", "b"]
    assert popular_images(deployments, HOUR, 10, now=NOW) == ["a", "b", "c"]
    assert popular_images(deployments, 4 * HOUR, 1, now=NOW) == ["old"]


def test_popular_images_defaults_now_to_latest_and_breaks_ties_by_recency() -> None:
    deployments = [("x", NOW - timedelta(minutes=20)), ("y", NOW - timedelta(minutes=5))]
    assert popular_images(deployments, HOUR, 2) == ["y", "x"]
    assert popular_images([], HOUR, 3) == []


def test_prefetch_plan_most_popular_first_to_nodes_that_lack_it() -> None:
    nodes = [
        node("has", cached=("a",), free_cache=100),
        node("getting", in_flight=("a",), free_cache=100),
        node("down", up=False, free_cache=100),
        node("full", free_cache=5),
        node("roomy", free_cache=100),
    ]
    plan = prefetch_plan(["a", "b"], nodes, max_per_node=5, budget_bytes=1000,
                         sizes={"a": 10, "b": 20})
    assert plan == [
        PrefetchOrder("roomy", "a", 10),
        PrefetchOrder("getting", "b", 20),
        PrefetchOrder("has", "b", 20),
        PrefetchOrder("roomy", "b", 20),
    ]


def test_prefetch_plan_respects_budget_and_per_node_limit() -> None:
    nodes = [node(f"n{i}", free_cache=1000) for i in range(4)]
    sizes = {"a": 10, "big": 500, "c": 5}
    plan = prefetch_plan(["a", "big", "c"], nodes, max_per_node=1, budget_bytes=35, sizes=sizes)
    # 3 copies of a fit (30 bytes); big never fits; c takes the last node.
    assert plan == [
        PrefetchOrder("n0", "a", 10),
        PrefetchOrder("n1", "a", 10),
        PrefetchOrder("n2", "a", 10),
        PrefetchOrder("n3", "c", 5),
    ]
    assert sum(o.size for o in plan) <= 35
    assert prefetch_plan(["a"], nodes, max_per_node=0, budget_bytes=35, sizes=sizes) == []


def test_prefetch_plan_needs_sizes() -> None:
    with pytest.raises(InvalidRequest, match="no size known for images: z"):
        prefetch_plan(["z"], [node("a")], 1, 100, {})
