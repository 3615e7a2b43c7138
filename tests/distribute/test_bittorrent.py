"""The BitTorrent method with the real libtorrent, every peer on its own loopback address.

The repository side runs in this process: a Repository with one pushed
image, the coordinator's seeder, and a uvicorn server with the tracker route
(rain.api.tracker) and a stand-in for the repository's file endpoint (Range
reads; a bearer token or, as libtorrent's web seed sends it, `access_token`).
Each node is a NodeSession of its own on 127.0.0.x, so per-address bans and
the tracker's view of who is where work as they do between machines.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

lt = pytest.importorskip("libtorrent")

import http.client  # noqa: E402

import uvicorn  # noqa: E402
from fastapi import FastAPI, Request, Response  # noqa: E402

from rain.api import tracker as tracker_api  # noqa: E402
from rain.distribute.methods.base import (  # noqa: E402
    DeploymentJob,
    FetchContext,
    NodeTarget,
    RepoSide,
)
from rain.distribute.methods.bittorrent.config import BitTorrentConfig  # noqa: E402
from rain.distribute.methods.bittorrent.method import (  # noqa: E402
    BitTorrentCoordinator,
    BitTorrentNode,
)
from rain.distribute.methods.bittorrent.node import NodeSession  # noqa: E402
from rain.distribute.methods.bittorrent.seeder import RepoSeeder  # noqa: E402
from rain.distribute.methods.bittorrent.session import Session, settings_pack  # noqa: E402
from rain.distribute.methods.bittorrent.torrent import (  # noqa: E402
    bdecode,
    ensure_torrent,
    make_torrent,
    piece_size_for,
    torrent_on_activate,
    zero_pieces,
)
from rain.distribute.methods.bittorrent.tracker import TrackerRegistry, compact  # noqa: E402
from rain.distribute.methods.bittorrent.turns import UNLIMITED, Lane, Turns  # noqa: E402
from rain.distribute.partial import PartialImage, TransferAborted  # noqa: E402
from rain.distribute.source import RepoSource, TransferStats  # noqa: E402
from rain.model import DiskFormat, Image  # noqa: E402
from rain.model.deploy import DeployOptions  # noqa: E402
from rain.repo import Repository  # noqa: E402
from rain.repo.convert import materialize  # noqa: E402
from rain.store.manifest import ImageManifest  # noqa: E402

MiB = 1 << 20
CHUNK = 256 * 1024
PIECE = 4 * MiB
SIZE = 40 * MiB  # 10 pieces: 2 all zero, 8 of data (some with zero chunks inside)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def image_bytes(size: int = SIZE) -> bytes:
    out = bytearray()
    for i in range(size // CHUNK):
        if (i // 16) % 5 == 3 or i % 7 == 5:  # whole zero pieces, and zero chunks in data
            out += bytes(CHUNK)
        else:
            out += hashlib.sha256(b"bt" + i.to_bytes(4, "big")).digest() * (CHUNK // 32)
    return bytes(out)


@dataclass
class FileEndpoint:
    """The repository's `GET /v1/images/{id}/file` as far as nodes use it."""

    files: dict[str, Path] = field(default_factory=dict)
    tokens: set[str] = field(default_factory=set)
    sent: dict[str, int] = field(default_factory=dict)  # "webseed" / "http" → bytes

    def route(self, app: FastAPI) -> None:
        @app.get("/v1/images/{image_id}/file")
        def file(image_id: str, request: Request) -> Response:
            auth = request.headers.get("authorization", "")
            token = request.query_params.get("access_token") or auth.removeprefix("Bearer ")
            if token not in self.tokens:
                return Response(status_code=401)
            path = self.files[image_id]
            size = path.stat().st_size
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("range", ""))
            if m is None:
                return Response(status_code=400)
            start = int(m.group(1))
            end = min(int(m.group(2)) + 1 if m.group(2) else size, size)
            with path.open("rb") as f:
                f.seek(start)
                data = f.read(end - start)
            how = "webseed" if "access_token" in request.query_params else "http"
            self.sent[how] = self.sent.get(how, 0) + len(data)
            return Response(data, status_code=206, headers={
                "Content-Range": f"bytes {start}-{end - 1}/{size}", "Accept-Ranges": "bytes"})


@dataclass
class World:
    repo: Repository
    token: str
    image: Image
    data: bytes
    manifest: ImageManifest
    manifest_id: str
    seed_file: Path
    side: RepoSide
    files: FileEndpoint
    url: str
    tmp: Path
    jobs: int = 0

    def job(self, hosts: list[str], **options: Any) -> DeploymentJob:
        self.jobs += 1
        token = f"peer-token-{self.jobs}"
        self.files.tokens.add(token)
        return DeploymentJob(
            id=f"dep-{self.jobs}", image=self.image, manifest=self.manifest,
            manifest_id=self.manifest_id,
            nodes=[NodeTarget(f"n{k}", f"http://{h}:7000", "key") for k, h in enumerate(hosts)],
            peer_token=token, options=DeployOptions.from_json(options),
            seed_file=lambda: self.seed_file,
            workdir=self.tmp / "work", server=self.side)

    def ctx(self, job: DeploymentJob, k: int, plan: dict[str, Any], host: str,
            **options: Any) -> FetchContext:
        d = self.tmp / job.id / f"n{k}"
        d.mkdir(parents=True, exist_ok=True)
        return FetchContext(
            node=f"n{k}", image_id=self.image.id, sha256=self.manifest.sha256,
            disk_format=DiskFormat.RAW, manifest=self.manifest,
            partial=PartialImage(d / f"{self.image.id}.part", self.manifest),
            repo=RepoSource(self.url, self.token, deployment=job.id), plan=plan,
            stats=TransferStats(), cancel=threading.Event(), workdir=d,
            peer_token=job.peer_token, host=host,
            options=DeployOptions.from_json({**job.options.to_json(), **options}),
            log=lambda m, k=k: print(f"[n{k}] {m}"))

    @property
    def seeder(self) -> RepoSeeder:
        seeder: RepoSeeder = self.side.services["bittorrent"]
        return seeder

    @property
    def tracker(self) -> TrackerRegistry:
        registry: TrackerRegistry = self.side.services["bittorrent-tracker"]
        return registry


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("bt")
    repo = Repository.open(tmp / "data", f"sqlite:///{tmp / 'catalog.db'}")
    user, token = repo.local_create_user("alice")
    data = image_bytes()
    (tmp / "image.raw").write_bytes(data)
    image = repo.upload_file(user, repo.create(user, {"name": "bt"}).id, tmp / "image.raw")
    manifest_id = repo.catalog.manifest_id(image.id)
    assert manifest_id
    manifest = repo.store.get_manifest(manifest_id)
    seed_file = tmp / "seed.raw"
    materialize(repo.store, manifest, seed_file, image.id)
    cfg = BitTorrentConfig(seeder_port=free_port(), view_port=0, rescue_after=1.0,
                           web_seed_after=2.0)
    side = RepoSide(repo, SimpleNamespace(bittorrent=cfg), "127.0.0.1", 0, tmp / "side")
    files = FileEndpoint({image.id: seed_file}, {token})
    app = FastAPI()
    app.state.distribution = side
    app.include_router(tracker_api.router)
    files.route(app)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    w = World(repo, token, image, data, manifest, manifest_id, seed_file, side, files,
              f"http://127.0.0.1:{port}", tmp)
    try:
        yield w
    finally:
        server.should_exit = True
        thread.join(5)
        if "bittorrent" in side.services:
            w.seeder.close()
        repo.close()


@pytest.fixture
def sessions() -> Iterator[Callable[[str], NodeSession]]:
    made: list[NodeSession] = []

    def make(host: str) -> NodeSession:
        s = NodeSession(host, free_port(host))
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def run_nodes(fetches: list[Callable[[], None]], timeout: float = 60) -> dict[int, BaseException]:
    errors: dict[int, BaseException] = {}

    def run(k: int) -> None:
        try:
            fetches[k]()
        except BaseException as exc:
            errors[k] = exc

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(fetches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a node's transfer hung"
    return errors


def data_piece_bytes(w: World) -> int:
    return sum(PIECE for z in zero_pieces(w.manifest, PIECE) if not z)


# -- the torrent ---------------------------------------------------------------------------
def test_torrent_is_private_v1_with_big_pieces_and_a_stable_info_hash(world: World) -> None:
    reader = world.repo.chunk_reader(world.manifest, world.image.id)
    data, info_hash = make_torrent(reader, world.image.id)
    again, same = make_torrent(reader, world.image.id)
    assert (again, same) == (data, info_hash)
    ti = lt.torrent_info(data)
    assert ti.priv()
    assert ti.piece_length() >= 4 * MiB
    assert ti.num_files() == 1 and ti.total_size() == len(world.data)
    assert str(ti.info_hashes().v1) == info_hash
    meta = bdecode(data)  # announce URLs come per deployment, not in the torrent
    assert b"announce" not in meta and b"announce-list" not in meta
    for p in range(ti.num_pieces()):
        piece = world.data[p * ti.piece_length() : (p + 1) * ti.piece_length()]
        assert ti.hash_for_piece(p) == hashlib.sha1(piece).digest(), f"piece {p}"
    assert zero_pieces(world.manifest, ti.piece_length()).count(True) == 2


def test_activation_hook_stores_the_torrent_once_per_content(world: World,
                                                             tmp_path: Path) -> None:
    user, _ = world.repo.local_create_user("hooked")
    hook = torrent_on_activate(world.repo)
    world.repo.activation_hooks.append(hook)
    try:
        (tmp_path / "small.raw").write_bytes(image_bytes(6 * MiB))
        image = world.repo.upload_file(user, world.repo.create(user, {"name": "h"}).id,
                                       tmp_path / "small.raw")
    finally:
        world.repo.activation_hooks.remove(hook)
    hook.join(30)
    _, info_hash, piece, data = world.repo.torrent_for(user, image.id)
    assert piece == 4 * MiB
    assert str(lt.torrent_info(data).info_hashes().v1) == info_hash
    # a deployment finds it made, not made again
    assert ensure_torrent(world.repo, image) == (info_hash, piece, data)


def test_piece_size_keeps_torrents_small() -> None:
    assert piece_size_for(10 * MiB) == 4 * MiB
    assert piece_size_for(64 << 30) == 4 * MiB  # 16384 pieces: the most there may be
    assert piece_size_for((64 << 30) + 1) == 8 * MiB
    assert piece_size_for(1 << 40) == 64 * MiB
    assert piece_size_for(10 * MiB, BitTorrentConfig(piece_size=1 * MiB)) == 4 * MiB


def test_sessions_keep_shallow_send_buffers() -> None:
    # Deep per-connection buffers delayed a node's requests behind its uploads
    # (docs/bittorrent.md, "Shallow send buffers"): the config must reach libtorrent.
    cfg = BitTorrentConfig(send_socket_buffer=48 * 1024, send_buffer=128 * 1024)
    for seeder in (False, True):
        session = Session(settings_pack(cfg, "127.0.0.1", 0, seeder=seeder), "buffers")
        try:
            got = session.lt.get_settings()
            assert got["send_socket_buffer_size"] == 48 * 1024
            assert got["send_buffer_watermark"] == 128 * 1024
            assert got["send_buffer_low_watermark"] == 32 * 1024
        finally:
            session.close()
    assert BitTorrentConfig().send_socket_buffer == 64 * 1024


# -- the tracker, over HTTP ------------------------------------------------------------------
def announce(url: str, token: str, info_hash: bytes, peer_id: bytes, port: int,
             left: int = 100, event: str = "") -> dict[bytes, Any]:
    from urllib.parse import quote_from_bytes, urlsplit

    parts = urlsplit(url)
    query = (f"info_hash={quote_from_bytes(info_hash)}&peer_id={quote_from_bytes(peer_id)}"
             f"&port={port}&uploaded=0&downloaded=0&left={left}&compact=1"
             + (f"&event={event}" if event else ""))
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", f"/v1/tracker/{token}/announce?{query}")
        resp = conn.getresponse()
        assert resp.status == 200
        reply: dict[bytes, Any] = bdecode(resp.read())
        return reply
    finally:
        conn.close()


def test_tracker_lists_only_the_deployments_peers(world: World) -> None:
    registry = TrackerRegistry(interval=15)
    world.side.services.setdefault("bittorrent-tracker", registry)
    registry = world.tracker
    ih, other = hashlib.sha1(b"a").digest(), hashlib.sha1(b"b").digest()
    registry.register("tok-a", "job-a", ih.hex(), 6999, "127.0.0.1", {"127.0.0.1"})
    registry.register("tok-b", "job-b", other.hex(), 0, "", set())
    try:
        first = announce(world.url, "tok-a", ih, b"A" * 20, 7001)
        assert first[b"peers"] == compact([("127.0.0.1", 6999)], 4)  # the seeder only
        second = announce(world.url, "tok-a", ih, b"B" * 20, 7002)
        assert second[b"peers"] == compact([("127.0.0.1", 6999), ("127.0.0.1", 7001)], 4)
        assert second[b"interval"] == 15
        # another deployment's swarm is not listed, and its token is not this torrent's
        assert announce(world.url, "tok-b", other, b"C" * 20, 7003)[b"peers"] == b""
        assert b"failure reason" in announce(world.url, "tok-b", ih, b"C" * 20, 7003)
        assert b"failure reason" in announce(world.url, "nope", ih, b"D" * 20, 7004)
        announce(world.url, "tok-a", ih, b"A" * 20, 7001, event="stopped")
        third = announce(world.url, "tok-a", ih, b"E" * 20, 7005)
        assert third[b"peers"] == compact([("127.0.0.1", 6999), ("127.0.0.1", 7002)], 4)
    finally:
        registry.unregister("tok-a")
        registry.unregister("tok-b")
    assert b"failure reason" in announce(world.url, "tok-a", ih, b"A" * 20, 7001)


# -- turns -----------------------------------------------------------------------------------
@dataclass
class FakeView:
    """A view on a link of `rate` bytes/s shared by the views that are not limited."""

    stripe: int
    sent: int = 0
    rate: int = -1  # the limit the schedule set
    connected: bool = True

    def limit(self, rate: int) -> None:
        self.rate = rate


def run_turns(views: list[FakeView], piece: int, link: int, *, active: int = 1,
              seconds: float = 60.0, tick: float = 0.1) -> tuple[Turns, list[list[int]]]:
    turns = Turns([Lane(limit=v.limit, stripe_bytes=v.stripe) for v in views], piece,
                  active=active, trickle=link // 100)
    history = []
    now = 0.0
    while now < seconds and not turns.finished:
        turns.tick(now, [(v.sent, v.connected) for v in views])
        history.append(turns.running())
        sending = [v for v in views if v.connected and v.sent < v.stripe]
        free = [v for v in sending if v.rate == UNLIMITED]
        budget = link * tick
        for v in sending:
            if v.rate != UNLIMITED:
                got = min(v.rate * tick, v.stripe - v.sent)
                v.sent += int(got)
                budget -= got
        for v in free:
            v.sent += int(min(budget / len(free), v.stripe - v.sent))
        now += tick
    return turns, history


def test_turns_send_one_piece_at_a_time_in_stripe_order() -> None:
    piece, link = 4 * MiB, 8 * MiB  # half a second per piece
    views = [FakeView(stripe=3 * piece) for _ in range(4)]
    turns, history = run_turns(views, piece, link)
    assert turns.finished and all(v.sent == v.stripe for v in views)
    assert all(len(r) <= 1 for r in history)
    order = [r[0] for r, before in zip(history[1:], history, strict=False)
             if r and r != before]
    assert order[:8] == [1, 2, 3, 0, 1, 2, 3, 0]  # view 0 began at the first tick
    assert history[0] == [0]
    assert all(v.rate == UNLIMITED for v in views)  # done: no limit left


def test_turns_skip_a_view_whose_node_is_gone_and_allow_several_at_once() -> None:
    piece, link = 4 * MiB, 8 * MiB
    views = [FakeView(stripe=2 * piece) for _ in range(4)]
    views[1].connected = False
    turns, history = run_turns(views, piece, link, active=2, seconds=10)
    assert not turns.finished  # view 1 never sends
    assert all(1 not in r for r in history)
    assert max(len(r) for r in history) == 2
    assert [v.sent == v.stripe for v in views] == [True, False, True, True]


# -- swarms ----------------------------------------------------------------------------------
def test_swarm_every_node_gets_the_image_and_seeds_it_on(
        world: World, sessions: Callable[[str], NodeSession]) -> None:
    hosts = ["127.0.0.21", "127.0.0.22", "127.0.0.23"]
    job = world.job(hosts)
    coordinator = BitTorrentCoordinator()
    try:
        plans = coordinator.prepare(job)
        assert len({p["seeder"]["view"] for p in plans.values()}) == 3  # a stripe each
        nodes = [BitTorrentNode(sessions(h)) for h in hosts]
        ctxs = [world.ctx(job, k, plans[f"n{k}"], h) for k, h in enumerate(hosts)]
        errors = run_nodes([lambda k=k: nodes[k].fetch(ctxs[k]) for k in range(3)])
        assert not errors
        for ctx in ctxs:
            assert ctx.partial.complete
            assert ctx.partial.path.read_bytes() == world.data
            assert ctx.stats.bad_chunks == 0 and not ctx.stats.dropped
            # the data pieces moved (and a few end-game duplicate blocks), zero pieces not
            got = ctx.stats.repo_bytes + ctx.stats.peer_bytes
            assert data_piece_bytes(world) <= got < data_piece_bytes(world) + PIECE
        assert max(c.stats.peer_bytes for c in ctxs) > 0  # nodes re-seed to each other
        for node in nodes:  # no encryption asked for: none used
            held = node._session.held(world.image.id)  # type: ignore[union-attr]
            assert held is not None
            assert not any(p.flags & lt.peer_info.rc4_encrypted
                           for p in held.handle.get_peer_info())
        assert sum(c.stats.sent_bytes for c in ctxs) > 0
        # each stripe left the repository once
        assert coordinator.repo_bytes(job) < data_piece_bytes(world) + PIECE

        # The nodes' copies go into their caches; they seed from there: a late node with
        # no repository seed at all gets everything from them.
        for k, ctx in enumerate(ctxs):
            cached = world.tmp / job.id / f"cache{k}.raw"
            ctx.partial.close()
            shutil.move(ctx.partial.path, cached)
            nodes[k].cached(ctx, cached)
        late_plan = dict(plans["n0"], seeder={"host": "", "port": 0, "view": 0})
        # (on node 0's address: the others let in only the deployment's addresses)
        late = world.ctx(job, 3, late_plan, hosts[0], web_seed="never")
        BitTorrentNode(sessions(hosts[0])).fetch(late)
        assert late.partial.path.read_bytes() == world.data
        assert late.stats.repo_bytes == 0 and late.stats.peer_bytes > 0
        for node in nodes:
            node.release(world.image.id)
            assert node._session.held(world.image.id) is None  # type: ignore[union-attr]
    finally:
        coordinator.finish(job)
    assert world.tracker.peers(job.peer_token) == []


def test_views_in_turns_and_the_tail_seed_still_deliver_everything(
        world: World, sessions: Callable[[str], NodeSession]) -> None:
    """With turns (two views at a time, the others trickling) and the tail seed (the full
    seed dials the nodes once every stripe is sent) the swarm completes as before and the
    repository stays within twice the image."""
    cfg = world.side.config.bittorrent
    saved = (cfg.view_turns, cfg.tail_seed)
    cfg.view_turns, cfg.tail_seed = 2, True
    hosts = ["127.0.0.41", "127.0.0.42", "127.0.0.43", "127.0.0.44"]
    job = world.job(hosts)
    coordinator = BitTorrentCoordinator()
    try:
        plans = coordinator.prepare(job)
        paced = next(iter(world.seeder._turns.values()))
        nodes = [BitTorrentNode(sessions(h)) for h in hosts]
        ctxs = [world.ctx(job, k, plans[f"n{k}"], h) for k, h in enumerate(hosts)]
        errors = run_nodes([partial(node.fetch, ctx) for node, ctx in zip(nodes, ctxs,
                                                                          strict=True)])
        assert not errors
        for ctx in ctxs:
            assert ctx.partial.path.read_bytes() == world.data
            assert ctx.stats.bad_chunks == 0 and not ctx.stats.dropped
        deadline = time.monotonic() + 5
        while not paced.ended and time.monotonic() < deadline:
            time.sleep(0.05)
        assert paced.ended  # every stripe sent (here within a turn or two: loopback)
        assert coordinator.repo_bytes(job) <= 2 * data_piece_bytes(world)
    finally:
        cfg.view_turns, cfg.tail_seed = saved
        coordinator.finish(job)
    assert not world.seeder._turns  # dropped with the job's torrents


def corrupt_copy(world: World, path: Path) -> Path:
    data = bytearray(world.data)
    for p, zero in enumerate(zero_pieces(world.manifest, PIECE)):
        if not zero:
            at = p * PIECE + PIECE // 2
            data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def test_a_corrupt_seed_is_banned_and_the_node_recovers_elsewhere(
        world: World, sessions: Callable[[str], NodeSession], tmp_path: Path) -> None:
    """The node's only BitTorrent source sends a bad byte in every piece (it trusts its
    file: resume data, not seed mode, so it never checks): libtorrent bans it, the node
    stalls and takes the repository's web seed, and every byte ends up right."""
    _, _, torrent = ensure_torrent(world.repo, world.image)
    bad = sessions("127.0.0.31")
    bad_file = corrupt_copy(world, tmp_path / "bad.raw")
    pieces = lt.torrent_info(torrent).num_pieces()
    bad.add(world.image.id, torrent, "", bad_file, trackers=[], have=[True] * pieces,
            encrypt=False, allowed={"127.0.0.32"})
    job = world.job(["127.0.0.32"])
    coordinator = BitTorrentCoordinator()
    try:
        plan = dict(coordinator.prepare(job)["n0"], tracker="")
        plan["seeder"] = {"host": "127.0.0.31", "port": bad.listen_port, "view": 0}
        before = world.files.sent.get("webseed", 0)
        ctx = world.ctx(job, 0, plan, "127.0.0.32", stall_seconds=30)
        BitTorrentNode(sessions("127.0.0.32")).fetch(ctx)
    finally:
        coordinator.finish(job)
    assert ctx.partial.complete and ctx.partial.path.read_bytes() == world.data
    assert ctx.stats.bad_chunks > 0
    assert any(d.startswith(f"127.0.0.31:{bad.listen_port}") for d in ctx.stats.dropped)
    assert world.files.sent.get("webseed", 0) > before  # recovered from the repository
    assert ctx.stats.repo_bytes > 0


def test_a_stalled_swarm_falls_back_to_the_repository(
        world: World, sessions: Callable[[str], NodeSession]) -> None:
    job = world.job(["127.0.0.41"])
    coordinator = BitTorrentCoordinator()
    try:
        plan = dict(coordinator.prepare(job)["n0"], tracker="")
        plan["seeder"] = {"host": "127.0.0.1", "port": free_port(), "view": 0}  # nobody
        ctx = world.ctx(job, 0, plan, "127.0.0.41", stall_seconds=1, web_seed="never")
        before = world.files.sent.get("http", 0)
        BitTorrentNode(sessions("127.0.0.41")).fetch(ctx)
    finally:
        coordinator.finish(job)
    assert ctx.partial.path.read_bytes() == world.data
    assert any(d.startswith("swarm: no progress") for d in ctx.stats.dropped)
    assert world.files.sent.get("http", 0) - before == ctx.partial.data_bytes()


def test_a_node_that_dies_midway_does_not_stop_the_others(
        world: World, sessions: Callable[[str], NodeSession]) -> None:
    """Node 0 disappears with its stripe half fetched: the others wait for its pieces,
    then take them from the repository's full seed (rescue), and finish."""
    hosts = ["127.0.0.51", "127.0.0.52", "127.0.0.53"]
    job = world.job(hosts, web_seed="never")
    coordinator = BitTorrentCoordinator()
    try:
        plans = coordinator.prepare(job)
        for view in world.seeder.views:  # slow stripes, so that node 0 dies mid-way
            view.limit_rates(4 * MiB, 0)
        node_sessions = [sessions(h) for h in hosts]
        logs: list[str] = []
        ctxs = [world.ctx(job, k, plans[f"n{k}"], h) for k, h in enumerate(hosts)]
        for ctx in ctxs:
            ctx.log = logs.append

        def kill_node0() -> None:
            ctx = ctxs[0]
            while ctx.stats.repo_bytes < PIECE and not ctx.partial.complete:
                time.sleep(0.05)
            ctx.cancel.set()
            node_sessions[0].close()

        def node0() -> None:
            threading.Thread(target=kill_node0, daemon=True).start()
            BitTorrentNode(node_sessions[0]).fetch(ctxs[0])

        fetches = [node0] + [lambda k=k: BitTorrentNode(node_sessions[k]).fetch(ctxs[k])
                             for k in (1, 2)]
        errors = run_nodes(fetches)
    finally:
        for view in world.seeder.views:
            view.limit_rates(0, 0)
        coordinator.finish(job)
    assert set(errors) == {0} and isinstance(errors[0], TransferAborted)
    assert not ctxs[0].partial.complete
    for ctx in ctxs[1:]:
        assert ctx.partial.path.read_bytes() == world.data
    assert any("asking the full seed" in line for line in logs)


def test_encrypted_swarm_completes_with_rc4_connections(
        world: World, sessions: Callable[[str], NodeSession]) -> None:
    hosts = ["127.0.0.61", "127.0.0.62"]
    job = world.job(hosts, encrypt=True)
    coordinator = BitTorrentCoordinator()
    try:
        plans = coordinator.prepare(job)
        assert all(p["encrypt"] for p in plans.values())
        node_sessions = [sessions(h) for h in hosts]
        ctxs = [world.ctx(job, k, plans[f"n{k}"], h) for k, h in enumerate(hosts)]
        errors = run_nodes([lambda k=k: BitTorrentNode(node_sessions[k]).fetch(ctxs[k])
                            for k in range(2)])
        assert not errors
        for k, ctx in enumerate(ctxs):
            assert ctx.partial.path.read_bytes() == world.data
            held = node_sessions[k].held(world.image.id)
            assert held is not None
            setting_up = lt.peer_info.connecting | lt.peer_info.handshake
            peers = [p for p in held.handle.get_peer_info() if not p.flags & setting_up]
            assert peers and all(p.flags & lt.peer_info.rc4_encrypted for p in peers)
    finally:
        coordinator.finish(job)
