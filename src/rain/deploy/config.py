"""Settings of the distribution side of the repository server (`[distribute]` in rain.toml).

Each transfer method keeps its own settings beside its code; this dataclass
only assembles them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rain.distribute.methods.bittorrent.config import BitTorrentConfig
from rain.distribute.methods.multicast.method import MulticastConfig
from rain.model.deploy import DEFAULT_STALL_SECONDS

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
