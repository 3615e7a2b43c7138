"""`Agent`: one compute node's cache, transfers, instance disks and its link to the repository."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rain import __version__
from rain.agent.cache import NodeCache, check_id
from rain.agent.chunkindex import ChunkIndex
from rain.agent.config import AgentConfig
from rain.agent.grants import PeerGrants
from rain.agent.instances import Instances
from rain.agent.server import AgentHTTPServer
from rain.agent.transfers import DONE, FETCHING, FetchRequest, Transfers
from rain.distribute.partial import PartialImage
from rain.distribute.source import TransferStats
from rain.model.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    RainError,
    Unauthorized,
)

log = logging.getLogger("rain.agent")
KEY_FILE = "agent.key"


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        if not config.name:
            raise InvalidRequest("the agent needs a node name (--name)")
        check_id(config.name, "node name")
        self.config = config
        self.name = config.name
        root = Path(config.cache_dir).absolute()
        root.mkdir(parents=True, exist_ok=True)
        self.key = _agent_key(root / KEY_FILE)
        self.cache = NodeCache(root / "cache", config.cache_size)
        # Instances re-pin their images on start, before anything can be evicted.
        self.instances = Instances(root / "instances", self.cache)
        self.context = _client_context(config)
        self.host = ""
        self.address = config.advertise.rstrip("/")
        # Chunks by digest over the cached images (and transfers in flight), for the
        # chunks method and peers; it follows evictions by itself.
        self.chunks = ChunkIndex(self.cache)
        self.transfers: Transfers | None = None
        self.grants = PeerGrants(config.peer_token_seconds)
        self._digests: dict[str, frozenset[bytes]] = {}  # image id → its chunk digests
        self._served: dict[str, PartialImage] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._registered = False
        self._ever_registered = False
        self.refused: RainError | None = None  # why the repository turned us away at start
        self.httpd: AgentHTTPServer | None = None

    # -- life cycle ----------------------------------------------------------------
    def bind(self) -> None:
        """Open the listening socket and work out the address the node is known by."""
        server_context = None
        if self.config.tls_cert and self.config.tls_key:
            server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            server_context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        self.httpd = AgentHTTPServer((self.config.listen_host, self.config.listen_port), self,
                                     server_context)
        port = self.httpd.server_address[1]
        host = self.config.listen_host
        if host in ("", "0.0.0.0", "::"):
            host = _local_address_towards(self.config.repo_url)
        self.host = host
        if not self.address:
            scheme = "https" if server_context is not None else "http"
            self.address = f"{scheme}://{host}:{port}"
        self.transfers = Transfers(
            self.cache, self.name, host, self.config.repo_url, self.config.token,
            Path(self.config.cache_dir).absolute() / "work", local=self.chunks,
            on_cached=self._on_cached, context=self.context)

    def serve_forever(self) -> None:
        if self.httpd is None:
            self.bind()
        assert self.httpd is not None
        beat = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        beat.start()
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        log.info("agent %s serving on %s", self.name, self.address)
        try:
            self.httpd.serve_forever(poll_interval=0.5)
        finally:
            self._stop.set()
            if self.transfers is not None:
                self.transfers.close()
            self.httpd.server_close()
        if self.refused is not None:
            raise self.refused

    def stop(self) -> None:
        self._stop.set()
        if self.httpd is not None:
            threading.Thread(target=self.httpd.shutdown, daemon=True).start()

    # -- the repository link ----------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """What the repository's scheduler needs to know about this node."""
        in_flight = self.transfers.in_flight() if self.transfers is not None else []
        return {
            "name": self.name, "address": self.address,
            "capacity_instances": self.config.capacity_instances,
            "running_instances": len(self.instances.list()),
            "cache_capacity": self.cache.capacity, "cache_used": self.cache.used,
            "cache_pinned": self.cache.pinned,
            "cached": [e.image_id for e in self.cache.list()], "in_flight": in_flight,
            "version": __version__,
        }

    def _heartbeats(self) -> None:
        from rain.client import Client

        ca = str(self.config.ca_file) if self.config.ca_file else None
        client = Client(self.config.repo_url, self.config.token, timeout=30, ca=ca)
        warned = False
        while not self._stop.is_set():
            try:
                if self._registered:
                    try:
                        client.heartbeat(self.name, self.report())
                    except NotFound:  # the repository forgot us (e.g. removed): register again
                        self._registered = False
                if not self._registered:
                    client.register_node({**self.report(), "agent_key": self.key})
                    self._registered = self._ever_registered = True
                    log.info("agent %s registered with %s", self.name, self.config.repo_url)
                warned = False
            except (Unauthorized, Forbidden) as exc:
                if not self._ever_registered:
                    # A wrong or someone else's token never gets better: stop at once
                    # rather than serve as a node nobody can use. (Later, e.g. a revoked
                    # token, the agent keeps its instances running and keeps trying.)
                    self.refused = type(exc)(f"the repository {self.config.repo_url} "
                                             f"refused node {self.name}: {exc.message}")
                    self.stop()
                    break
                if not warned:
                    log.warning("agent %s: cannot report to %s: %s", self.name,
                                self.config.repo_url, exc)
                    warned = True
            except RainError as exc:
                if not warned:
                    log.warning("agent %s: cannot report to %s: %s", self.name,
                                self.config.repo_url, exc)
                    warned = True
            self._stop.wait(self.config.heartbeat_seconds if self._registered else 1.0)
        client.close()

    # -- transfers -----------------------------------------------------------------
    def fetch(self, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
        req = FetchRequest.parse(body)
        assert self.transfers is not None
        if req.peer_token:
            self.grants.grant(req.peer_token, req.image_id)
        entry = self.cache.entry(req.image_id)
        if entry is not None:
            if entry.sha256 != req.sha256:
                raise Conflict(f"image {req.image_id} is cached here with sha256 "
                               f"{entry.sha256}, not {req.sha256}")
            return {"image_id": req.image_id, "state": DONE, "cached": True,
                    "stats": TransferStats().to_dict()}, 200
        return self.transfers.start(req).status(), 202

    def fetch_status(self, image_id: str, wait: float = 0.0) -> dict[str, Any]:
        assert self.transfers is not None
        t = self.transfers.get(image_id)
        if t is None:
            if self.cache.entry(image_id) is not None:
                return {"image_id": image_id, "state": DONE, "cached": True,
                        "stats": TransferStats().to_dict()}
            raise NotFound(f"no transfer of {image_id} on node {self.name}")
        if wait > 0 and t.state == FETCHING:
            t.wait(wait)
        return t.status()

    def release(self, image_id: str) -> dict[str, Any]:
        assert self.transfers is not None
        t = self.transfers.release(image_id)
        if t is None:
            return {"image_id": image_id, "state": "none"}
        return t.status()

    def stats_for(self, image_id: str) -> TransferStats | None:
        t = self.transfers.get(image_id) if self.transfers is not None else None
        return None if t is None else t.stats

    def _on_cached(self, image_id: str, path: Path) -> None:
        self.chunks.add_image(image_id)

    def evict(self, image_id: str) -> None:
        self.cache.evict(image_id)
        self.chunks.remove_image(image_id)
        with self._lock:
            self._digests.pop(image_id, None)

    # -- peers ---------------------------------------------------------------------
    def grant(self, body: dict[str, Any]) -> dict[str, Any]:
        """Serve a cached image to the bearers of a deployment's peer token (the
        repository asks a holder before it lists the holder in a `chunks` plan)."""
        token, image_id = body.get("peer_token"), body.get("image_id")
        if not isinstance(token, str) or not token or not isinstance(image_id, str):
            raise InvalidRequest('body must be {"peer_token": TOKEN, "image_id": ID}')
        check_id(image_id)
        if self.cache.entry(image_id) is None:
            raise NotFound(f"image {image_id} is not cached on node {self.name}")
        return {"image_id": image_id, "seconds": self.grants.grant(token, image_id)}

    def revoke(self, body: dict[str, Any]) -> dict[str, Any]:
        token = body.get("peer_token")
        if not isinstance(token, str) or not token:
            raise InvalidRequest('body must be {"peer_token": TOKEN}')
        return {"revoked": self.grants.revoke(token)}

    def peer_images(self, token: str) -> frozenset[str] | None:
        """The images a peer token lets its bearer read here (None: not a token here)."""
        return self.grants.images(token)

    def serving_image(self, image_id: str) -> PartialImage | None:
        """The image as peers read it: the transfer's PartialImage, or the cached file."""
        check_id(image_id)
        partial = self.transfers.partial(image_id) if self.transfers is not None else None
        if partial is not None and partial.failure is None:
            return partial
        entry, manifest = self.cache.entry(image_id), self.cache.manifest(image_id)
        with self._lock:
            served = self._served.get(image_id)
            if entry is None or manifest is None:
                if served is not None:
                    served.close()
                    del self._served[image_id]
                return None
            if served is None or served.path != entry.path:
                served = PartialImage.of_cached(entry.path, manifest)
                self._served[image_id] = served
            return served

    def chunk_by_digest(self, digest: bytes,
                        images: frozenset[str] | None = None) -> bytes | None:
        """A chunk this node holds, checked against its digest before it goes out; with
        `images`, only a chunk of one of them (from whichever file holds those bytes)."""
        if images is not None and not any(digest in self._digests_of(i) for i in images):
            return None
        return self.chunks.read(digest)

    def _digests_of(self, image_id: str) -> frozenset[bytes]:
        with self._lock:
            known = self._digests.get(image_id)
        if known is not None:
            return known
        partial = self.transfers.partial(image_id) if self.transfers is not None else None
        manifest = partial.manifest if partial is not None else self.cache.manifest(image_id)
        if manifest is None:
            return frozenset()
        digests = frozenset(manifest.unique_digests())
        with self._lock:
            self._digests[image_id] = digests
        return digests

    # -- instances and cache --------------------------------------------------------------
    def create_instances(self, items: list[Any]) -> list[dict[str, Any]]:
        out = []
        for item in items:
            if not isinstance(item, dict):
                raise InvalidRequest("each instance must be an object")
            try:
                inst = self.instances.create(
                    str(item.get("id", "")), str(item.get("image_id", "")),
                    size=_opt_int(item.get("size")), copy=bool(item.get("copy", False)),
                    ephemeral_size=_opt_int(item.get("ephemeral_size")))
                out.append({"id": inst.instance_id, "image_id": inst.image_id,
                            "disk": str(inst.disk), "size": inst.size, "copy": inst.copy,
                            "ready_at": time.time(), "error": None})
            except RainError as exc:
                out.append({"id": item.get("id"), "image_id": item.get("image_id"),
                            "disk": None, "ready_at": None, "error": exc.message})
        return out

    def list_instances(self) -> list[dict[str, Any]]:
        return [{"id": i.instance_id, "image_id": i.image_id, "disk": str(i.disk),
                 "size": i.size, "copy": i.copy, "created": i.created}
                for i in self.instances.list()]

    def delete_instance(self, instance_id: str) -> dict[str, Any]:
        self.instances.delete(instance_id)
        return {"deleted": instance_id}

    def cache_listing(self) -> dict[str, Any]:
        return {"capacity": self.cache.capacity, "used": self.cache.used,
                "images": [{**e.record(), "pins": e.pins} for e in self.cache.list()]}


def _opt_int(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"{value!r} is not a whole number of bytes") from None


def _agent_key(path: Path) -> str:
    """The node's secret for the repository, made once and kept with the cache."""
    with contextlib.suppress(FileNotFoundError):
        key = path.read_text().strip()
        if key:
            return key
    key = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def _local_address_towards(url: str) -> str:
    """The address this host uses to reach `url` (no packet is sent: UDP connect)."""
    parts = urlsplit(url)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((parts.hostname or "127.0.0.1", parts.port or 80))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def _client_context(config: AgentConfig) -> ssl.SSLContext | None:
    if not config.repo_url.startswith("https") and config.ca_file is None:
        return None
    return ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)


