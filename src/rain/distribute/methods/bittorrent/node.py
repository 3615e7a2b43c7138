"""The node side: libtorrent fills the PartialImage's file, rain verifies every chunk.

One `NodeSession` per agent process holds every torrent the node downloads
or seeds. A transfer adds the plan's torrent with the PartialImage's file as
its storage (save path = the file's folder, the torrent's one file renamed
to the file's name) and with the pieces made only of zero chunks marked as
present: zeros never move, and nothing is hashed on the way in.

libtorrent's SHA-1 pieces are the torrent's; the image's SHA-256 chunk
digests are what counts. As pieces finish, the chunks in them are read back
and verified (PartialImage.verify_file), so the image is readable while it
fills and the last check at the end has little left to do. A chunk that does
not match, and whatever the swarm has not delivered when it stalls, come from
the repository (RepoSource.fetch). A peer that sends a bad piece is banned by
libtorrent (it is the only sender of that piece, or smart-ban finds it); the
piece is asked for again from the others.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlencode, urlsplit

import libtorrent as lt

from rain.distribute.methods.base import FetchContext
from rain.distribute.methods.bittorrent.config import BitTorrentConfig
from rain.distribute.methods.bittorrent.session import (
    SEEDER_FINGERPRINT,
    Event,
    Session,
    encryption,
    settings_pack,
    torrent_flags,
)
from rain.distribute.methods.bittorrent.torrent import zero_pieces
from rain.distribute.methods.bittorrent.tracker import resolve
from rain.distribute.partial import TransferAborted
from rain.model.errors import RainError

log = logging.getLogger("rain.distribute.bittorrent")
POLL = 0.5  # seconds between status polls
FLUSH_TIMEOUT = 30.0
START_GRACE = 10.0  # seconds a node waits for its stripe view's first bytes
WEB_SEEDS = (int(lt.peer_info.web_seed), int(lt.peer_info.http_seed))


@dataclass
class Held:
    """A torrent this node's session has, and what it takes to add it again elsewhere."""

    image_id: str
    info_hash: str
    torrent: bytes
    trackers: list[str]
    handle: Any
    encrypt: bool
    restricted: bool  # only allowed addresses may connect
    alerts: queue.SimpleQueue[Event] = field(default_factory=queue.SimpleQueue)


class NodeSession:
    """The libtorrent session of one agent (tests make one per simulated node)."""

    def __init__(self, host: str = "", port: int | None = None,
                 config: BitTorrentConfig | None = None) -> None:
        self.host = host
        self.config = config or BitTorrentConfig()
        self.port = self.config.node_port if port is None else port
        self._session: Session | None = None
        self._held: dict[str, Held] = {}
        self._lock = threading.RLock()

    @property
    def session(self) -> Session:
        with self._lock:
            if self._session is None:
                settings = settings_pack(self.config, self.host, self.port, seeder=False)
                self._session = Session(settings, f"node-{self.host or 'any'}")
            return self._session

    @property
    def listen_port(self) -> int:
        return int(self.session.lt.listen_port())

    def held(self, image_id: str) -> Held | None:
        with self._lock:
            return self._held.get(image_id)

    def add(self, image_id: str, torrent: bytes, info_hash: str, save_path: Path, *,
            trackers: list[str], have: list[bool] | None, encrypt: bool,
            allowed: set[str] | None, web_seed: str = "") -> Held:
        """Add (or replace) the torrent of `image_id`, stored in the file `save_path`;
        only `allowed` addresses may connect (None: anyone)."""
        ti = lt.torrent_info(torrent)
        atp = lt.add_torrent_params()
        atp.ti = ti
        atp.save_path = str(save_path.parent)
        atp.renamed_files = {0: save_path.name}
        atp.trackers = trackers
        if web_seed:
            atp.url_seeds = [web_seed]
        # Present pieces are trusted: zero pieces by the manifest, the rest because their
        # chunks were verified against the image's SHA-256 digests. Nothing is re-hashed.
        atp.have_pieces = have if have is not None else [False] * ti.num_pieces()
        atp.flags = torrent_flags(ip_filter=allowed is not None)
        session = self.session
        with self._lock:
            self._drop(image_id)
            if allowed is not None:
                session.allow(image_id, allowed)
            handle = session.lt.add_torrent(atp)
            held = Held(image_id, info_hash, torrent, trackers, handle, encrypt,
                        allowed is not None, session.listen(handle))
            self._held[image_id] = held
            self._apply_encryption()
        return held

    def reseed(self, image_id: str, path: Path) -> None:
        """Seed the complete, verified image of `image_id` from `path` from now on."""
        with self._lock:
            held = self._held.get(image_id)
            if held is None:
                return
            ti = lt.torrent_info(held.torrent)
            allowed = self.session.allowed(image_id) if held.restricted else None
            self.add(image_id, held.torrent, held.info_hash, path, trackers=held.trackers,
                     have=[True] * ti.num_pieces(), encrypt=held.encrypt, allowed=allowed)

    def remove(self, image_id: str) -> None:
        with self._lock:
            self._drop(image_id)
            if self._session is not None:
                self._session.disallow(image_id)
                self._apply_encryption()

    def _drop(self, image_id: str) -> None:
        held = self._held.pop(image_id, None)
        if held is not None and self._session is not None:
            self._session.unlisten(held.handle)
            with contextlib.suppress(RuntimeError):
                self._session.lt.remove_torrent(held.handle)

    def _apply_encryption(self) -> None:
        # Session-wide in libtorrent: while any deployment asks for encryption, all do.
        on = any(h.encrypt for h in self._held.values())
        self.session.lt.apply_settings(cast("lt.settings_pack", encryption(on)))

    def close(self) -> None:
        with self._lock:
            for image_id in list(self._held):
                self._drop(image_id)
            if self._session is not None:
                self._session.close()
                self._session = None


_default: NodeSession | None = None
_default_lock = threading.Lock()


def default_session(host: str, port: int | None, config: BitTorrentConfig) -> NodeSession:
    """This process's session, made by the first transfer that needs it."""
    global _default
    with _default_lock:
        if _default is None:
            _default = NodeSession(host, port, config)
        return _default


def current_session() -> NodeSession | None:
    """This process's session if a transfer made one."""
    with _default_lock:
        return _default


# -- one transfer ------------------------------------------------------------------------
class Counter:
    """Received payload by source (the repository's seeder and web seed, or other nodes),
    from per-peer counters; what cannot be attributed (a peer gone between two polls)
    counts for the peers, which is where nearly all bytes come from."""

    def __init__(self, ctx: FetchContext) -> None:
        self.stats = ctx.stats
        self._peers: dict[tuple[Any, ...], int] = {}
        self._down = 0
        self._up = 0

    def update(self, handle: Any) -> None:
        st = handle.status()
        repo = 0
        seen: dict[tuple[Any, ...], int] = {}
        for p in handle.get_peer_info():
            pid = bytes(p.pid.to_bytes())
            from_repo = pid.startswith(SEEDER_FINGERPRINT.encode()) or \
                int(p.connection_type) in WEB_SEEDS
            if not from_repo:
                continue
            key = (p.ip, pid, int(p.connection_type))
            got = int(p.total_download)
            before = self._peers.get(key, 0)
            repo += got - before if got >= before else got
            seen[key] = got
        self._peers = seen
        down, up = int(st.total_payload_download), int(st.total_payload_upload)
        total = max(0, down - self._down)
        repo = min(repo, total)
        self.stats.add("repo_bytes", repo)
        self.stats.add("peer_bytes", total - repo)
        self.stats.add("sent_bytes", max(0, up - self._up))
        self._down, self._up = down, up


class Transfer:
    """One image arriving through the swarm (`fetch`), see the module docstring."""

    def __init__(self, node: NodeSession, ctx: FetchContext) -> None:
        self.node = node
        self.ctx = ctx
        self.plan = ctx.plan
        self.torrent = base64.b64decode(self.plan["torrent"])
        ti = lt.torrent_info(self.torrent)
        self.info_hash = str(ti.info_hashes().v1)
        if self.info_hash != self.plan.get("info_hash", self.info_hash) or \
                ti.total_size() != ctx.manifest.size or ti.num_files() != 1:
            raise RainError(f"the plan's torrent of {ctx.image_id} does not describe its "
                            f"image ({ti.total_size()} bytes, info hash {self.info_hash})")
        self.piece_size = ti.piece_length()
        self.pieces = ti.num_pieces()
        self.counter = Counter(ctx)
        self.finished_pieces: set[int] = set()
        self.unverified: list[int] = []  # finished pieces whose chunks await verification
        self.flushed = threading.Event()
        self.web_seed_added = False

    # -- urls ---------------------------------------------------------------------------
    def _url(self, path: str) -> str:
        return path if "://" in path else self.ctx.repo.url + path

    def web_seed(self) -> str:
        """The repository's file endpoint, with the deployment's peer token and id in the
        query: the server reads the image for the token's deployment and counts the bytes
        for it (libtorrent could send headers, but only if given before the torrent is
        added, and the query works for a web seed added when the swarm stalls)."""
        ws = self.plan["web_seed"]
        query = urlencode({"access_token": self.ctx.peer_token,
                           "deployment": str(self.plan.get("deployment", ""))})
        return f"{self._url(ws['path'])}?{query}"

    def allowed(self) -> set[str] | None:
        """The deployment's nodes and the repository (None: peers are not restricted)."""
        if self.plan.get("allow") is None:
            return None
        repo_host = urlsplit(self.ctx.repo.url).hostname or ""
        hosts = {*self.plan["allow"], repo_host, self.plan["seeder"].get("host", "")}
        return resolve(hosts)

    def seeder_endpoint(self, which: str = "port") -> tuple[str, int] | None:
        """The repository's full seed (`port`) or this node's stripe view (`view`)."""
        seeder = self.plan["seeder"]
        host = seeder.get("host") or urlsplit(self.ctx.repo.url).hostname or ""
        found = sorted(resolve([host]))
        port = int(seeder.get(which) or 0)
        return (found[0], port) if found and port else None

    # -- the transfer -------------------------------------------------------------------
    def run(self) -> None:
        ctx, plan = self.ctx, self.plan
        partial = ctx.partial
        have = zero_pieces(ctx.manifest, self.piece_size)
        mode = ctx.options.web_seed or str(plan["web_seed"].get("mode", "stall"))
        held = self.node.add(
            ctx.image_id, self.torrent, self.info_hash, partial.path,
            trackers=[self._url(plan["tracker"])] if plan.get("tracker") else [],
            have=have, encrypt=bool(plan.get("encrypt")), allowed=self.allowed(),
            web_seed=self.web_seed() if mode == "always" else "")
        self.web_seed_added = mode == "always"
        self.finished_pieces.update(i for i, z in enumerate(have) if z)
        view = self.seeder_endpoint("view")
        full = self.seeder_endpoint("port")
        striped = bool(plan["seeder"].get("striped"))
        # With stripe views, a node without one gets everything from the others.
        first = view if striped else full
        rescued = not striped
        if first is not None:
            held.handle.connect_peer(first)
        stall = ctx.options.stall_timeout_seconds
        web_after = float(plan["web_seed"].get("after", 20.0))
        rescue_after = float(plan["seeder"].get("rescue_after", 5.0))
        started = time.monotonic()
        repo_seen, repo_last = 0, started  # repository bytes, and when they last grew
        last_done, last_change = -1, time.monotonic()
        fallback = ""
        try:
            while True:
                if ctx.cancel.is_set():
                    raise TransferAborted(f"transfer of {ctx.image_id} cancelled")
                self._handle_alerts(held)
                self._verify_finished()
                self.counter.update(held.handle)
                st = held.handle.status()
                now = time.monotonic()
                progress = int(st.total_wanted_done) + int(st.total_payload_download)
                if progress != last_done:
                    last_done, last_change = progress, now
                if st.is_finished or st.is_seeding:
                    break
                if st.errc.value() != 0:
                    fallback = f"libtorrent stopped: {st.errc.message()}"
                    break
                idle = now - last_change
                if ctx.stats.repo_bytes != repo_seen:
                    repo_seen, repo_last = ctx.stats.repo_bytes, now
                if not rescued and idle >= self.rescue_wait(rescue_after, repo_last - started):
                    # pieces nobody else has: the stripe's owner is gone or far behind
                    ctx.log(f"bittorrent: no payload for {idle:.0f} s; asking the full seed")
                    if full is not None:
                        held.handle.connect_peer(full)
                    rescued = True
                    last_change = now
                elif mode == "stall" and not self.web_seed_added and idle >= web_after:
                    ctx.log(f"bittorrent: no progress for {idle:.0f} s; adding the web seed")
                    held.handle.add_url_seed(self.web_seed())
                    self.web_seed_added = True
                    last_change = now
                elif idle >= stall:
                    fallback = f"no progress for {idle:.0f} s"
                    break
                time.sleep(POLL)
        except BaseException as exc:
            self.node.remove(ctx.image_id)
            if ctx.cancel.is_set() and not isinstance(exc, TransferAborted):
                # cancelled while the session was being torn down under the transfer
                raise TransferAborted(f"transfer of {ctx.image_id} cancelled") from exc
            raise
        self._finish(held, fallback)

    def rescue_wait(self, floor: float, sending: float) -> float:
        """Seconds of silence that mean rescue: `floor`, or three times what one piece took
        from the repository while it was sending (`sending` seconds), if that is longer:
        slow links must not look stalled. Before the view sent anything, `START_GRACE`."""
        got = self.ctx.stats.repo_bytes
        if got <= 0 or sending <= 0:
            return max(floor, START_GRACE)
        return max(floor, 3 * self.piece_size / (got / sending))

    def _handle_alerts(self, held: Held) -> None:
        stats = self.ctx.stats
        while True:
            try:
                a = held.alerts.get_nowait()
            except queue.Empty:
                return
            what = a.what
            if what == "piece_finished":
                self.finished_pieces.add(a.piece)
                self.unverified.append(a.piece)
            elif what == "hash_failed":
                stats.add("bad_chunks", len(self._chunks_of(a.piece, finished=False)))
            elif what == "peer_ban":
                ip, port = a.endpoint
                stats.drop(f"{ip}:{port}", "sent a piece that failed its hash check; banned")
            elif what == "cache_flushed":
                self.flushed.set()

    def _chunks_of(self, piece: int, *, finished: bool = True) -> list[int]:
        """Non-zero chunks that lie in `piece` (with `finished`, only those whose every
        piece is finished: a chunk may be larger than a piece)."""
        m = self.ctx.manifest
        cs = m.chunk_size
        start, end = piece * self.piece_size, min((piece + 1) * self.piece_size, m.size)
        out = []
        for c in range(start // cs, (end - 1) // cs + 1):
            first = c * cs // self.piece_size
            last = (c * cs + m.chunk_length(c) - 1) // self.piece_size
            done = not finished or all(q in self.finished_pieces
                                       for q in range(first, last + 1))
            if done and not self.ctx.partial.is_zero(c):
                out.append(c)
        return out

    def _verify_finished(self) -> None:
        """Verify the chunks of finished pieces. A failure here can be a write libtorrent
        has not made yet: those chunks stay missing and are checked again at the end."""
        pieces, self.unverified = self.unverified, []
        chunks = sorted({c for p in pieces for c in self._chunks_of(p)})
        if chunks:
            self.ctx.partial.verify_file(chunks)

    def _flush(self, held: Held) -> None:
        """Wait until libtorrent has written everything it received."""
        self.flushed.clear()
        held.handle.flush_cache()
        deadline = time.monotonic() + FLUSH_TIMEOUT
        while time.monotonic() < deadline:
            self._handle_alerts(held)
            if self.flushed.is_set():
                return
            time.sleep(0.02)

    def _finish(self, held: Held, fallback: str) -> None:
        ctx = self.ctx
        if fallback:
            held.handle.pause()  # nothing more may be written into the file
        self._flush(held)
        self._handle_alerts(held)
        self.counter.update(held.handle)
        bad = ctx.partial.verify_file(zeros=True)
        if fallback:
            ctx.log(f"bittorrent: {fallback}; fetching {len(bad)} chunks from the repository")
            ctx.stats.drop("swarm", fallback)
        elif bad:
            # libtorrent accepted these pieces (SHA-1) but the bytes are not the image's
            ctx.stats.add("bad_chunks", len(bad))
            ctx.stats.drop("swarm", f"{len(bad)} chunks matched the torrent but not the image")
        if bad:
            held.handle.pause()
            ctx.repo.fetch(ctx.image_id, ctx.partial, bad, stats=ctx.stats, cancel=ctx.cancel)
        if fallback or bad:
            # complete and verified now: seed all of it
            self.node.reseed(ctx.image_id, ctx.partial.path)
