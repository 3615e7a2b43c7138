"""The repository's BitTorrent tracker: each deployment's swarm, and nobody else.

`GET /v1/tracker/{peer_token}/announce` (rain.api.tracker) answers a node's
announce with the peers of that deployment only: the repository's seeder
first, then the nodes that announced with the same peer token and info hash.
The peer token is the credential (it is only in the nodes' plans); an
unknown token, or the right token with another torrent's info hash, gets a
BitTorrent failure reply. Nothing is stored: the coordinator registers a
deployment when it prepares it and unregisters it when it finishes.

The address a peer is listed under is the one its announce came from (or the
`ip` it sent, if that is one of the deployment's node addresses), so nodes
behind one name or with several interfaces are listed where they really are.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

from rain.distribute.methods.bittorrent.torrent import bencode

SERVICE = "bittorrent-tracker"  # key in RepoSide.services
PATH = "/v1/tracker/{peer_token}/announce"
MAX_PEERS = 200


@dataclass
class SwarmPeer:
    ip: str
    port: int
    left: int
    seen: float


@dataclass
class Swarm:
    """One deployment's torrent, as the tracker sees it."""

    job_id: str
    info_hash: bytes  # v1, raw 20 bytes
    seeder_host: str  # "" when the seeder listens on every address: list the one asked
    seeder_port: int
    allowed: set[str]  # addresses the deployment's nodes were resolved to
    peers: dict[bytes, SwarmPeer] = field(default_factory=dict)  # by peer id


class TrackerRegistry:
    """The swarms of running deployments, by peer token (thread-safe)."""

    def __init__(self, interval: int = 15,
                 on_peer: Callable[[str, str], None] | None = None) -> None:
        self.interval = interval
        # Called with (job id, address) when a node announces from a new address: the
        # seeder lets it in (its IP filter only knows the addresses resolved beforehand).
        self.on_peer = on_peer
        self._swarms: dict[str, Swarm] = {}
        self._lock = threading.Lock()

    def register(self, peer_token: str, job_id: str, info_hash: str, seeder_port: int,
                 seeder_host: str = "", allowed: Iterable[str] = ()) -> None:
        with self._lock:
            self._swarms[peer_token] = Swarm(job_id, bytes.fromhex(info_hash), seeder_host,
                                             seeder_port, set(allowed))

    def unregister(self, peer_token: str) -> None:
        with self._lock:
            self._swarms.pop(peer_token, None)

    def addresses(self, job_id: str) -> set[str]:
        """Addresses the nodes of a deployment announced from."""
        with self._lock:
            return {p.ip for s in self._swarms.values() if s.job_id == job_id
                    for p in s.peers.values()}

    def peers(self, peer_token: str) -> list[tuple[str, int, int]]:
        """(address, port, bytes left) of the nodes that announced, for tests and reports."""
        with self._lock:
            swarm = self._swarms.get(peer_token)
            return [(p.ip, p.port, p.left) for p in swarm.peers.values()] if swarm else []

    def announce(self, peer_token: str, query: bytes, client_ip: str,
                 local_host: str = "") -> bytes:
        """The bencoded reply to one announce (`query`: the raw query string).

        `client_ip`: where the request came from; `local_host`: the host the node
        used to reach the repository (its Host header), listed as the seeder's address
        when the seeder listens on every address.
        """
        try:
            args = parse_query(query)
            info_hash = args[b"info_hash"]
            peer_id = args[b"peer_id"]
            port = int(args[b"port"])
            left = int(args.get(b"left", b"0") or 0)
            event = args.get(b"event", b"").decode()
            numwant = int(args.get(b"numwant", b"50") or 50)
        except (KeyError, ValueError, UnicodeDecodeError):
            return failure("malformed announce")
        if len(info_hash) != 20 or not 0 < port < 65536:
            return failure("malformed announce")
        now = time.monotonic()
        new_ip = ""
        with self._lock:
            swarm = self._swarms.get(peer_token)
            if swarm is None:
                return failure("no running deployment has this tracker")
            if info_hash != swarm.info_hash:
                return failure("this deployment does not share that torrent")
            ip = client_ip
            claimed = args.get(b"ip", b"").decode(errors="replace")
            if claimed and claimed in swarm.allowed:
                ip = claimed
            for pid in [k for k, p in swarm.peers.items() if now - p.seen > 3 * self.interval]:
                del swarm.peers[pid]
            if event == "stopped":
                swarm.peers.pop(peer_id, None)
                return bencode({"interval": self.interval, "peers": b""})
            known = {p.ip for p in swarm.peers.values()}
            swarm.peers[peer_id] = SwarmPeer(ip, port, left, now)
            if ip not in known and ip not in swarm.allowed:
                new_ip = ip
            others = [p for k, p in swarm.peers.items() if k != peer_id]
            seeds = sum(1 for p in swarm.peers.values() if p.left == 0)
            leechers = len(swarm.peers) - seeds
            job_id = swarm.job_id
            seeder = (swarm.seeder_host or _address_of(local_host), swarm.seeder_port) \
                if swarm.seeder_port else ("", 0)
        if new_ip and self.on_peer is not None:
            self.on_peer(job_id, new_ip)
        # Nodes still downloading first (they need each other), seeds too but after.
        random.shuffle(others)
        others.sort(key=lambda p: p.left == 0)
        listed = [(p.ip, p.port) for p in others][: max(0, min(numwant, MAX_PEERS) - 1)]
        if seeder[0]:
            listed.insert(0, seeder)
        return bencode({"interval": self.interval, "min interval": max(1, self.interval // 3),
                        "complete": seeds + (1 if seeder[0] else 0), "incomplete": leechers,
                        "peers": compact(listed, 4), "peers6": compact(listed, 6)})


def parse_query(query: bytes) -> dict[bytes, bytes]:
    """Announce arguments as raw bytes (info_hash and peer_id are binary, not UTF-8)."""
    out: dict[bytes, bytes] = {}
    for part in query.split(b"&"):
        if not part:
            continue
        key, _, value = part.partition(b"=")
        out[unquote_to_bytes(key.replace(b"+", b" "))] = \
            unquote_to_bytes(value.replace(b"+", b" "))
    return out


def compact(peers: Iterable[tuple[str, int]], version: int) -> bytes:
    """BEP 23 compact peer list of the IPv4 (version 4) or IPv6 (6) peers."""
    out = bytearray()
    for host, port in peers:
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            continue
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if addr.version == version:
            out += addr.packed + port.to_bytes(2, "big")
    return bytes(out)


def failure(reason: str) -> bytes:
    return bencode({"failure reason": reason, "interval": 60})


def _address_of(host_header: str) -> str:
    """The IP address in (or behind) a Host header value, '' if it does not resolve."""
    host = host_header.strip()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if not host:
        return ""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
    except (OSError, IndexError):
        return ""


def resolve(hosts: Iterable[str]) -> set[str]:
    """Every address the given host names or addresses resolve to (unresolvable: skipped)."""
    out: set[str] = set()
    for host in hosts:
        if not host:
            continue
        try:
            out.add(str(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        try:
            out.update(str(info[4][0]) for info in
                       socket.getaddrinfo(host, None, type=socket.SOCK_STREAM))
        except OSError:
            continue
    return out
