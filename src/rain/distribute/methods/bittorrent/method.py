"""`bittorrent`: a private libtorrent swarm of the deployment's nodes and the repository.

The repository makes the image's torrent when the image becomes active
(`torrent_on_activate`, or at the first deployment), seeds it from its
materialised file, tracks each deployment's swarm at
`/v1/tracker/{peer_token}/announce`, and serves as an HTTP web seed when a
node's swarm stalls. Nodes re-seed what they have to each other while they
download, and keep seeding from their cache until the deployment is over.
Every byte is checked against the image's SHA-256 chunk digests before use;
see rain.distribute.methods.bittorrent.node and docs/bittorrent.md.

The plan of a node (the same for all nodes of a deployment but for the view port):

    {"torrent": base64 .torrent, "info_hash": hex v1 info hash,
     "tracker": "/v1/tracker/{peer_token}/announce"   (relative to the repository URL),
     "seeder": {"host": address or "" (= the repository URL's host),
                "port": the full seed's port, "striped": whether the deployment has views,
                "view": this node's stripe view's port (0: none), "rescue_after": seconds},
     "web_seed": {"path": "/v1/images/{id}/file", "mode": "never"|"stall"|"always",
                  "after": seconds without progress before it is added},
     "encrypt": bool, "port": the node session's port,
     "allow": [addresses of the deployment's nodes and the repository] (null: anyone),
     "deployment": job id,
     "session": {"connections_limit", "unchoke_slots", "announce_interval",
                 "request_queue_time"}}
"""

from __future__ import annotations

import base64
import logging
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar

from rain.distribute.methods.base import DeploymentJob, FetchContext, RepoSide
from rain.distribute.methods.bittorrent.config import BitTorrentConfig
from rain.distribute.methods.bittorrent.node import (
    NodeSession,
    Transfer,
    current_session,
    default_session,
)
from rain.distribute.methods.bittorrent.seeder import SERVICE, RepoSeeder
from rain.distribute.methods.bittorrent.torrent import (
    ensure_torrent,
    make_torrent,
    torrent_on_activate,
    zero_pieces,
)
from rain.distribute.methods.bittorrent.tracker import PATH as TRACKER_PATH
from rain.distribute.methods.bittorrent.tracker import SERVICE as TRACKER_SERVICE
from rain.distribute.methods.bittorrent.tracker import TrackerRegistry, resolve

__all__ = ["COORDINATOR", "NODE", "BitTorrentConfig", "BitTorrentCoordinator",
           "BitTorrentNode", "NodeSession", "make_torrent", "torrent_on_activate"]
log = logging.getLogger("rain.distribute.bittorrent")
SESSION_KEYS = ("connections_limit", "unchoke_slots", "announce_interval", "request_queue_time")
WILDCARDS = ("", "0.0.0.0", "::")


def config_of(server: RepoSide) -> BitTorrentConfig:
    cfg = getattr(server.config, "bittorrent", None)
    return cfg if isinstance(cfg, BitTorrentConfig) else BitTorrentConfig()


def seeder_of(server: RepoSide) -> RepoSeeder:
    """The server's seeder (started by the first deployment that needs it)."""
    with server.lock:
        seeder = server.services.get(SERVICE)
        if seeder is None:
            seeder = server.services[SERVICE] = RepoSeeder(server.host, config_of(server))
        return seeder


def tracker_of(server: RepoSide) -> TrackerRegistry:
    """The server's tracker registry (what `rain.api.tracker` answers from)."""
    with server.lock:
        registry = server.services.get(TRACKER_SERVICE)
        if registry is None:
            registry = server.services[TRACKER_SERVICE] = TrackerRegistry(
                config_of(server).announce_interval)
        return registry


class BitTorrentCoordinator:
    name: ClassVar[str] = "bittorrent"

    def prepare(self, job: DeploymentJob) -> dict[str, dict[str, Any]]:
        server = job.server
        cfg = config_of(server)
        info_hash, piece_size, torrent = ensure_torrent(server.repo, job.image, cfg)
        seeder = seeder_of(server)
        registry = tracker_of(server)
        if registry.on_peer is None:
            registry.on_peer = seeder.allow
        nodes = resolve(n.host for n in job.nodes)
        own = resolve([server.host]) if server.host not in WILDCARDS else set()
        job.state["bittorrent"] = {"info_hash": info_hash}
        views = seeder.seed(job.id, info_hash, torrent, Path(job.seed_file()), nodes,
                            zero=zero_pieces(job.manifest, piece_size), nodes=len(job.nodes),
                            peers=lambda: [(ip, port) for ip, port, left
                                           in registry.peers(job.peer_token) if left > 0])
        seeder_host = "" if server.host in WILDCARDS else server.host
        # With stripe views the tracker lists no seed: a node reaches the full one only
        # when it needs rescue (see rain.distribute.methods.bittorrent.seeder).
        registry.register(job.peer_token, job.id, info_hash, 0 if views else seeder.port,
                          seeder_host, nodes)
        job.state["bittorrent"]["registered"] = True
        plan = {
            "torrent": base64.b64encode(torrent).decode(),
            "info_hash": info_hash,
            "tracker": TRACKER_PATH.format(peer_token=job.peer_token),
            "web_seed": {"path": f"/v1/images/{job.image.id}/file",
                         "mode": job.options.web_seed or str(cfg.web_seed),
                         "after": float(cfg.web_seed_after)},
            "encrypt": job.options.encrypt,
            "port": cfg.node_port,
            "allow": sorted(nodes | own) if cfg.restrict_peers else None,
            "deployment": job.id,
            "session": {k: getattr(cfg, k) for k in SESSION_KEYS},
        }
        plans = {}
        for k, n in enumerate(job.nodes):
            seeder_plan = {"host": seeder_host, "port": seeder.port, "striped": bool(views),
                           "view": views[k] if k < len(views) else 0,
                           "rescue_after": float(cfg.rescue_after)}
            plans[n.name] = dict(plan, seeder=seeder_plan)
        return plans

    def finish(self, job: DeploymentJob) -> None:
        state = job.state.setdefault("bittorrent", {})
        if state.get("registered"):
            tracker_of(job.server).unregister(job.peer_token)
        if "info_hash" in state and "repo_bytes" not in state:
            state["repo_bytes"] = seeder_of(job.server).unseed(job.id)

    def repo_bytes(self, job: DeploymentJob) -> int:
        """What the seeder sent for the job (web seed bytes went through the HTTP file
        endpoint, which counts them itself)."""
        state = job.state.get("bittorrent", {})
        if "repo_bytes" in state:
            return int(state["repo_bytes"])
        if "info_hash" not in state:
            return 0
        return seeder_of(job.server).uploaded(job.id)


class BitTorrentNode:
    name: ClassVar[str] = "bittorrent"

    def __init__(self, session: NodeSession | None = None) -> None:
        self._session = session

    def session_for(self, ctx: FetchContext) -> NodeSession:
        if self._session is not None:
            return self._session
        known = {f.name for f in fields(BitTorrentConfig)}
        tuned = {k: v for k, v in dict(ctx.plan.get("session") or {}).items() if k in known}
        port = ctx.plan.get("port")
        return default_session(ctx.host, int(port) if port else None, BitTorrentConfig(**tuned))

    def fetch(self, ctx: FetchContext) -> None:
        Transfer(self.session_for(ctx), ctx).run()

    def cached(self, ctx: FetchContext, path: Path) -> None:
        self.session_for(ctx).reseed(ctx.image_id, path)

    def release(self, image_id: str) -> None:
        session = self._session or current_session()
        if session is not None:
            session.remove(image_id)


NODE = BitTorrentNode()
COORDINATOR = BitTorrentCoordinator()
