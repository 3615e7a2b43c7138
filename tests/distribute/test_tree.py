"""The `tree` method: the layout's properties, and real NODE.fetch calls chained through
test doubles of the agent's peer endpoint (stdlib HTTP servers that serve a PartialImage
with peer.serve_stripe) against a real `rain serve`."""

from __future__ import annotations

import math
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import pytest

from rain.deploy.config import DistributeConfig
from rain.distribute.methods.base import DeploymentJob, FetchContext, NodeTarget
from rain.distribute.methods.tree import method as tree
from rain.distribute.methods.tree.peer import FRAME, serve_stripe
from rain.distribute.partial import PartialImage, TransferAborted
from rain.distribute.source import RepoSource, TransferStats
from rain.model import DiskFormat, InvalidRequest
from rain.model.deploy import DeployOptions
from tests.distribute.conftest import RepoImage

PEER_TOKEN = "peer-token-for-tests"
WAIT = 30.0  # liveness bound for events (never a speed assertion)


# -- the layout ----------------------------------------------------------------------------
def names(n: int) -> list[str]:
    return [f"n{i:02d}" for i in range(n)]


def disjoint_feasible(n: int, fanout: int, stripes: int) -> bool:
    """Whether every tree can have its own interior: each needs ceil((n-1)/k) of them."""
    return n <= 1 or stripes * math.ceil((n - 1) / fanout) <= n


@pytest.mark.parametrize("fanout,stripes", [(2, 2), (2, 1), (3, 3), (4, 4), (3, 1), (2, 3),
                                            (1, 1)])
def test_layout_properties(fanout: int, stripes: int) -> None:
    for n in range(1, 70):
        nodes = names(n)
        layout = tree.tree_layout(nodes, fanout, stripes)
        depths = tree.tree_depths(layout)  # raises on a cycle
        kids = tree.tree_children(layout)
        assert set(layout) == set(nodes)
        for s in range(stripes):
            # Every node gets every stripe exactly once, from one parent or the repository.
            assert all(set(layout[x]) == set(range(stripes)) for x in nodes)
            roots = [x for x in nodes if layout[x][s] is None]
            assert len(roots) == 1, (n, s, roots)
            assert all(len(kids[x].get(s, [])) <= fanout for x in nodes)
            assert all(layout[x][s] != x for x in nodes)
        forwarding = {x: [s for s in kids[x] if kids[x][s]] for x in nodes}
        total_children = {x: sum(len(c) for c in kids[x].values()) for x in nodes}
        if stripes <= fanout and disjoint_feasible(n, fanout, stripes):
            # Interior-disjoint: a node forwards in one tree at most, so its upload
            # carries one stripe to at most k children; its k parents are all different.
            assert all(len(f) <= 1 for f in forwarding.values()), n
            assert max(total_children.values()) <= fanout
            for x in nodes:
                parents = [p for p in layout[x].values() if p is not None]
                assert len(parents) == len(set(parents))
        if stripes <= fanout:
            # Even where it is not: nobody forwards to more than k children in all.
            assert max(total_children.values()) <= max(fanout, stripes), n
        if fanout >= 2:
            # Depth ≈ log_k of a group: the heap of ~n/stripes plus the leaf hop.
            group = math.ceil(n / stripes) + (0 if disjoint_feasible(n, fanout, stripes) else n)
            bound = 2 + math.floor(math.log(group * (fanout - 1) + 1, fanout))
            assert max(d for ds in depths.values() for d in ds.values()) <= bound, (n, depths)
        else:
            assert max(depths[x][0] for x in nodes) == n  # fan-out 1: a chain


def test_layout_24_nodes_binary_two_stripes() -> None:
    layout = tree.tree_layout(names(24), 2, 2)
    depths = tree.tree_depths(layout)
    assert max(d for ds in depths.values() for d in ds.values()) == 5
    kids = tree.tree_children(layout)
    interior = [{x for x in layout if kids[x].get(s)} for s in range(2)]
    assert interior[0].isdisjoint(interior[1])
    assert sum(len(i) for i in interior) <= 24


def test_layout_rejects_bad_input() -> None:
    with pytest.raises(InvalidRequest):
        tree.tree_layout(["a", "a"], 2, 2)
    with pytest.raises(InvalidRequest):
        tree.tree_layout(["a"], 0, 1)
    assert tree.tree_layout([], 2, 2) == {}


def _job(nodes: list[str], options: dict[str, Any]) -> DeploymentJob:
    server = cast(Any, SimpleNamespace(config=DistributeConfig()))
    return DeploymentJob(
        id="d-1", image=cast(Any, None), manifest=cast(Any, None), manifest_id="m",
        nodes=[NodeTarget(x, f"http://10.0.0.{i + 1}:8481/", "key") for i, x in
               enumerate(nodes)],
        peer_token=PEER_TOKEN, options=DeployOptions.from_json(options),
        seed_file=lambda: Path("/nonexistent"),
        workdir=Path("/nonexistent"), server=server, log=lambda _m: None)


def test_coordinator_plans() -> None:
    job = _job(names(7), {})
    plans = tree.COORDINATOR.prepare(job)
    assert set(plans) == set(names(7))
    p = plans["n03"]
    assert (p["fanout"], p["stripes"], p["unit"], p["of"]) == (2, 2, 4, 8)
    for t in p["trees"]:
        urls = [x["url"] for x in t["sources"]]
        assert urls[-1] == "repository" and t["parent"] == urls[0]
        assert all(u == "repository" or u.startswith("http://10.0.0.") for u in urls)
        assert len(urls) == t["depth"]  # parent, grandparent, ..., repository
    roots = [x for x, p in plans.items() if p["trees"][0]["parent"] == "repository"]
    assert roots == ["n00"]
    single = tree.COORDINATOR.prepare(_job(names(7), {"stripes": 1, "fanout": 3}))
    assert (single["n00"]["stripes"], single["n00"]["unit"], single["n00"]["of"]) == (1, 1, 1)
    with pytest.raises(InvalidRequest):
        tree.COORDINATOR.prepare(_job(names(3), {"fanout": "two"}))
    with pytest.raises(InvalidRequest):
        tree.COORDINATOR.prepare(_job(names(3), {"stripe_unit": 0}))
    assert tree.COORDINATOR.repo_bytes(job) == 0


# -- test doubles of the node agent's peer endpoint ---------------------------------------
@dataclass
class Misbehaviour:
    corrupt: int | None = None  # flip a byte of this chunk index
    die_after: int | None = None  # cut the connection after this many frames (per stream)
    stall_after: int | None = None  # stop sending (but keep the connection) after this many
    not_ready: int = 0  # answer `not_ready_status` to this many requests first
    not_ready_status: int = 404
    wrong_stripe: bool = False  # send the chunks of the next stripe instead
    requests: int = 0
    release: threading.Event = field(default_factory=threading.Event)


class PeerDouble:
    """Plays one node agent's `GET /v1/peer/images/{id}/chunks` over its PartialImage."""

    def __init__(self, partial: PartialImage, image_id: str,
                 bad: Misbehaviour | None = None) -> None:
        self.partial = partial
        self.image_id = image_id
        self.bad = bad or Misbehaviour()
        self.sent = 0
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: object) -> None:
                pass

            def do_GET(self) -> None:
                double.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        bad = self.bad
        if h.headers.get("Authorization") != f"Bearer {PEER_TOKEN}":
            h.send_error(401)
            return
        if url.path != f"/v1/peer/images/{self.image_id}/chunks":
            h.send_error(404)
            return
        bad.requests += 1
        if bad.requests <= bad.not_ready:
            h.send_error(bad.not_ready_status)
            return
        q = {k: int(v[0]) for k, v in parse_qs(url.query).items()}
        stripe, of, start = q["stripe"], q["of"], q["from"]
        if bad.wrong_stripe:
            stripe = (stripe + 1) % of
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Connection", "close")
        h.end_headers()
        frames = 0

        def write(frame: bytes) -> None:
            nonlocal frames
            if bad.die_after is not None and frames >= bad.die_after:
                h.wfile.write(frame[: FRAME.size + 100])  # dies mid-frame
                h.wfile.flush()
                h.connection.shutdown(socket.SHUT_RDWR)
                raise ConnectionAbortedError("the double died")
            if bad.stall_after is not None and frames >= bad.stall_after:
                bad.release.wait(WAIT)
                raise ConnectionAbortedError("the double stalled")
            index, _ = FRAME.unpack(frame[: FRAME.size])
            if index == bad.corrupt:
                frame = frame[:-1] + bytes([frame[-1] ^ 0xFF])
            h.wfile.write(frame)
            frames += 1
            self.sent += len(frame) - FRAME.size

        try:
            serve_stripe(self.partial, stripe, of, start, write, idle_timeout=WAIT)
        except (OSError, TransferAborted, TimeoutError):
            h.close_connection = True

    def stop(self) -> None:
        self.bad.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class WatchedPartial(PartialImage):
    """A PartialImage that reports each chunk it accepts, and can hold one chunk back."""

    def __init__(self, path: Path, manifest: Any, *, hold: int | None = None) -> None:
        super().__init__(path, manifest)
        self.hold = hold
        self.held = threading.Event()  # put(hold) is waiting
        self.go = threading.Event()  # let it through
        self.on_put: list[Callable[[int], None]] = []

    def put(self, index: int, data: bytes | bytearray | memoryview, source: str = "") -> bool:
        if index == self.hold:
            self.held.set()
            self.go.wait(WAIT)
        ok = super().put(index, data, source)
        for f in self.on_put:
            f(index)
        return ok


@dataclass
class Node:
    name: str
    ctx: FetchContext
    double: PeerDouble
    logs: list[str]
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        def run() -> None:
            try:
                tree.NODE.fetch(self.ctx)
            except BaseException as exc:
                self.error = exc
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> None:
        assert self.thread is not None
        self.thread.join(2 * WAIT)
        assert not self.thread.is_alive(), f"{self.name} did not finish"
        if self.error is not None:
            raise self.error


@pytest.fixture
def cluster(repo_image: RepoImage, tmp_path: Path) -> Iterator[Callable[..., dict[str, Node]]]:
    """make(names, fanout, stripes, unit=..., bad={name: Misbehaviour}, hold={name: index},
    options=...) -> nodes wired as the coordinator would plan them."""
    made: list[Node] = []

    def make(nodes: list[str], fanout: int, stripes: int, *, unit: int = 1,
             bad: dict[str, Misbehaviour] | None = None, hold: dict[str, int] | None = None,
             options: dict[str, Any] | None = None) -> dict[str, Node]:
        out: dict[str, Node] = {}
        for name in nodes:
            partial = WatchedPartial(tmp_path / f"{name}.img", repo_image.manifest,
                                     hold=(hold or {}).get(name))
            double = PeerDouble(partial, repo_image.id, (bad or {}).get(name))
            logs: list[str] = []
            ctx = FetchContext(
                node=name, image_id=repo_image.id, sha256=repo_image.sha256,
                disk_format=DiskFormat.RAW, manifest=repo_image.manifest, partial=partial,
                repo=RepoSource(repo_image.url, repo_image.token, deployment="d-tree"),
                plan={}, stats=TransferStats(), cancel=threading.Event(), workdir=tmp_path,
                peer_token=PEER_TOKEN, log=logs.append,
                options=DeployOptions.from_json(options or {}))
            out[name] = Node(name, ctx, double, logs)
        layout = tree.tree_layout(nodes, fanout, stripes)
        plans = tree.tree_plans(layout, {n: out[n].double.url for n in nodes}, fanout=fanout,
                                unit=unit)
        for name in nodes:
            out[name].ctx.plan = plans[name]
        made.extend(out.values())
        return out

    yield make
    for node in made:
        node.ctx.cancel.set()
        node.double.stop()
        if node.thread is not None:
            node.thread.join(WAIT)
        node.ctx.repo.close()
        node.ctx.partial.close()


def assert_exact(node: Node, repo_image: RepoImage) -> None:
    assert node.ctx.partial.complete
    assert node.ctx.partial.path.read_bytes() == repo_image.path.read_bytes()


def data_bytes(repo_image: RepoImage) -> int:
    m = repo_image.manifest
    return sum(m.chunk_length(i) for i, d in enumerate(m.chunks) if d != bytes(32))


# -- the node side -------------------------------------------------------------------------
@pytest.mark.parametrize("unit", [1, 4])
def test_four_nodes_two_stripes_one_copy_from_the_repository(
        cluster: Callable[..., dict[str, Node]], repo_image: RepoImage, unit: int) -> None:
    nodes = cluster(["a", "b", "c", "d"], 2, 2, unit=unit)
    for n in nodes.values():
        n.start()
    for n in nodes.values():
        n.join()
    for n in nodes.values():
        assert_exact(n, repo_image)
        assert n.ctx.stats.dropped == [] and n.ctx.stats.bad_chunks == 0
    total = data_bytes(repo_image)
    # Every stripe left the repository once; everything else went node to node.
    assert sum(n.ctx.stats.repo_bytes for n in nodes.values()) == total
    assert sum(n.ctx.stats.peer_bytes for n in nodes.values()) == 3 * total
    # Each of a and b is the root of one stripe and gets the other from a peer.
    assert 0 < nodes["a"].ctx.stats.repo_bytes < total
    assert 0 < nodes["b"].ctx.stats.repo_bytes < total
    assert nodes["c"].ctx.stats.repo_bytes == nodes["d"].ctx.stats.repo_bytes == 0


def test_chain_is_pipelined(cluster: Callable[..., dict[str, Node]],
                            repo_image: RepoImage) -> None:
    """Repository → a → b → c: c has chunks while a is still receiving (a is held at one
    chunk in the middle, so it cannot complete until the test lets it)."""
    m = repo_image.manifest
    data = [i for i, d in enumerate(m.chunks) if d != bytes(32)]
    middle = data[len(data) // 2]
    before = {i for i in data if i < middle}
    nodes = cluster(["a", "b", "c"], 1, 1, hold={"a": middle})
    c_has_all_before = threading.Event()
    c_partial = nodes["c"].ctx.partial

    def watch(_index: int) -> None:
        if all(c_partial.present(i) for i in before):
            c_has_all_before.set()

    cast(WatchedPartial, c_partial).on_put.append(watch)
    for n in nodes.values():
        n.start()
    a_partial = cast(WatchedPartial, nodes["a"].ctx.partial)
    assert a_partial.held.wait(WAIT)
    assert c_has_all_before.wait(WAIT), "c got nothing while a was still receiving"
    # At this point a has not got the middle chunk: nobody below it has it either.
    assert not a_partial.complete and not a_partial.present(middle)
    assert not c_partial.present(middle)
    assert nodes["b"].ctx.stats.peer_bytes > 0
    a_partial.go.set()
    for n in nodes.values():
        n.join()
        assert_exact(n, repo_image)
    assert nodes["a"].ctx.stats.repo_bytes == data_bytes(repo_image)
    assert nodes["b"].ctx.stats.repo_bytes == nodes["c"].ctx.stats.repo_bytes == 0


def test_relay_that_sends_a_corrupt_chunk_is_dropped(
        cluster: Callable[..., dict[str, Node]], repo_image: RepoImage) -> None:
    m = repo_image.manifest
    data = [i for i, d in enumerate(m.chunks) if d != bytes(32)]
    nodes = cluster(["a", "b"], 2, 1, bad={"a": Misbehaviour(corrupt=data[5])})
    nodes["a"].start()
    nodes["a"].join()
    nodes["b"].start()
    nodes["b"].join()
    b = nodes["b"].ctx.stats
    assert_exact(nodes["b"], repo_image)
    assert b.bad_chunks == 1
    assert len(b.dropped) == 1 and b.dropped[0].startswith("a:")
    assert "fails verification" in b.dropped[0]
    # The five good chunks before the bad one stayed; the rest came from the repository.
    assert b.peer_bytes == sum(m.chunk_length(i) for i in data[:6])
    assert b.repo_bytes == data_bytes(repo_image) - sum(m.chunk_length(i) for i in data[:5])


def test_relay_that_dies_mid_stream(cluster: Callable[..., dict[str, Node]],
                                    repo_image: RepoImage) -> None:
    """a → b → c with b dying: c resumes from a (its grandparent), not the repository.
    A lone child of a dying root resumes from the repository."""
    nodes = cluster(["a", "b", "c"], 1, 1, bad={"b": Misbehaviour(die_after=4)})
    for n in nodes.values():
        n.start()
    for n in nodes.values():
        n.join()
        assert_exact(n, repo_image)
    c = nodes["c"].ctx.stats
    assert [d.split(":")[0] for d in c.dropped] == ["b"]
    assert c.repo_bytes == 0 and c.peer_bytes >= data_bytes(repo_image)
    assert nodes["b"].ctx.stats.dropped == []

    solo = cluster(["x", "y"], 1, 1, bad={"x": Misbehaviour(die_after=3)})
    for n in solo.values():
        n.start()
    for n in solo.values():
        n.join()
        assert_exact(n, repo_image)
    y = solo["y"].ctx.stats
    assert [d.split(":")[0] for d in y.dropped] == ["x"] and 0 < y.repo_bytes < \
        data_bytes(repo_image)


def test_stalled_relay_and_wrong_stripe(cluster: Callable[..., dict[str, Node]],
                                        repo_image: RepoImage) -> None:
    nodes = cluster(["a", "b"], 2, 1, bad={"a": Misbehaviour(stall_after=2)},
                    options={"stall_seconds": 1})
    for n in nodes.values():
        n.start()
    for n in nodes.values():
        n.join()
        assert_exact(n, repo_image)
    assert [d.split(":")[0] for d in nodes["b"].ctx.stats.dropped] == ["a"]

    other = cluster(["p", "q"], 2, 2, bad={"q": Misbehaviour(wrong_stripe=True)})
    for n in other.values():
        n.start()
    for n in other.values():
        n.join()
        assert_exact(n, repo_image)
    dropped = other["p"].ctx.stats.dropped
    assert len(dropped) == 1 and dropped[0].startswith("q:") and "where stripe" in dropped[0]


@pytest.mark.parametrize("status", [404, 403])
def test_parent_not_ready_yet_is_asked_again(cluster: Callable[..., dict[str, Node]],
                                             repo_image: RepoImage, status: int) -> None:
    """404: the parent has not started the image; 403: it has not had its own request
    (with the peer token) yet. Both are asked again, not dropped."""
    nodes = cluster(["a", "b"], 2, 1,
                    bad={"a": Misbehaviour(not_ready=3, not_ready_status=status)})
    for n in nodes.values():
        n.start()
    for n in nodes.values():
        n.join()
        assert_exact(n, repo_image)
    b = nodes["b"].ctx.stats
    assert b.dropped == [] and b.repo_bytes == 0 and nodes["a"].double.bad.requests > 3

    refused = cluster(["p", "q"], 2, 1, bad={"p": Misbehaviour(not_ready=10**6,
                                                                not_ready_status=401)})
    for n in refused.values():
        n.start()
    for n in refused.values():
        n.join()
        assert_exact(n, repo_image)
    assert [d.split(":")[0] for d in refused["q"].ctx.stats.dropped] == ["p"]  # not retried


def test_cancel_stops_a_node_waiting_on_a_stalled_parent(
        cluster: Callable[..., dict[str, Node]], repo_image: RepoImage) -> None:
    nodes = cluster(["a", "b"], 2, 1, bad={"a": Misbehaviour(stall_after=1)})
    nodes["a"].start()
    nodes["a"].join()
    b = nodes["b"]
    arrived = threading.Event()
    cast(WatchedPartial, b.ctx.partial).on_put.append(lambda _i: arrived.set())
    b.start()
    assert arrived.wait(WAIT)
    b.ctx.cancel.set()
    with pytest.raises(TransferAborted):
        b.join()  # without cancel it would wait 30 s, then finish from the repository
    assert not b.ctx.partial.complete and b.ctx.stats.dropped == []


def test_malformed_plan_is_refused(cluster: Callable[..., dict[str, Node]]) -> None:
    nodes = cluster(["a"], 2, 1)
    ctx = nodes["a"].ctx
    ctx.plan = {"stripes": 2, "unit": 1, "of": 2, "trees": ctx.plan["trees"]}
    with pytest.raises(InvalidRequest):
        tree.NODE.fetch(ctx)
