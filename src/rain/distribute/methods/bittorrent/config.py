"""Settings of the BitTorrent method (`[distribute.bittorrent]` in rain.toml).

Kept free of libtorrent so the server's configuration loads without it.
"""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1 << 10
MiB = 1 << 20


@dataclass
class BitTorrentConfig:
    # Where the repository's seeder listens (on the server's own address) and where a node
    # agent's session listens when the plan names no port.
    seeder_port: int = 6880
    node_port: int = 6881
    # The repository's stripe views listen on view_port, view_port + 1, ... (one per node).
    view_port: int = 6900
    # Piece size of new torrents (≥ 4 MiB). Larger images get larger pieces, so that a
    # torrent lists at most `max_pieces` pieces (20 bytes each, carried in every plan).
    piece_size: int = 4 * MiB
    max_pieces: int = 16384
    # Connections: a deployment is at most a few dozen nodes plus the seeder; every peer
    # of a LAN swarm is worth unchoking at once (no tit-for-tat to enforce among our nodes).
    connections_limit: int = 200
    unchoke_slots: int = 64
    # Bytes queued per connection: the kernel's send buffer (SO_SNDBUF) and libtorrent's own
    # buffer above it. A node's piece requests and ACKs to a peer wait behind what it
    # sends that peer; with deep buffers they waited up to a second and the busiest
    # uploaders finished last (docs/bittorrent.md, "Shallow send buffers"). 64 KiB in
    # flight still fills a LAN path of 0.5 ms at 1 Gbit/s. 0: the system's default.
    send_socket_buffer: int = 64 * KiB
    send_buffer: int = 256 * KiB
    # Stripe views: at most this many sessions that each seed one stripe of the pieces to
    # one node (rain.distribute.methods.bittorrent.seeder); 0 or 1: nodes use the full seed.
    max_views: int = 32
    # Views that send at full rate at once, a piece per turn, round-robin (the others
    # trickle `view_trickle` bytes/s); 0: all views at once. Measured, turns did not make
    # deployments faster (docs/bittorrent.md), so they are off by default.
    view_turns: int = 0
    view_trickle: int = 16 * 1024
    # When every stripe has been sent, the full seed connects to the nodes and serves the
    # pieces still rare among them (costs up to ~0.5 S more; no clear gain measured).
    tail_seed: bool = False
    # Seconds without any payload before a node that has a view also connects to the full
    # seed (at least three times what one piece takes from its view).
    rescue_after: float = 5.0
    # "never" | "stall" | "always": when nodes add the repository's file endpoint as an
    # HTTP web seed (docs/bittorrent.md explains why "stall").
    web_seed: str = "stall"
    # Seconds without payload progress before a node adds the web seed ("stall" mode).
    web_seed_after: float = 20.0
    # libtorrent's request_queue_time on nodes: a node keeps this many seconds of a peer's
    # measured rate requested from it.
    request_queue_time: int = 3
    # Tracker: seconds between a node's announces.
    announce_interval: int = 15
    # Only addresses of the deployment's nodes (and the repository) may connect.
    restrict_peers: bool = True
