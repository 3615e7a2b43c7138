"""`chunks`: move only the chunks a node lacks — a derived image over a cached base moves
only the difference.

A node fills its PartialImage from, in this order:

1. itself: chunks with the same digest in its cached images or other transfers
   (`ctx.local`, a rain.agent.chunkindex.ChunkIndex). A local chunk that
   fails verification means the node cache is damaged: it is logged, reported
   to the index, and the chunk is fetched elsewhere;
2. the other nodes of the deployment. Every chunk still missing has one
   *owner* among them, chosen by its digest the same way on every node. A node
   gets the chunks it owns itself (from a *holder* — a node outside the
   deployment that caches the image — else the repository) while it asks each
   chunk's owner for the others — waiting for
   an owner that does not have it yet, up to `owner_wait_seconds` without
   progress — so the repository sends each new chunk about once for the whole
   deployment, not once per node;
3. the repository, for whatever is still missing (runs of chunks as Range
   requests).

A node serves the bearer of a deployment's peer token only that deployment's
image (rain.agent.grants). The deployment's nodes learn the token
from their fetch requests; a holder is asked first (`POST /v1/grants`, with its
agent key) to serve the image for it, and only the holders that agree are in
the plan — one that is down, or evicted the image since its last report, is
left out rather than tried and dropped by every node. The grants are revoked
when the deployment ends.

Within the image, a digest that occurs at several indices is moved once and
copied locally. A peer that fails or sends a chunk that does not match is
dropped for the rest of the transfer; its chunks come from elsewhere.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from rain.client.connection import open_connection, request_headers
from rain.distribute.agentclient import AgentClient
from rain.distribute.methods.base import DeploymentJob, FetchContext
from rain.distribute.partial import BadChunk, PartialImage, TransferAborted
from rain.model.errors import InvalidRequest, RainError

logger = logging.getLogger(__name__)

OWNER_WAIT_SECONDS = 15.0
MAX_HOLDERS = 8  # nodes caching the image that one plan lists
GRANT_TIMEOUT = 5.0  # seconds a holder has to agree to serve a deployment
POLL = 0.25

# A node serves any chunk it holds here (rain.agent.server), bearer: the peer token.
CHUNK_BY_DIGEST_PATH = "/v1/peer/chunks/{digest}"


@dataclass(frozen=True)
class Peer:
    name: str
    url: str


def owner_of(digest: bytes, partners: list[Peer]) -> Peer:
    """The deployment node that fetches `digest` for the others (the same on every node)."""
    return partners[int.from_bytes(digest[:8], "big") % len(partners)]


# -- the repository side --------------------------------------------------------------------
class ChunksCoordinator:
    name: ClassVar[str] = "chunks"

    def prepare(self, job: DeploymentJob) -> dict[str, dict[str, Any]]:
        deploying = {n.name for n in job.nodes}
        opts = job.options
        max_holders = MAX_HOLDERS if opts.max_holders is None else opts.max_holders
        wait = OWNER_WAIT_SECONDS if opts.owner_wait_seconds is None else \
            opts.owner_wait_seconds
        assert job.server.nodes is not None, "the coordinator sets the nodes"
        candidates = sorted(
            s.name for s in job.server.nodes.node_states()
             if s.up and s.address and job.image.id in s.cached and s.name not in deploying)
        holders = authorise_holders(job, candidates[:max_holders])
        holder_list = [{"name": name, "url": url.rstrip("/")} for name, url in holders]
        partners = [{"name": n.name, "url": n.address.rstrip("/")} for n in job.nodes]
        # Holders are not part of the deployment: they serve its image to its nodes
        # under a grant for its peer token, revoked in `finish`.
        job.state["serve_nodes"] = [h["name"] for h in holder_list]
        plans: dict[str, dict[str, Any]] = {}
        for i, node in enumerate(job.nodes):
            k = i % len(holder_list) if holder_list else 0
            plans[node.name] = {"partners": partners,
                                "holders": holder_list[k:] + holder_list[:k],
                                "owner_wait_seconds": wait}
        job.log(f"chunks: {len(partners)} nodes, {len(holder_list)} holder(s) of the image")
        return plans

    def finish(self, job: DeploymentJob) -> None:
        revoke_holders(job, job.state.get("serve_nodes") or [])

    def repo_bytes(self, job: DeploymentJob) -> int:
        return 0  # what the repository sends goes through its HTTP file endpoint


def _on_holders(job: DeploymentJob, names: Sequence[str], call: Any,
                failed: str) -> list[tuple[str, str] | None]:
    """`call(agent)` on each named node at once: (name, address) where it worked."""
    def one(name: str) -> tuple[str, str] | None:
        try:
            assert job.server.nodes is not None, "the coordinator sets the nodes"
            address, key = job.server.nodes.agent_endpoint(name)
            with AgentClient(name, address, key, timeout=GRANT_TIMEOUT,
                             context=job.server.agent_context) as agent:
                call(agent)
            return name, address
        except Exception as exc:
            why = exc.message if isinstance(exc, RainError) else repr(exc)
            job.log(f"chunks: holder {name} {failed}: {why}")
            return None

    if not names:
        return []
    with ThreadPoolExecutor(max_workers=min(len(names), MAX_HOLDERS)) as pool:
        return list(pool.map(one, names))


def authorise_holders(job: DeploymentJob, names: Sequence[str]) -> list[tuple[str, str]]:
    """The holders (name, address) that agreed to serve the image to the deployment."""
    agreed = _on_holders(job, names, lambda a: a.grant(job.peer_token, job.image.id),
                         "left out")
    return [h for h in agreed if h is not None]


def revoke_holders(job: DeploymentJob, names: Sequence[str]) -> None:
    with contextlib.suppress(Exception):
        _on_holders(job, names, lambda a: a.revoke(job.peer_token), "kept its grant")


# -- the node side --------------------------------------------------------------------------
class PeerFailed(RainError):
    """A peer to drop: unreachable, an error status, or a chunk of the wrong length."""

    code = "peer_failed"


class _Peers:
    """GET /v1/peer/chunks/{hex} from the plan's nodes, one keep-alive connection per
    peer and thread; drops a peer for good on failure or a bad chunk."""

    def __init__(self, ctx: FetchContext, timeout: float) -> None:
        self.ctx = ctx
        self.timeout = timeout
        self.dropped: set[str] = set()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []

    def alive(self, peer: Peer) -> bool:
        return peer.name not in self.dropped

    def drop(self, peer: Peer, why: str) -> None:
        with self._lock:
            if peer.name in self.dropped:
                return
            self.dropped.add(peer.name)
        self.ctx.stats.drop(peer.name, why)
        self.ctx.log(f"chunks: dropped {peer.name}: {why}")

    def fetch(self, peer: Peer, digest: bytes, index: int, *,
              partner: bool = False) -> bool | None:
        """Chunk `index` (of digest `digest`) from `peer` into the partial: True if it is
        there now, False if the peer has not got it, None if the peer is dropped.

        A deployment partner that refuses the peer token (403) has not had its own
        request yet: that is "not yet", like 404. A holder agreed to serve the
        deployment before it was listed: if it refuses now (restarted, image gone), it
        is dropped."""
        if not self.alive(peer):
            return None
        partial = self.ctx.partial
        length = partial.chunk_length(index)
        try:
            data = self._get(peer, digest, length, partner)
        except (OSError, http.client.HTTPException, PeerFailed) as exc:
            self._forget(peer)
            self.drop(peer, str(exc) or type(exc).__name__)
            return None
        if data is None:
            return False
        self.ctx.stats.add("peer_bytes", len(data))
        try:
            partial.put(index, data, peer.name)
        except BadChunk:
            self.ctx.stats.add("bad_chunks", 1)
            self.drop(peer, f"sent a chunk that fails verification (chunk {index})")
            return None
        return True

    def _get(self, peer: Peer, digest: bytes, length: int, partner: bool) -> bytes | None:
        conns: dict[str, tuple[http.client.HTTPConnection, str]] = \
            self._local.__dict__.setdefault("conns", {})
        if peer.name not in conns:
            conns[peer.name] = open_connection(peer.url, self.timeout, self.ctx.repo.context)
            with self._lock:
                self._all.append(conns[peer.name][0])
        conn, prefix = conns[peer.name]
        conn.request("GET", prefix + CHUNK_BY_DIGEST_PATH.format(digest=digest.hex()),
                     headers=request_headers(self.ctx.peer_token))
        resp = conn.getresponse()
        if resp.status == 404 or (resp.status == 403 and partner):
            resp.read()
            return None
        if resp.status != 200:
            resp.read()
            raise PeerFailed(f"answered HTTP {resp.status} for a chunk")
        declared = resp.getheader("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) != length:
            raise PeerFailed(f"offered {declared} bytes for a chunk of {length}")
        data = resp.read(length + 1)
        if len(data) != length:
            raise PeerFailed(f"sent {len(data)} bytes for a chunk of {length}")
        if not resp.isclosed():
            resp.read()
        return data

    def _forget(self, peer: Peer) -> None:
        conns = self._local.__dict__.get("conns", {})
        entry = conns.pop(peer.name, None)
        if entry is not None:
            entry[0].close()

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()


def _parse_plan(plan: Mapping[str, Any], node: str) -> tuple[list[Peer], list[Peer], float]:
    try:
        partners = [Peer(str(p["name"]), str(p["url"])) for p in plan.get("partners", [])]
        holders = [Peer(str(p["name"]), str(p["url"])) for p in plan.get("holders", [])]
        wait = float(plan.get("owner_wait_seconds", OWNER_WAIT_SECONDS))
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidRequest(f"malformed chunks plan: {exc!r}") from None
    if partners and node not in {p.name for p in partners}:
        # Not listed among its own deployment's nodes: own everything, ask holders only.
        partners = []
    return partners, [h for h in holders if h.name != node], wait


class _Fetch:
    """One image's `chunks` transfer on one node."""

    def __init__(self, ctx: FetchContext) -> None:
        self.ctx = ctx
        self.partial: PartialImage = ctx.partial
        self.partners, self.holders, self.owner_wait = _parse_plan(ctx.plan, ctx.node)
        stall = ctx.options.stall_timeout_seconds
        self.peers = _Peers(ctx, stall)
        # One representative index per missing digest; the others are copies of it.
        self.first: dict[bytes, int] = {}
        self.copies: dict[int, list[int]] = {}
        for i in self.partial.missing():
            digest = self.partial.manifest.chunks[i]
            if digest in self.first:
                self.copies[self.first[digest]].append(i)
            else:
                self.first[digest] = i
                self.copies[i] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()  # another part of this transfer failed

    def run(self) -> None:
        try:
            self._from_local()
            self._from_nodes()
            self._check_cancel()
            rest = self._todo(self.first)
            if rest:
                self.ctx.repo.fetch(self.ctx.image_id, self.partial, sorted(rest.values()),
                                    stats=self.ctx.stats, cancel=self.ctx.cancel)
            self._copy_duplicates()
        finally:
            self.peers.close()
        if not self.partial.complete:
            raise TransferAborted(f"chunks transfer of {self.ctx.image_id} ended with "
                                  f"{self.partial.missing_count} chunks missing")

    def _check_cancel(self) -> None:
        if self.ctx.cancel.is_set():
            raise TransferAborted(f"transfer of {self.ctx.image_id} cancelled")
        if self.errors:
            raise self.errors[0]

    def _todo(self, digests: Mapping[bytes, int]) -> dict[bytes, int]:
        return {d: i for d, i in digests.items() if not self.partial.present(i)}

    # -- 1. this node's own chunks -----------------------------------------------------
    def _from_local(self) -> None:
        local = self.ctx.local
        if local is None:
            return
        fds: dict[Path, int] = {}
        try:
            for digest, index in list(self.first.items()):
                found = local.find(digest)
                if found is None:
                    continue
                path, offset = found
                length = self.partial.chunk_length(index)
                try:
                    if path not in fds:
                        fds[path] = os.open(path, os.O_RDONLY)
                    data = os.pread(fds[path], length, offset)
                    self.partial.put(index, data, f"local:{path.name}")
                except OSError:
                    continue  # evicted meanwhile: get it elsewhere
                except BadChunk:
                    self.ctx.stats.add("bad_chunks", 1)
                    self.ctx.log(f"chunks: the node cache is damaged: {path} at {offset} does "
                                 f"not match chunk {index}; fetching it elsewhere")
                    report = getattr(local, "report_damaged", None)
                    if report is not None:
                        report(digest, path, offset)
                    continue
                self.ctx.stats.add("local_bytes", length)
        finally:
            for fd in fds.values():
                os.close(fd)

    # -- 2. the deployment's other nodes and the image's holders -------------------------
    def _from_nodes(self) -> None:
        todo = self._todo(self.first)
        if not todo or (not self.partners and not self.holders):
            return
        me = next((p for p in self.partners if p.name == self.ctx.node), None)
        mine: dict[bytes, int] = {}
        by_owner: dict[Peer, dict[bytes, int]] = {}
        for digest, index in todo.items():
            owner = owner_of(digest, self.partners) if self.partners else me
            if owner is None or owner == me:
                mine[digest] = index
            else:
                by_owner.setdefault(owner, {})[digest] = index
        threads = [threading.Thread(target=self._guard, args=(self._own_share, mine),
                                    daemon=True, name="chunks-own")]
        threads += [threading.Thread(target=self._guard, args=(self._from_owner, owner, share),
                                     daemon=True, name=f"chunks-{owner.name}")
                    for owner, share in by_owner.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._check_cancel()

    def _guard(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except BaseException as exc:  # handed to the fetching thread
            self.errors.append(exc)
            self.stop.set()

    def _stopped(self) -> bool:
        return self.stop.is_set() or self.ctx.cancel.is_set()

    def _own_share(self, mine: dict[bytes, int]) -> None:
        """The chunks this node fetches for the others: from holders, else the repository."""
        for digest, index in mine.items():
            if self._stopped() or not self.holders:
                break
            self._from_holders(digest, index)
        rest = self._todo(mine)
        if rest:
            self.ctx.repo.fetch(self.ctx.image_id, self.partial, sorted(rest.values()),
                                stats=self.ctx.stats, cancel=self.ctx.cancel)

    def _from_holders(self, digest: bytes, index: int) -> bool:
        # In order, stopping at the first that has it.
        return any(self.peers.fetch(holder, digest, index) for holder in self.holders)

    def _from_owner(self, owner: Peer, share: dict[bytes, int]) -> None:
        """Ask `owner` for its share in order, waiting while it has not got the next one yet
        (it fetches them in the same order); what it cannot give is left for the repository."""
        queue = sorted(share.items(), key=lambda item: item[1])
        progress = time.monotonic()
        pos = 0
        while pos < len(queue) and not self._stopped():
            digest, index = queue[pos]
            if self.partial.present(index):
                pos += 1
                continue
            got = self.peers.fetch(owner, digest, index, partner=True)
            if got:
                pos += 1
                progress = time.monotonic()
                continue
            if got is None:
                return  # dropped: the rest comes from holders or the repository
            if self._from_holders(digest, index):
                pos += 1
                continue
            if time.monotonic() - progress > self.owner_wait:
                self.ctx.log(f"chunks: {owner.name} has not got chunk {index} after "
                             f"{self.owner_wait:.0f} s; the repository sends the rest")
                return
            self.stop.wait(POLL)

    def _copy_duplicates(self) -> None:
        for first, others in self.copies.items():
            if not others or not self.partial.present(first):
                continue
            data = self.partial.read(first)
            for i in others:
                if self.partial.put(i, data, "local:same image"):
                    self.ctx.stats.add("local_bytes", len(data))


class ChunksNode:
    """The node side. While a transfer runs, its PartialImage is offered through the node's
    ChunkIndex (when `ctx.local` is one: `register`/`unregister`), so the chunks it owns
    reach the other nodes as soon as they are verified here."""

    name: ClassVar[str] = "chunks"

    def __init__(self) -> None:
        # image id -> the indexes it is registered in (one per agent; tests run several)
        self._offered: dict[str, list[Any]] = {}
        self._lock = threading.Lock()

    def fetch(self, ctx: FetchContext) -> None:
        register = getattr(ctx.local, "register", None)
        if register is not None:
            register(ctx.image_id, ctx.partial)
            with self._lock:
                self._offered.setdefault(ctx.image_id, []).append(ctx.local)
        try:
            _Fetch(ctx).run()
        except BaseException:
            self._withdraw(ctx.image_id, ctx.local)
            raise

    def cached(self, ctx: FetchContext, path: Path) -> None:
        # The cached copy takes over from the partial (which was renamed into the cache)
        # before the partial is withdrawn, so peers never find neither.
        add_image = getattr(ctx.local, "add_image", None)
        if add_image is not None:
            add_image(ctx.image_id)
        self._withdraw(ctx.image_id, ctx.local)

    def release(self, image_id: str) -> None:
        self._withdraw(image_id)

    def _withdraw(self, image_id: str, only: Any = None) -> None:
        with self._lock:
            held = self._offered.get(image_id, [])
            gone = [i for i in held if only is None or i is only]
            rest = [i for i in held if not (only is None or i is only)]
            if rest:
                self._offered[image_id] = rest
            else:
                self._offered.pop(image_id, None)
        for index in gone:
            index.unregister(image_id)


NODE = ChunksNode()
COORDINATOR = ChunksCoordinator()
