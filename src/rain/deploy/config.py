"""Settings of the distribution side of the repository server (`[distribute]` in rain.toml).

Each transfer method keeps its own settings beside its code; this dataclass
only assembles them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rain.distribute.methods.bittorrent.config import BitTorrentConfig
from rain.distribute.methods.multicast.method import MulticastConfig
from rain.model.deploy import DEFAULT_STALL_SECONDS, MAX_SECONDS
from rain.model.errors import InvalidRequest

GiB = 1 << 30


@dataclass
class DistributeConfig:
    # Method when a deployment does not name one ("auto": chosen per deployment).
    default_method: str = "auto"
    # Bytes of materialised image files the server keeps for senders (seed, multicast).
    seed_dir_bytes: int = 64 * GiB
    # Fan-out of the tree method, and how many interior-disjoint trees share the
    # image (0: as many as the fan-out, so every node's upload is used; 1: one tree).
    tree_fanout: int = 2
    tree_stripes: int = 0
    # Seconds without progress after which a transfer source (tree parent, peer, swarm)
    # is given up on and an agent that does not answer is lost; a deployment's
    # `stall_seconds` option overrides it (rain.model.deploy).
    stall_seconds: float = DEFAULT_STALL_SECONDS
    # CA bundle to verify agents that serve HTTPS (private certificates); empty: system CAs.
    agent_ca: str = ""
    multicast: MulticastConfig = field(default_factory=MulticastConfig)
    bittorrent: BitTorrentConfig = field(default_factory=BitTorrentConfig)


@dataclass
class PrefetchConfig:
    """The popularity prefetcher (`[prefetch]`; rain.deploy.prefetch). Off by default: it
    spends bandwidth nobody asked for."""

    enabled: bool = False
    interval_seconds: float = 300.0
    window_seconds: float = 24 * 3600.0
    top_k: int = 3
    max_per_node: int = 1
    budget_bytes: int = 64 * GiB
    max_rate: float = 0.0  # bytes/s per node; 0: no cap


def check_distribute(config: DistributeConfig) -> None:
    """At start-up, not in each deployment: a bad setting would fail every one of them."""
    stall = config.stall_seconds
    if isinstance(stall, bool) or not isinstance(stall, int | float) \
            or not math.isfinite(stall) or not 0 < stall <= MAX_SECONDS:
        raise InvalidRequest(f"[distribute] stall_seconds must be above 0 and at most "
                             f"{MAX_SECONDS:g}, not {stall!r}")


def check_prefetch(config: PrefetchConfig) -> None:
    rate = config.max_rate
    if isinstance(rate, bool) or not isinstance(rate, int | float) \
            or not math.isfinite(rate) or rate < 0:
        raise InvalidRequest(f"[prefetch] max_rate must be 0 (no cap) or a positive "
                             f"number of bytes/s, not {rate!r}")
