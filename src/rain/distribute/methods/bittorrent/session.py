"""One libtorrent session, set up for a LAN swarm of one deployment's nodes.

The settings are the same for the repository's seeder and the nodes, except
where noted; docs/bittorrent.md says why each one is what it is. In short:
nothing that discovers or reaches peers on its own (DHT, LSD, UPnP,
NAT-PMP, PEX — the torrents are private anyway), TCP only, every peer
unchoked, few disk and hashing threads (two cores serve two dozen agents
and the server), and only the alerts rain acts on.

A `Session` owns one `lt.session` and one thread that pops its alerts and
hands each torrent's alerts to whoever listens for that torrent, so several
transfers can share one session (an agent runs one for all its images).
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import queue
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import libtorrent as lt

from rain.distribute.methods.bittorrent.config import BitTorrentConfig

log = logging.getLogger("rain.distribute.bittorrent")
# Peer id prefix of the repository's seeder: nodes count what it sends as repository bytes.
SEEDER_FINGERPRINT = "-RR0100-"
ALERTS = (lt.alert.category_t.error_notification | lt.alert.category_t.status_notification
          | lt.alert.category_t.storage_notification)
NODE_ALERTS = ALERTS | lt.alert.category_t.peer_notification \
    | lt.alert.category_t.piece_progress_notification
# Alert types a node's transfer acts on (everything else is only logged, or dropped).
WANTED = {"piece_finished", "hash_failed", "peer_ban", "cache_flushed", "torrent_error",
          "file_error", "torrent_removed", "listen_failed", "url_seed", "tracker_error",
          "torrent_finished"}


_open: weakref.WeakSet[Session] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """A session whose alert thread still waits when the interpreter exits aborts it."""
    for session in list(_open):
        session.close()


def listen_host(host: str) -> str:
    if not host or host in ("0.0.0.0", "::"):
        return "0.0.0.0"
    return f"[{host}]" if ":" in host else host


def settings_pack(cfg: BitTorrentConfig, host: str, port: int, *,
                  seeder: bool) -> dict[str, Any]:
    s: dict[str, Any] = {
        "listen_interfaces": f"{listen_host(host)}:{port}",
        "enable_dht": False, "enable_lsd": False, "enable_upnp": False, "enable_natpmp": False,
        # TCP only: uTP's congestion control runs in user space, per packet (CPU), and a
        # LAN has no NAT to get through; TCP is what the kernel does for free.
        "enable_outgoing_utp": False, "enable_incoming_utp": False,
        # Several agents may share a host (and tests run every node on loopback).
        "allow_multiple_connections_per_ip": True,
        "connections_limit": cfg.connections_limit,
        # Unchoke everyone: all peers are our own nodes, tit-for-tat protects nothing and
        # a choked peer is idle bandwidth. Fixed slots with a limit above the swarm size
        # (LAN peers ignore the slots anyway: libtorrent's local peer class).
        "choking_algorithm": int(lt.choking_algorithm_t.fixed_slots_choker),
        "unchoke_slots_limit": cfg.unchoke_slots,
        "seed_choking_algorithm": int(lt.seed_choking_algorithm_t.round_robin),
        "peer_connect_timeout": 5,
        "handshake_timeout": 10,
        # Shallow per-connection queues: requests and ACKs to a peer share its connection
        # with the data sent to it (config.py says why).
        "send_buffer_watermark": cfg.send_buffer,
        "send_buffer_low_watermark": max(16 * 1024, cfg.send_buffer // 4),
        "send_socket_buffer_size": cfg.send_socket_buffer,
        "max_out_request_queue": 1500,
        "request_queue_time": cfg.request_queue_time,
        # Two cores for everything: a couple of disk threads, one hasher.
        "aio_threads": 2,
        "hashing_threads": 1,
        "alert_mask": int(ALERTS if seeder else NODE_ALERTS),
        "alert_queue_size": 10000,
        "min_announce_interval": max(1, cfg.announce_interval // 3),
        "tracker_completion_timeout": 10,
        "stop_tracker_timeout": 1,
        "apply_ip_filter_to_trackers": False,
        # Every URL a node's session fetches (tracker, web seed) comes from the plan the
        # repository sent: nothing for SSRF mitigation to protect against, and it would
        # refuse the repository on loopback and web seed URLs with a query on a LAN.
        "ssrf_mitigation": False,
        # Keep a finished node's connections (to the seeder too): its byte counters by
        # peer are read after the last piece, and an idle connection costs nothing.
        "close_redundant_connections": False,
        "urlseed_wait_retry": 5,
        # A web seed that sends a bad piece is dropped like a peer (smart-ban, on by
        # default, finds the peer among several that sent a failed piece).
        "ban_web_seeds": True,
        "listen_system_port_fallback": True,
    }
    if seeder:
        s["peer_fingerprint"] = SEEDER_FINGERPRINT
        # Nodes connect to the repository; its full seed dials them only for the tail
        # (rain.distribute.methods.bittorrent.seeder), encrypted if they insist.
        s["out_enc_policy"] = int(lt.enc_policy.pe_enabled)
        s["in_enc_policy"] = int(lt.enc_policy.pe_enabled)
        s["allowed_enc_level"] = int(lt.enc_level.pe_both)
        s["prefer_rc4"] = True
    else:
        s.update(encryption(False))
    if host and listen_host(host) != "0.0.0.0":
        s["outgoing_interfaces"] = host
    return s


def encryption(on: bool) -> dict[str, Any]:
    """A node's policy: forced RC4 both ways, or no encryption at all (to measure it)."""
    if on:
        return {"out_enc_policy": int(lt.enc_policy.pe_forced),
                "in_enc_policy": int(lt.enc_policy.pe_forced),
                "allowed_enc_level": int(lt.enc_level.pe_rc4), "prefer_rc4": True}
    return {"out_enc_policy": int(lt.enc_policy.pe_disabled),
            "in_enc_policy": int(lt.enc_policy.pe_disabled),
            "allowed_enc_level": int(lt.enc_level.pe_plaintext), "prefer_rc4": False}


def torrent_flags(*, ip_filter: bool = True, **extra: bool) -> Any:
    """Flags of every torrent rain adds: never auto-managed (the session must not queue a
    deployment's torrent behind others), never paused, no PEX/DHT/LSD, and subject to the
    session's IP filter unless peers are not restricted."""
    flags = lt.torrent_flags.disable_pex | lt.torrent_flags.disable_dht \
        | lt.torrent_flags.disable_lsd
    if ip_filter:
        flags |= lt.torrent_flags.apply_ip_filter
    for name, on in extra.items():
        if on:
            flags |= getattr(lt.torrent_flags, name)
    return flags


@dataclass(frozen=True)
class Event:
    """What rain needs of an alert. Alerts themselves live only until the next pop_alerts
    (using one later crashes the process), so the alert thread copies this out."""

    what: str
    piece: int = -1
    endpoint: tuple[str, int] = ("", 0)
    message: str = ""


def event_of(a: Any) -> Event:
    what = a.what()
    piece = int(getattr(a, "piece_index", -1)) if what in ("piece_finished", "hash_failed") \
        else -1
    endpoint = ("", 0)
    if what == "peer_ban":
        ip, port = a.endpoint
        endpoint = (str(ip), int(port))
    return Event(what, piece, endpoint, str(a.message()))


class Session:
    """An lt.session, its alert thread, and an IP filter made of allowed address sets."""

    def __init__(self, settings: dict[str, Any], name: str) -> None:
        self.name = name
        self.lt = lt.session(cast("lt.settings_pack", settings))
        self._listeners: dict[Any, queue.SimpleQueue[Event]] = {}
        self._allowed: dict[str, set[str]] = {}  # by owner (a job, an image)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True,
                                        name=f"rain-bt-{name}")
        self._thread.start()
        _open.add(self)

    # -- alerts -----------------------------------------------------------------------
    def listen(self, handle: Any) -> queue.SimpleQueue[Event]:
        """A queue that receives the alerts of `handle`'s torrent that transfers act on."""
        q: queue.SimpleQueue[Event] = queue.SimpleQueue()
        with self._lock:
            self._listeners[handle] = q
        return q

    def unlisten(self, handle: Any) -> None:
        with self._lock:
            self._listeners.pop(handle, None)

    def _pump(self) -> None:
        while not self._stop.is_set():
            if self.lt.wait_for_alert(500) is None:
                continue
            for a in self.lt.pop_alerts():
                what = a.what()
                if a.category() & lt.alert.category_t.error_notification and \
                        what not in ("hash_failed", "peer_error", "peer_disconnected"):
                    log.info("%s: %s", self.name, a.message())
                if what not in WANTED:
                    continue
                handle = getattr(a, "handle", None)
                with self._lock:
                    q = self._listeners.get(handle) if handle is not None else None
                if q is not None:
                    q.put(event_of(a))

    # -- who may connect --------------------------------------------------------------
    def allow(self, owner: str, addresses: Iterable[str]) -> None:
        """Let `addresses` connect (on behalf of `owner`, until `disallow(owner)`)."""
        with self._lock:
            self._allowed.setdefault(owner, set()).update(addresses)
            self._apply()

    def allowed(self, owner: str) -> set[str]:
        with self._lock:
            return set(self._allowed.get(owner, ()))

    def disallow(self, owner: str) -> None:
        with self._lock:
            self._allowed.pop(owner, None)
            self._apply()

    def _apply(self) -> None:
        f = lt.ip_filter()
        f.add_rule("0.0.0.0", "255.255.255.255", 1)  # 1: blocked
        f.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 1)
        for addr in set().union(*self._allowed.values()) if self._allowed else ():
            try:
                ip = ipaddress.ip_address(addr)
            except ValueError:
                continue
            f.add_rule(str(ip), str(ip), 0)
            if isinstance(ip, ipaddress.IPv4Address):  # as it shows on a dual-stack socket
                f.add_rule(f"::ffff:{ip}", f"::ffff:{ip}", 0)
        self.lt.set_ip_filter(f)

    def limit_rates(self, upload: int, download: int) -> None:
        """Session-wide rate limits (bytes/s, 0: none) that apply to LAN and loopback peers
        too, which libtorrent exempts by default: for measuring swarms on one machine."""
        f = lt.ip_filter()
        every = 1 << int(lt.session.global_peer_class_id)
        f.add_rule("0.0.0.0", "255.255.255.255", every)
        f.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", every)
        self.lt.set_peer_class_filter(f)
        self.lt.apply_settings({"upload_rate_limit": int(upload),
                                "download_rate_limit": int(download)})

    def close(self) -> None:
        _open.discard(self)
        self._stop.set()
        self._thread.join(2)
        for h in self.lt.get_torrents():
            self.lt.remove_torrent(h)
        self.lt.pause()
