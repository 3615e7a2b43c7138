from __future__ import annotations

import random
from datetime import timedelta

import pytest

from rain.model import Conflict, InvalidRequest, Placement
from rain.schedule import (
    CacheWeigher,
    FreeCapacityWeigher,
    FreshHeartbeatFilter,
    NodeUpFilter,
    default_weighers,
    place,
)
from tests.schedule.conftest import NOW, node


def as_dict(placements: list[Placement]) -> dict[str, int]:
    return {p.node: p.count for p in placements}


def test_prefers_cached_then_in_flight_then_none() -> None:
    nodes = [node("a"), node("b", in_flight=("img",)), node("c", cached=("img",))]
    assert place("img", 1, nodes) == [Placement("c", 1)]
    assert place("img", 1, nodes[:2]) == [Placement("b", 1)]


def test_in_flight_is_counted_so_a_new_image_clusters() -> None:
    nodes = [node(f"n{i}", capacity=8) for i in range(4)]
    # The first pick puts the image in flight to n0; the next seven follow it.
    assert place("img", 8, nodes) == [Placement("n0", 8)]
    # Without in-flight credit (the paper's weigher) the same request spreads
    # over every node, and each of them downloads the image.
    paper = [CacheWeigher(3.0, in_flight_credit=0.0), FreeCapacityWeigher(1.0)]
    assert as_dict(place("img", 8, nodes, paper)) == {f"n{i}": 2 for i in range(4)}


def test_capacity_is_respected_and_spills_over() -> None:
    nodes = [node("a", capacity=4, running=3, cached=("img",)), node("b", capacity=4)]
    assert place("img", 4, nodes) == [Placement("a", 1), Placement("b", 3)]


def test_full_node_is_skipped_even_with_caller_filters() -> None:
    nodes = [node("a", capacity=2, running=2, cached=("img",)), node("b")]
    assert place("img", 1, nodes, filters=[NodeUpFilter()]) == [Placement("b", 1)]


def test_down_and_stale_nodes_are_excluded() -> None:
    nodes = [
        node("down", up=False, cached=("img",)),
        node("stale", cached=("img",), last_heartbeat=NOW - timedelta(minutes=5)),
        node("silent", cached=("img",), last_heartbeat=None),
        node("ok"),
    ]
    filters = [NodeUpFilter(), FreshHeartbeatFilter(NOW, max_age_seconds=30)]
    assert place("img", 3, nodes, filters=filters) == [Placement("ok", 3)]


def test_not_enough_capacity_is_a_conflict_before_anything_is_placed() -> None:
    nodes = [node("a", capacity=8, running=5), node("b", capacity=8), node("c", up=False)]
    with pytest.raises(Conflict) as caught:
        place("img", 12, nodes)
    assert str(caught.value) == (
        "not enough capacity for 12 instances of img: 11 free slots on 2 eligible nodes"
    )
    assert caught.value.details["free"] == 11
    assert as_dict(place("img", 11, nodes)) == {"a": 3, "b": 8}


def test_image_too_big_for_a_nodes_cache_goes_elsewhere() -> None:
    nodes = [node("a", free_cache=10), node("b", free_cache=10**9)]
    assert place("img", 2, nodes, image_size=1000) == [Placement("b", 2)]


def test_bad_requests() -> None:
    with pytest.raises(InvalidRequest):
        place("img", 0, [node("a")])
    with pytest.raises(InvalidRequest):
        place("img", 1, [node("a"), node("a")])


def test_192_instances_over_24_nodes_fill_every_slot() -> None:
    nodes = [node(f"n{i:02}", capacity=8, cached=("img",) if i % 6 == 0 else ()) for i in range(24)]
    placements = place("img", 192, nodes)
    assert as_dict(placements) == {f"n{i:02}": 8 for i in range(24)}
    # Cached nodes are used first.
    assert [p.node for p in placements[:4]] == ["n00", "n06", "n12", "n18"]


def test_192_instances_prefer_cached_nodes_and_download_to_few_others() -> None:
    cached = {"n03", "n07", "n11", "n15", "n19", "n23"}
    nodes = [
        node(name, capacity=10, running=i % 3, cached=("img",) if name in cached else ())
        for i, name in enumerate(f"n{i:02}" for i in range(24))
    ]
    got = as_dict(place("img", 192, nodes))
    assert sum(got.values()) == 192
    for n in nodes:
        assert got.get(n.name, 0) <= n.free_instances
    for name in cached:  # every cached node is filled before any other is used
        assert got[name] == next(n.free_instances for n in nodes if n.name == name)
    downloads = [name for name in got if name not in cached]
    free_elsewhere = sorted((n.free_instances for n in nodes if n.name not in cached), reverse=True)
    # Clustering: the image goes to no more new nodes than capacity requires.
    needed = 192 - sum(got[name] for name in cached)
    minimum = next(k for k in range(1, 19) if sum(free_elsewhere[:k]) >= needed)
    assert len(downloads) == minimum


def test_same_input_in_any_order_gives_the_same_plan() -> None:
    nodes = [
        node(f"n{i:02}", capacity=4 + i % 5, running=i % 2, cached=("img",) if i % 4 == 0 else (),
             free_cache=(i % 3) * 2**30)  # many ties
        for i in range(24)
    ]
    expected = place("img", 60, nodes, default_weighers())
    rng = random.Random(2)
    for _ in range(5):
        shuffled = nodes[:]
        rng.shuffle(shuffled)
        assert place("img", 60, shuffled, default_weighers()) == expected


def test_ties_go_to_the_first_name() -> None:
    nodes = [node("b"), node("c"), node("a")]
    assert place("img", 1, nodes) == [Placement("a", 1)]
