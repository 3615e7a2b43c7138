from __future__ import annotations

import pytest

from rain.schedule import (
    CacheWeigher,
    FreeCacheWeigher,
    FreeCapacityWeigher,
    PlacementRequest,
    normalise,
    total_weights,
)
from tests.schedule.conftest import node

REQ = PlacementRequest("img")


def test_normalise_rescales_to_unit_interval() -> None:
    assert normalise([2.0, 4.0, 6.0]) == [0.0, 0.5, 1.0]
    assert normalise([-3.0, 1.0]) == [0.0, 1.0]


def test_normalise_equal_values_give_zero() -> None:
    assert normalise([5.0, 5.0, 5.0]) == [0.0, 0.0, 0.0]
    assert normalise([7.0]) == [0.0]
    assert normalise([]) == []


def test_cache_weigher_ranks_cached_over_in_flight_over_none() -> None:
    weigher = CacheWeigher(in_flight_credit=0.75)
    cached = node("a", cached=("img",))
    flying = node("b", in_flight=("img",))
    empty = node("c", cached=("other",))
    assert weigher.weigh(cached, REQ) == 1.0
    assert weigher.weigh(flying, REQ) == 0.75
    assert weigher.weigh(empty, REQ) == 0.0
    omega = total_weights([cached, flying, empty], REQ, [weigher])
    assert omega["a"] > omega["b"] > omega["c"]


def test_multiplier_scales_and_negative_inverts() -> None:
    few = node("few", capacity=8, running=6)  # 2 free
    many = node("many", capacity=8, running=2)  # 6 free
    spread = total_weights([few, many], REQ, [FreeCapacityWeigher(2.0)])
    assert spread == {"few": 0.0, "many": 2.0}
    pack = total_weights([few, many], REQ, [FreeCapacityWeigher(-1.0)])
    assert pack == {"few": 0.0, "many": -1.0}
    assert max(pack, key=pack.__getitem__) == "few"


def test_weights_sum_over_weighers_after_normalising_each() -> None:
    # Raw bytes dwarf raw slot counts; normalisation makes the multipliers decide.
    a = node("a", capacity=8, running=0, free_cache=10)
    b = node("b", capacity=8, running=8, free_cache=10**12)
    omega = total_weights([a, b], REQ, [FreeCapacityWeigher(3.0), FreeCacheWeigher(1.0)])
    assert omega == pytest.approx({"a": 3.0, "b": 1.0})


def test_weigher_that_cannot_tell_nodes_apart_adds_nothing() -> None:
    a, b = node("a", cached=("img",)), node("b", cached=("img",))
    assert total_weights([a, b], REQ, [CacheWeigher(5.0)]) == {"a": 0.0, "b": 0.0}
