from __future__ import annotations

from datetime import timedelta

from rain.schedule import (
    CacheSpaceFilter,
    CapacityFilter,
    FreshHeartbeatFilter,
    NodeUpFilter,
    PlacementRequest,
)
from tests.schedule.conftest import NOW, node

REQ = PlacementRequest("img", image_size=1000)


def test_node_up_filter() -> None:
    assert NodeUpFilter().passes(node("a"), REQ)
    assert not NodeUpFilter().passes(node("a", up=False), REQ)


def test_fresh_heartbeat_filter_excludes_stale_and_silent_nodes() -> None:
    check = FreshHeartbeatFilter(NOW, max_age_seconds=30)
    assert check.passes(node("a", last_heartbeat=NOW - timedelta(seconds=30)), REQ)
    assert not check.passes(node("a", last_heartbeat=NOW - timedelta(seconds=31)), REQ)
    assert not check.passes(node("a", last_heartbeat=None), REQ)


def test_capacity_filter() -> None:
    assert CapacityFilter().passes(node("a", capacity=8, running=7), REQ)
    assert not CapacityFilter().passes(node("a", capacity=8, running=8), REQ)
    assert not CapacityFilter().passes(node("a", capacity=8, running=9), REQ)


def test_cache_space_filter_needs_room_unless_image_is_there_or_coming() -> None:
    check = CacheSpaceFilter()
    assert check.passes(node("a", free_cache=1000), REQ)
    assert not check.passes(node("a", free_cache=999), REQ)
    assert check.passes(node("a", free_cache=0, cached=("img",)), REQ)
    assert check.passes(node("a", free_cache=0, in_flight=("img",)), REQ)
