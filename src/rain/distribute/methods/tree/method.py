"""`tree`: pipelined k-ary trees of nodes, one per stripe of the image (SplitStream).

The non-zero chunks are split into `stripes` stripes (chunk i in stripe
(i // unit) % stripes, `unit` consecutive chunks at a time). Every stripe has
its own k-ary tree: its interior (forwarding) nodes are one group of about
N/stripes nodes, arranged as a heap whose root pulls that stripe from the
repository, and every other node is a leaf under one of them. With
stripes = k each node forwards one stripe to at most k children (k · R/k = R
up) and receives k stripes at R/k each (R down), and the repository sends
each stripe once (S in total). A node forwards every chunk as soon as it has
verified it: its agent serves `rain.distribute.methods.tree.peer.serve_stripe` from the
PartialImage this method fills, so a hop costs about one chunk at R/k, not
the whole image. See docs/tree-and-chunks.md for the picture and the sums.

The wire knows only stripes "i % of == w" (peer.py). A stripe of `unit`
consecutive chunks is the union of `unit` wire stripes w = unit·s + r of
`of = unit·stripes`, so a child opens `unit` streams to its parent, and the
stripe's root asks the repository for runs of `unit` chunks per Range
request instead of one chunk per request (each request costs the repository
several milliseconds of its own work).

A parent that dies, stalls or sends a chunk that fails verification (or one
that is not the next of its stripe) is dropped and the stripe resumes from
its first missing chunk at the next source of the plan: the grandparent,
its parent, ..., and finally the repository. Meanwhile the node's own
children keep reading its PartialImage, so a failure costs its subtree a
detour, never the deployment.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from rain.client.connection import open_connection, request_headers
from rain.distribute.methods.base import DeploymentJob, FetchContext
from rain.distribute.methods.tree.peer import CHUNKS_PATH, read_frames, stripe_indices
from rain.distribute.partial import BadChunk, TransferAborted
from rain.distribute.source import RepoSource
from rain.model.errors import InvalidRequest, RainError

REPOSITORY = "repository"  # the source name (and URL) the plan uses for the repository
DEFAULT_UNIT = 4  # chunks per stripe unit when there is more than one stripe (1 MiB)
# A parent that does not know the image yet (404, 503) or this deployment's peer token
# (403: the coordinator sends every node its request at the same time, so a child can be
# quicker than its parent's own request): ask again, up to the stall limit.
NOT_READY_STATUSES = (403, 404, 503)
POLL = 0.25  # seconds between checks of cancel / retries of a parent that is not ready


# -- the layout: a pure function of the node list ------------------------------------------
Layout = Mapping[str, Mapping[int, "str | None"]]  # node -> stripe -> parent (None: repository)


def tree_layout(node_names: Sequence[str], fanout: int,
                stripes: int) -> dict[str, dict[int, str | None]]:
    """The parent of every node in every stripe's tree (None: the repository).

    Nodes are dealt round-robin into `stripes` groups; in tree s, group s is
    the interior, a `fanout`-ary heap in the order given, and every other
    node hangs under the shallowest interior node with a free slot (at most
    `fanout` children each). A group too small to hold all the leaves this
    way (possible only when stripes > fanout, or for some N when fanout > 2)
    is topped up with the outside nodes that forward the least so far, so
    the bound on children holds and interior-disjointness gives way only
    where it cannot hold at all.
    """
    names = list(node_names)
    if len(set(names)) != len(names):
        raise InvalidRequest("a tree layout needs distinct node names")
    if fanout < 1 or stripes < 1:
        raise InvalidRequest(f"tree fan-out and stripes must be at least 1 (got {fanout}, "
                             f"{stripes})")
    order = {name: i for i, name in enumerate(names)}
    layout: dict[str, dict[int, str | None]] = {name: {} for name in names}
    forwards = dict.fromkeys(names, 0)  # children over the trees built so far
    groups = [names[s::stripes] for s in range(stripes)]
    group_of = {x: s for s, group in enumerate(groups) for x in group}

    def capacity(n: int) -> int:  # leaf slots of a heap of n interior nodes
        return (fanout - 1) * n + 1 if n else 0

    def short(s: int) -> bool:
        return capacity(len(groups[s])) < len(names) - len(groups[s])

    # Trees whose group suffices first, so that a short tree tops itself up with the
    # nodes whose own load is already known (and not with one still to carry its own).
    built: set[int] = set()
    for s in sorted(range(stripes), key=lambda s: (short(s), s)):
        interior = list(groups[s])
        inside = set(interior)
        outside = [x for x in names if x not in inside]
        while outside and capacity(len(interior)) < len(outside):
            pick = min(outside, key=lambda x: (group_of[x] not in built and short(group_of[x]),
                                               forwards[x], order[x]))
            outside.remove(pick)
            interior.append(pick)
        children = dict.fromkeys(interior, 0)
        for pos, x in enumerate(interior):
            parent = None if pos == 0 else interior[(pos - 1) // fanout]
            layout[x][s] = parent
            if parent is not None:
                children[parent] += 1
        # The shallowest free slots first (heap order is breadth-first); nodes taken in
        # from outside come last, so they carry as few leaves as the tree needs.
        slots = (x for x in interior for _ in range(fanout - children[x]))
        for leaf in outside:
            parent = next(slots)
            layout[leaf][s] = parent
            children[parent] += 1
        for x, n in children.items():
            forwards[x] += n
        built.add(s)
    layout = {x: dict(sorted(parents.items())) for x, parents in layout.items()}
    return layout


def tree_depths(layout: Layout) -> dict[str, dict[int, int]]:
    """Hops from the repository of every node in every tree (a stripe root is at 1)."""
    depths: dict[str, dict[int, int]] = {name: {} for name in layout}
    for name, parents in layout.items():
        for s in parents:
            hops = 0
            at: str | None = name
            while at is not None:
                hops += 1
                if hops > len(layout):
                    raise InvalidRequest(f"the tree of stripe {s} has a cycle through {name}")
                at = layout[at][s]
            depths[name][s] = hops
    return depths


def tree_children(layout: Layout) -> dict[str, dict[int, list[str]]]:
    """The children of every node in every tree."""
    kids: dict[str, dict[int, list[str]]] = {name: {} for name in layout}
    for name, parents in layout.items():
        for s, parent in parents.items():
            if parent is not None:
                kids[parent].setdefault(s, []).append(name)
    return kids


def tree_plans(layout: Layout, addresses: Mapping[str, str],
               *, fanout: int, unit: int) -> dict[str, dict[str, Any]]:
    """The per-node plans for a layout (the format NODE.fetch reads; see the doc)."""
    stripes = len(next(iter(layout.values()))) if layout else 1
    depths = tree_depths(layout)
    kids = tree_children(layout)
    plans: dict[str, dict[str, Any]] = {}
    for name, parents in layout.items():
        trees = []
        for s in range(stripes):
            sources = []
            at = parents[s]
            while at is not None:
                sources.append({"name": at, "url": addresses[at].rstrip("/")})
                at = layout[at][s]
            sources.append({"name": REPOSITORY, "url": REPOSITORY})
            trees.append({"stripe": s, "parent": sources[0]["url"], "sources": sources,
                          "depth": depths[name][s], "children": kids[name].get(s, [])})
        plans[name] = {"fanout": fanout, "stripes": stripes, "unit": unit,
                       "of": stripes * unit, "trees": trees}
    return plans


# -- the repository side --------------------------------------------------------------------
class TreeCoordinator:
    name: ClassVar[str] = "tree"

    def prepare(self, job: DeploymentJob) -> dict[str, dict[str, Any]]:
        config = job.server.config
        opts = job.options
        fanout = opts.fanout or int(config.tree_fanout)
        stripes = opts.stripes or int(config.tree_stripes) or fanout
        unit = opts.stripe_unit or (DEFAULT_UNIT if stripes > 1 else 1)
        names = [n.name for n in job.nodes]
        layout = tree_layout(names, fanout, stripes)
        plans = tree_plans(layout, {n.name: n.address for n in job.nodes}, fanout=fanout,
                           unit=unit)
        depth = max((d for ds in tree_depths(layout).values() for d in ds.values()), default=0)
        job.state["tree"] = {"fanout": fanout, "stripes": stripes, "unit": unit, "depth": depth}
        job.log(f"tree: {len(names)} nodes, fan-out {fanout}, {stripes} stripe(s) of "
                f"{unit}-chunk units, depth {depth}")
        return plans

    def finish(self, job: DeploymentJob) -> None:
        return None

    def repo_bytes(self, job: DeploymentJob) -> int:
        return 0  # stripe roots and fallbacks use the HTTP file endpoint, which counts itself


# -- the node side --------------------------------------------------------------------------
class SourceFailed(RainError):
    """A parent that must be dropped for this stripe (dead, stalled, lying, or refusing)."""

    code = "source_failed"


@dataclass
class _Source:
    name: str
    url: str


@dataclass
class _TreeEntry:
    stripe: int
    sources: list[_Source]
    depth: int


def _parse_plan(plan: Mapping[str, Any]) -> tuple[int, int, list[_TreeEntry]]:
    """(unit, of, trees) of a node's plan; InvalidRequest when it does not hang together."""
    try:
        stripes, unit, of = int(plan["stripes"]), int(plan["unit"]), int(plan["of"])
        trees = [_TreeEntry(int(t["stripe"]),
                            [_Source(str(x["name"]), str(x["url"])) for x in t["sources"]],
                            int(t["depth"])) for t in plan["trees"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidRequest(f"malformed tree plan: {exc!r}") from None
    if stripes < 1 or unit < 1 or of != stripes * unit or \
            sorted(t.stripe for t in trees) != list(range(stripes)) or \
            any(not t.sources or t.sources[-1].url != REPOSITORY for t in trees):
        raise InvalidRequest("malformed tree plan: stripes, unit, of and trees disagree")
    return unit, of, trees


class _RepoPool:
    """RepoSource is one connection, so each concurrent user gets its own: the first
    `ctx.repo` itself, the others copies of it (same user, deployment and rate limit)."""

    def __init__(self, repo: RepoSource) -> None:
        self._repo = repo
        self._free = [repo]
        self._made: list[RepoSource] = []
        self._lock = threading.Lock()

    def take(self) -> RepoSource:
        with self._lock:
            if self._free:
                return self._free.pop()
            src = RepoSource(self._repo.url, self._repo.token, deployment=self._repo.deployment,
                             timeout=self._repo.timeout, context=self._repo.context)
            src.limit = self._repo.limit
            self._made.append(src)
            return src

    def give(self, src: RepoSource) -> None:
        with self._lock:
            self._free.append(src)

    def close(self) -> None:
        for src in self._made:
            src.close()


class _StripeFetch:
    """One stripe's tree: its `unit` wire stripes from one source at a time."""

    def __init__(self, ctx: FetchContext, entry: _TreeEntry, unit: int, of: int,
                 repos: _RepoPool, cancel: threading.Event) -> None:
        self.ctx = ctx
        self.entry = entry
        self.of = of
        self.wires = [unit * entry.stripe + r for r in range(unit)]
        self.indices = sorted(i for w in self.wires for i in stripe_indices(ctx.partial, w, of))
        self.repos = repos
        self.cancel = cancel  # set when the whole fetch stops (cancelled, or failed elsewhere)
        stall = ctx.options.stall_timeout_seconds
        # Deeper nodes wait longer before they give up on a parent, so when a node goes
        # silent its children (not its grandchildren, whose parents are only waiting for
        # it) are the ones that move, and the subtree below them keeps its shape.
        self.stall = stall * max(1.0, entry.depth / 2)
        self.error: BaseException | None = None
        self._round = threading.Event()  # set: this round's streams must stop
        # Sockets of this stripe's open streams, to cut them from another thread. (Not the
        # connections: http.client hands a closing response's socket over and forgets it.)
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()

    def run(self) -> None:
        """The thread body: the sources of the plan in turn until the stripe is here."""
        try:
            for source in self.entry.sources:
                self._check_cancel()
                if not self.ctx.partial.missing(self.indices):
                    return
                if source.url == REPOSITORY:
                    src = self.repos.take()
                    try:
                        src.fetch(self.ctx.image_id, self.ctx.partial, self.indices,
                                  stats=self.ctx.stats, cancel=self.cancel)
                    finally:
                        self.repos.give(src)
                    return
                why = self._from_peer(source)
                if why is None:
                    return
                self._check_cancel()  # a cut we made ourselves is not the parent's fault
                self.ctx.stats.drop(source.name, why)
                self.ctx.log(f"tree: stripe {self.entry.stripe}: dropped {source.name}: {why}")
        except BaseException as exc:  # handed to the caller's thread
            self.error = exc

    def stop(self) -> None:
        """Cut this stripe's peer streams now (after `cancel` was set); run() then ends."""
        self._round.set()
        self._cut()

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise TransferAborted(f"transfer of {self.ctx.image_id} cancelled")

    def _from_peer(self, source: _Source) -> str | None:
        """Stream every wire stripe from `source`; None when all arrived, else why not."""
        self._round = threading.Event()
        self._check_cancel()
        failures: list[str] = []
        threads = [threading.Thread(target=self._stream_guarded, args=(source, w, failures),
                                    name=f"tree-{self.ctx.image_id[:8]}-w{w}", daemon=True)
                   for w in self.wires]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failures:
            return failures[0]
        if self.ctx.partial.missing(self.indices):
            return "its streams ended before the stripe did"
        return None

    def _stream_guarded(self, source: _Source, wire: int, failures: list[str]) -> None:
        why = ""
        try:
            self._stream(source, wire)
        except BadChunk as exc:
            self.ctx.stats.add("bad_chunks", 1)
            why = f"sent chunk {exc.index}, which fails verification"
        except (SourceFailed, OSError, http.client.HTTPException) as exc:
            why = str(exc) or type(exc).__name__
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
        if why:
            failures.append(why)
            self._round.set()  # the other wire stripes leave this source too
            self._cut()

    def _stream(self, source: _Source, wire: int) -> None:
        partial = self.ctx.partial
        mine = [i for i in self.indices if i % self.of == wire]
        todo = partial.missing(mine)
        if not todo or self._round.is_set():
            return
        start = todo[0]
        expected = [i for i in mine if i >= start]
        conn, prefix = open_connection(source.url, self.stall, self.ctx.repo.context)
        socks: list[socket.socket] = []
        resp: http.client.HTTPResponse | None = None
        try:
            resp = self._open(conn, prefix, wire, start, socks)
            pos = 0
            for index, data in read_frames(resp, partial.chunk_size):
                if pos >= len(expected) or index != expected[pos]:
                    want = expected[pos] if pos < len(expected) else "nothing more"
                    raise SourceFailed(f"sent chunk {index} where stripe {wire}/{self.of} "
                                       f"has {want}")
                pos += 1
                self.ctx.stats.add("peer_bytes", len(data))
                partial.put(index, data, source.name)
                if self._round.is_set():
                    return
            if pos < len(expected):
                raise SourceFailed(f"closed stripe {wire}/{self.of} after {pos} of "
                                   f"{len(expected)} chunks")
        finally:
            if resp is not None:
                resp.close()
            conn.close()
            with self._lock:
                self._socks.difference_update(socks)
            for sock in socks:
                sock.close()

    def _open(self, conn: http.client.HTTPConnection, prefix: str, wire: int, start: int,
              socks: list[socket.socket]) -> http.client.HTTPResponse:
        path = prefix + CHUNKS_PATH.format(image_id=self.ctx.image_id) + \
            f"?stripe={wire}&of={self.of}&from={start}"
        headers = request_headers(self.ctx.peer_token)
        deadline = time.monotonic() + self.stall
        while True:
            conn.request("GET", path, headers=headers)
            if conn.sock is not None:
                socks.append(conn.sock)
                with self._lock:
                    self._socks.add(conn.sock)
                if self._round.is_set():
                    raise SourceFailed("stopped")
            resp = conn.getresponse()
            if resp.status == 200:
                return resp
            resp.read()
            if resp.status not in NOT_READY_STATUSES:
                raise SourceFailed(f"answered HTTP {resp.status} for stripe {wire}/{self.of}")
            if time.monotonic() >= deadline:
                raise SourceFailed(f"did not have the image within {self.stall:.0f} s")
            if self._round.wait(POLL):
                raise SourceFailed("stopped")

    def _cut(self) -> None:
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class TreeNode:
    name: ClassVar[str] = "tree"

    def fetch(self, ctx: FetchContext) -> None:
        unit, of, trees = _parse_plan(ctx.plan)
        repos = _RepoPool(ctx.repo)
        stop = threading.Event()
        stripes = [_StripeFetch(ctx, entry, unit, of, repos, stop) for entry in trees]
        ctx.log("tree: " + ", ".join(f"stripe {t.stripe} from {t.sources[0].name}"
                                     for t in trees) + f" ({unit}-chunk units)")
        threads = [threading.Thread(target=s.run, daemon=True,
                                    name=f"tree-{ctx.image_id[:8]}-s{s.entry.stripe}")
                   for s in stripes]
        try:
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                # A stripe that failed for good (the repository itself gave up) fails the
                # image: stop the others rather than let them finish for nothing.
                if not stop.is_set() and (ctx.cancel.is_set() or
                                          any(s.error is not None for s in stripes)):
                    stop.set()
                    for s in stripes:
                        s.stop()
                for t in threads:
                    t.join(POLL)
        finally:
            repos.close()
        errors = [s.error for s in stripes if s.error is not None]
        real = [e for e in errors if not isinstance(e, TransferAborted)]
        if real or errors:
            raise (real or errors)[0]
        if not ctx.partial.complete:
            raise TransferAborted(f"tree transfer of {ctx.image_id} ended with "
                                  f"{ctx.partial.missing_count} chunks missing")

    def cached(self, ctx: FetchContext, path: Path) -> None:
        return None  # the agent serves stripes from the cached copy itself

    def release(self, image_id: str) -> None:
        return None


NODE = TreeNode()
COORDINATOR = TreeCoordinator()
