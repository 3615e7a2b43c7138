"""Placement of instance requests on nodes: filters, cache-aware weighers, prefetch.

Pure functions over `rain.model` data (no I/O, no clock): the API reads node
reports and the usage log, asks this package for a plan, and acts on it.
"""

from rain.schedule.config import ScheduleConfig
from rain.schedule.filters import (
    CacheSpaceFilter,
    CapacityFilter,
    FreshHeartbeatFilter,
    HostFilter,
    NodeUpFilter,
    default_filters,
)
from rain.schedule.placer import place
from rain.schedule.policy import (
    Policy,
    default_weighers,
    describe,
    parse_policy,
    policy_name,
    weighers_for,
    with_policy,
)
from rain.schedule.prefetch import PrefetchOrder, popular_images, prefetch_plan
from rain.schedule.request import PlacementRequest
from rain.schedule.weighers import (
    CacheWeigher,
    FreeCacheWeigher,
    FreeCapacityWeigher,
    SiblingsWeigher,
    Weigher,
    normalise,
    total_weights,
)

__all__ = [
    "CacheSpaceFilter",
    "CacheWeigher",
    "CapacityFilter",
    "FreeCacheWeigher",
    "FreeCapacityWeigher",
    "FreshHeartbeatFilter",
    "HostFilter",
    "NodeUpFilter",
    "PlacementRequest",
    "Policy",
    "PrefetchOrder",
    "ScheduleConfig",
    "SiblingsWeigher",
    "Weigher",
    "default_filters",
    "default_weighers",
    "describe",
    "normalise",
    "parse_policy",
    "place",
    "policy_name",
    "popular_images",
    "prefetch_plan",
    "total_weights",
    "weighers_for",
    "with_policy",
]
