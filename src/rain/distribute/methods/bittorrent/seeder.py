"""The repository's seeder: libtorrent sessions in the server process.

The repository's upload is what bounds a deployment (T* = S/R_repo when
nodes upload as fast as it does), so it should send every piece once and let
the nodes copy it to each other. A BitTorrent seed cannot do that by itself:
a node asks whichever peer has a piece, and the seed has them all, so nodes
keep asking the seed for pieces another node is already fetching from it.
Measured with 24 nodes on rate-limited links, plain seeding sent 2.5 times
the image's pieces, and super-seeding left the seed idle between pieces
(docs/bittorrent.md).

So the seeder is split by *stripes*: for a deployment of N nodes, the data
pieces are dealt round-robin into V = min(N, max_views) stripes, and stripe
s is seeded by a *view*, a session of its own whose torrent has only that
stripe's pieces (upload mode: it never downloads). Node k is told to connect
to view k only; having nothing else, the view can only give it stripe k, so
each piece leaves the repository once and the nodes trade the rest. A
*full* seed (seed mode, every piece) is there for rescue: a node that waits
too long for pieces nobody else has (its stripe's owner died, or is slow)
connects to it; rarest-first then takes what is missing everywhere.

Optionally (`view_turns`) the views take turns instead of all sending at
once, and (`tail_seed`) the full seed joins the swarm once every stripe is
sent (rain.distribute.methods.bittorrent.turns; both off by default, as measured in
docs/bittorrent.md).

Every session lets in only the running deployments' nodes (an IP filter of
their addresses, plus any address a node announced from with its peer
token). Deployments of the same image share torrents; a torrent goes when
the last deployment using it finishes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libtorrent as lt

from rain.distribute.methods.bittorrent.config import BitTorrentConfig
from rain.distribute.methods.bittorrent.session import Session, settings_pack, torrent_flags
from rain.distribute.methods.bittorrent.turns import Lane, Turns

log = logging.getLogger("rain.distribute.bittorrent")
SERVICE = "bittorrent"  # key in RepoSide.services
FULL = -1  # the full seed's index among the sessions
TICK = 0.1  # seconds between the turns' ticks


@dataclass
class Seeded:
    handle: Any
    layout: tuple[int, int] | None  # (stripe, of) of a view; None for the full seed
    jobs: set[str] = field(default_factory=set)


@dataclass
class Paced:
    """A torrent's stripe views and their turns."""

    turns: Turns
    handles: list[Any]
    began: float = field(default_factory=time.monotonic)
    ended: bool = False  # every stripe has been sent


@dataclass
class JobSeeds:
    info_hash: str
    baselines: dict[int, int]  # session index → the torrent's upload when the job began
    view_ports: list[int]
    peers: Callable[[], Iterable[tuple[str, int]]] | None = None  # the nodes' endpoints


def stripe_mask(zero: list[bool], stripe: int, of: int) -> list[bool]:
    """The pieces of one stripe: every `of`-th data piece (zero pieces belong to none)."""
    out = []
    j = 0
    for z in zero:
        out.append(not z and j % of == stripe)
        if not z:
            j += 1
    return out


class RepoSeeder:
    """Seeds deployments' images from the repository (thread-safe)."""

    def __init__(self, host: str, config: BitTorrentConfig | None = None) -> None:
        self.config = config or BitTorrentConfig()
        self.host = host
        self.full = self._session(self.config.seeder_port, "seeder")
        self.views: list[Session] = []
        self._torrents: dict[tuple[int, str], Seeded] = {}  # (session index, info hash)
        self._jobs: dict[str, JobSeeds] = {}
        self._turns: dict[str, Paced] = {}  # by info hash: its views' turns
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pacer: threading.Thread | None = None

    def _session(self, port: int, name: str) -> Session:
        return Session(settings_pack(self.config, self.host, port, seeder=True), name)

    def _at(self, index: int) -> Session:
        return self.full if index == FULL else self.views[index]

    @property
    def port(self) -> int:
        return int(self.full.lt.listen_port())

    @property
    def sessions(self) -> list[Session]:
        return [self.full, *self.views]

    def seed(self, job_id: str, info_hash: str, torrent: bytes, path: Path,
             allowed: Iterable[str], *, zero: list[bool], nodes: int,
             peers: Callable[[], Iterable[tuple[str, int]]] | None = None) -> list[int]:
        """Seed `path` (the complete image) for a job of `nodes` nodes; returns the ports of
        its stripe views, one per node in order (none: every node uses the full seed).
        `peers`: where the job's nodes listen (the tracker knows), for the tail."""
        addresses = set(allowed)
        with self._lock:
            baselines: dict[int, int] = {}
            full = self._add(FULL, info_hash, torrent, path, None, job_id)
            baselines[FULL] = int(full.handle.status().all_time_upload)
            stripes = min(nodes, self.config.max_views, sum(1 for z in zero if not z))
            ports: list[int] = []
            if stripes > 1 and all(self._fits(i, info_hash, stripes) for i in range(stripes)):
                while len(self.views) < stripes:
                    self.views.append(self._session(
                        self.config.view_port + len(self.views) if self.config.view_port
                        else 0,
                        f"seeder-view{len(self.views)}"))
                handles = []
                for i in range(stripes):
                    view = self._add(i, info_hash, torrent, path, (i, stripes), job_id, zero)
                    baselines[i] = int(view.handle.status().all_time_upload)
                    ports.append(int(self.views[i].lt.listen_port()))
                    handles.append(view.handle)
                paced = self.config.view_turns > 0 or self.config.tail_seed
                if paced and info_hash not in self._turns:
                    self._turns[info_hash] = self._schedule(handles, zero, stripes)
            self._jobs[job_id] = JobSeeds(info_hash, baselines, ports, peers)
            for session in self.sessions:
                session.allow(job_id, addresses)
            return ports

    def _schedule(self, handles: list[Any], zero: list[bool], stripes: int) -> Paced:
        ti = handles[0].torrent_file()
        sizes = [sum(ti.piece_size(p) for p, mine in enumerate(stripe_mask(zero, s, stripes))
                     if mine) for s in range(stripes)]
        lanes = [Lane(limit=h.set_upload_limit, stripe_bytes=size)
                 for h, size in zip(handles, sizes, strict=True)]
        # view_turns 0: every view at once (the turns then only tell when all are sent)
        turns = Turns(lanes, ti.piece_length(), active=self.config.view_turns or stripes,
                      trickle=self.config.view_trickle)
        if self._pacer is None:
            self._pacer = threading.Thread(target=self._pace, daemon=True,
                                           name="rain-bt-turns")
            self._pacer.start()
        return Paced(turns, handles)

    def _pace(self) -> None:
        """Tick every torrent's turns until the seeder closes."""
        while not self._stop.wait(TICK):
            with self._lock:
                schedules = [p for p in self._turns.values() if not p.turns.finished]
            for paced in schedules:
                seen = []
                with contextlib.suppress(RuntimeError):  # a torrent removed meanwhile
                    for h in paced.handles:
                        st = h.status()
                        seen.append((int(st.all_time_upload), int(st.num_peers) > 0))
                    paced.turns.tick(time.monotonic(), seen)
                    if paced.turns.finished and not paced.ended:
                        paced.ended = True
                        log.info("stripe views: every stripe sent after %.1f s (turns: %s)",
                                 time.monotonic() - paced.began, paced.turns.ended)
                        if self.config.tail_seed:
                            self._join_tail(paced)

    def _join_tail(self, paced: Paced) -> None:
        """Every piece has left the repository once, and its link is idle: the full seed
        connects to the nodes, which ask it for the pieces rarest among them (the last ones,
        that only their owners have). That costs a few pieces more of repository bytes."""
        with self._lock:
            info_hash = next((ih for (_, ih), s in self._torrents.items()
                              if s.handle in paced.handles), "")
            full = self._torrents.get((FULL, info_hash))
            sources = [j.peers for j in self._jobs.values()
                       if j.info_hash == info_hash and j.peers is not None]
        if full is None:
            return
        for peers in sources:
            for endpoint in peers():
                with contextlib.suppress(RuntimeError):
                    full.handle.connect_peer(endpoint)

    def _fits(self, index: int, info_hash: str, stripes: int) -> bool:
        """View `index` has no torrent of this image, or one with the same stripes (two
        deployments of one image with different node counts: the second uses the full
        seed only)."""
        seeded = self._torrents.get((index, info_hash))
        return seeded is None or seeded.layout == (index, stripes)

    def _add(self, index: int, info_hash: str, torrent: bytes, path: Path,
             layout: tuple[int, int] | None, job_id: str,
             zero: list[bool] | None = None) -> Seeded:
        seeded = self._torrents.get((index, info_hash))
        if seeded is None or not seeded.handle.is_valid():
            atp = lt.add_torrent_params()
            atp.ti = lt.torrent_info(torrent)
            atp.save_path = str(path.parent)
            atp.renamed_files = {0: path.name}
            if layout is None:
                # seed mode: each piece is checked the first time it is sent, not up front
                atp.flags = torrent_flags(ip_filter=self.config.restrict_peers, seed_mode=True)
            else:
                assert zero is not None
                # The seed file is the image, verified chunk by chunk as it was made:
                # its stripe's pieces are trusted as they are. Upload mode: never download.
                atp.have_pieces = stripe_mask(zero, *layout)
                atp.flags = torrent_flags(ip_filter=self.config.restrict_peers,
                                          upload_mode=True)
            seeded = Seeded(self._at(index).lt.add_torrent(atp), layout)
            self._torrents[(index, info_hash)] = seeded
        seeded.jobs.add(job_id)
        return seeded

    def allow(self, job_id: str, address: str) -> None:
        """A node of the job announced from `address`: let it in too."""
        with self._lock:
            if job_id in self._jobs:
                for session in self.sessions:
                    session.allow(job_id, [address])

    def uploaded(self, job_id: str) -> int:
        """Payload bytes sent since the job started seeding (torrents shared by two jobs of
        the same image count their bytes for both)."""
        with self._lock:
            return self._uploaded(job_id)

    def _uploaded(self, job_id: str) -> int:
        job = self._jobs.get(job_id)
        if job is None:
            return 0
        sent = 0
        for index, base in job.baselines.items():
            seeded = self._torrents.get((index, job.info_hash))
            if seeded is not None and seeded.handle.is_valid():
                sent += max(0, int(seeded.handle.status().all_time_upload) - base)
        return sent

    def unseed(self, job_id: str) -> int:
        """The job is over: its bytes; torrents go when no other job uses them."""
        with self._lock:
            sent = self._uploaded(job_id)
            job = self._jobs.pop(job_id, None)
            for session in self.sessions:
                session.disallow(job_id)
            if job is None:
                return sent
            for index in job.baselines:
                key = (index, job.info_hash)
                seeded = self._torrents.get(key)
                if seeded is None:
                    continue
                seeded.jobs.discard(job_id)
                if not seeded.jobs:
                    del self._torrents[key]
                    self._at(index).lt.remove_torrent(seeded.handle)
            if not any(ih == job.info_hash for _, ih in self._torrents):
                self._turns.pop(job.info_hash, None)
            return sent

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._turns.clear()
            self._torrents.clear()
            self._jobs.clear()
            for session in self.sessions:
                session.close()
