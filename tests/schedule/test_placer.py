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
    Policy,
    ScheduleConfig,
    default_weighers,
    place,
    policy_name,
    weighers_for,
)
from tests.schedule.conftest import NOW, node


def as_dict(placements: list[Placement]) -> dict[str, int]:
    return {p.node: p.count for p in placements}


def test_prefers_cached_then_in_flight_then_none() -> None:
    nodes = [node("a"), node("b", in_flight=("img",)), node("c", cached=("img",))]
    assert place("img", 1, nodes) == [Placement("c", 1)]
    assert place("img", 1, nodes[:2]) == [Placement("b", 1)]


PACK = weighers_for(policy=Policy.PACK)
SPREAD = weighers_for(policy=Policy.SPREAD)


def test_two_nodes_two_instances_spread_one_each_pack_both_on_one() -> None:
    """The README's case: `deploy --nodes n01,n02 --count 2` on two empty nodes."""
    nodes = [node("n01"), node("n02")]
    assert place("img", 2, nodes) == [Placement("n01", 1), Placement("n02", 1)]
    assert place("img", 2, nodes, SPREAD) == [Placement("n01", 1), Placement("n02", 1)]
    assert place("img", 2, nodes, PACK) == [Placement("n01", 2)]
    # More instances than nodes: spread goes round, pack fills one node first.
    assert as_dict(place("img", 5, nodes)) == {"n01": 3, "n02": 2}
    assert as_dict(place("img", 5, [node("n01", capacity=4), node("n02")], PACK)) == \
        {"n01": 4, "n02": 1}


def test_cache_awareness_holds_under_both_policies() -> None:
    cached = [node("n01"), node("n02", cached=("img",)), node("n03", cached=("img",))]
    # One instance goes to a node with the image, even a busier one, whatever the policy.
    busy = [node("n01"), node("n02", running=6, cached=("img",))]
    for weighers in (SPREAD, PACK):
        assert place("img", 1, cached, weighers) == [Placement("n02", 1)]
        assert place("img", 1, busy, weighers) == [Placement("n02", 1)]
    # Spread uses the cached nodes before a node that must download; pack stays on one.
    assert as_dict(place("img", 2, cached, SPREAD)) == {"n02": 1, "n03": 1}
    assert as_dict(place("img", 2, cached, PACK)) == {"n02": 2}
    # Once each cached node has one, spread sends the image to a new node.
    assert as_dict(place("img", 3, [*cached[1:], node("n04")], SPREAD)) == \
        {"n02": 1, "n03": 1, "n04": 1}


def test_pack_stacks_on_the_fullest_node_spread_on_the_emptiest() -> None:
    nodes = [node("a", running=1), node("b", running=5), node("c", running=3)]
    assert place("img", 1, nodes, PACK) == [Placement("b", 1)]
    assert place("img", 1, nodes, SPREAD) == [Placement("a", 1)]


def test_in_flight_attracts_the_next_deployment() -> None:
    # Another deployment is sending the image to n1 (the gap seed 002 names): a new
    # one-instance request goes there too, though n1 is the busier node.
    nodes = [node("n0"), node("n1", running=2, in_flight=("img",))]
    for weighers in (SPREAD, PACK):
        assert place("img", 1, nodes, weighers) == [Placement("n1", 1)]
    # Without in-flight credit (the paper's weigher) free slots decide.
    paper = [CacheWeigher(3.0, in_flight_credit=0.0), FreeCapacityWeigher(1.0)]
    assert place("img", 1, nodes, paper) == [Placement("n0", 1)]
    # Within one pack request the image's first node keeps the rest.
    four = [node(f"n{i}", capacity=8) for i in range(4)]
    assert place("img", 8, four, PACK) == [Placement("n0", 8)]
    assert as_dict(place("img", 8, four, SPREAD)) == {f"n{i}": 2 for i in range(4)}


def test_multipliers_decide_and_a_weak_siblings_weigher_gathers() -> None:
    """The multipliers, not the policy's name, place: a siblings multiplier below the
    cache weigher's lets the in-flight credit gather a new image's instances."""
    weak = ScheduleConfig(siblings_weight_multiplier=1.0)
    assert policy_name(weak) == "spread"
    assert place("img", 2, [node("n01"), node("n02")], weighers_for(weak)) == \
        [Placement("n01", 2)]
    # Cache off, spread by free slots only: the emptier node first.
    flat = ScheduleConfig(cache_weight_multiplier=0.0, siblings_weight_multiplier=0.0)
    nodes = [node("a", running=4, cached=("img",)), node("b")]
    assert place("img", 1, nodes, weighers_for(flat)) == [Placement("b", 1)]
    assert place("img", 1, nodes) == [Placement("a", 1)]


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
        "not enough capacity for 12 instances of img: 11 free slots on 2 eligible nodes; "
        "left out: c down"
    )
    assert caught.value.details["free"] == 11
    assert as_dict(place("img", 11, nodes)) == {"a": 3, "b": 8}


def test_a_refusal_says_which_nodes_were_full_not_zero_slots_on_zero_nodes() -> None:
    with pytest.raises(Conflict) as caught:
        place("img", 1, [node("n1", capacity=2, running=2)])
    assert str(caught.value) == ("not enough capacity for 1 instance of img: no node can take "
                                 "one; left out: n1 full (2 of 2 instances)")


def test_a_refusal_names_the_asked_for_nodes_not_the_others() -> None:
    """`--nodes n15` on a 16-node cluster: the reason is n15's, not "n01 refused by …"."""
    from rain.deploy.service import NamedNodes

    nodes = [node(f"n{i:02}") for i in range(16)] + [node("n15", capacity=8, running=8)]
    nodes = [n for n in nodes if n.name != "n15"] + [nodes[-1]]
    with pytest.raises(Conflict) as caught:
        place("img", 1, nodes, filters=[NamedNodes({"n15"})])
    assert str(caught.value).endswith("; left out: n15 full (8 of 8 instances)"), caught.value


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
    """Keep a deployment together but start on the emptiest nodes (a custom mix: siblings
    pack, free slots spread): cached nodes fill first, then as few new ones as can hold
    the rest."""
    cached = {"n03", "n07", "n11", "n15", "n19", "n23"}
    nodes = [
        node(name, capacity=10, running=i % 3, cached=("img",) if name in cached else ())
        for i, name in enumerate(f"n{i:02}" for i in range(24))
    ]
    together = ScheduleConfig(siblings_weight_multiplier=-4.0)
    assert policy_name(together) == "custom"
    got = as_dict(place("img", 192, nodes, weighers_for(together)))
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
