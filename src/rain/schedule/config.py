"""Placement settings (`[schedule]` in rain.toml), after Nova's filter scheduler.

Ω(node) = Σ multiplierᵢ · N(weightᵢ(node)), N the min–max normalisation over
the candidate nodes, and the node with the largest Ω takes the next instance.
As in Nova, a positive multiplier on a load weigher spreads and a negative one
packs (stacks); the magnitudes say which weigher wins when they disagree.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ScheduleConfig:
    # Nodes that cache the image (1), or are getting it (in_flight_credit), over
    # nodes that would have to download it (0). Larger than instances_weight_multiplier,
    # so free slots never move an instance away from a cached copy.
    cache_weight_multiplier: float = 3.0
    in_flight_credit: float = 0.75
    # Free instance slots: positive spreads load over nodes, negative packs it.
    instances_weight_multiplier: float = 1.0
    # Instances of the same deployment already on the node: positive spreads a
    # deployment's instances over its nodes, negative keeps them together. Larger than
    # cache_weight_multiplier, or a new image's in-flight credit gathers them anyway.
    siblings_weight_multiplier: float = 4.0
    # Free cache bytes: a light tie-breaker (room for the image without evicting).
    free_cache_weight_multiplier: float = 0.5
