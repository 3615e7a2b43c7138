"""The `chunks` method and the ChunkIndex: a derived image over a cached base moves only
its new chunks; damaged cache chunks and lying peers are caught. Peers are test doubles
of the node agent's `GET /v1/peer/chunks/{hex}` (stdlib HTTP servers over a ChunkIndex)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast
from unittest.mock import ANY

import pytest

from rain.agent.cache import NodeCache
from rain.agent.chunkindex import ChunkIndex
from rain.distribute.methods.base import DeploymentJob, FetchContext, NodeTarget
from rain.distribute.methods.chunks import method as chunks
from rain.distribute.partial import PartialImage, TransferAborted
from rain.distribute.source import RepoSource, TransferStats
from rain.model import DiskFormat, NodeState
from rain.model.deploy import DeployOptions
from rain.store.manifest import ZERO_DIGEST, ImageManifest
from tests.conftest import Server, free_port
from tests.distribute.conftest import CHUNK, MiB, manifest_of_file

PEER_TOKEN = "peer-token-for-tests"
GiB = 1 << 30


# -- a base image and a derived one, in the repository ----------------------------------
@dataclass
class Pushed:
    id: str
    path: Path
    manifest: ImageManifest


@dataclass
class Images:
    base: Pushed
    derived: Pushed
    url: str
    token: str

    def new_digests(self) -> set[bytes]:
        return self.derived.manifest.unique_digests() - self.base.manifest.unique_digests()

    def changed_bytes(self) -> int:
        """Bytes of the derived image's chunks that the base does not have."""
        m, new = self.derived.manifest, self.new_digests()
        return sum(m.chunk_length(i) for i, d in enumerate(m.chunks) if d in new)

    def unique_new_bytes(self) -> int:
        m, seen, total = self.derived.manifest, set(), 0
        for i, d in enumerate(m.chunks):
            if d in self.new_digests() and d not in seen:
                seen.add(d)
                total += m.chunk_length(i)
        return total


def base_bytes(size: int = 32 * MiB) -> bytearray:
    out = bytearray()
    for i in range(size // CHUNK):
        out += bytes(CHUNK) if i % 9 == 4 else \
            hashlib.sha256(b"base-%d" % i).digest() * (CHUNK // 32)
    return out


@pytest.fixture(scope="module")
def images(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Images:
    from rain.client import Client

    d = tmp_path_factory.mktemp("chunk-images")
    base = base_bytes()
    derived = bytearray(base)
    derived[4 * MiB + 100_000 : 5 * MiB + 100_000] = b"\x5a" * MiB  # unaligned: 5 chunks
    fresh = hashlib.sha256(b"new").digest() * (CHUNK // 32)
    derived[20 * MiB : 20 * MiB + 3 * CHUNK] = fresh * 3  # one new chunk, three times
    derived[30 * MiB + 7 : 30 * MiB + 17] = b"0123456789"  # a small edit
    derived += b"tail" * 1000  # and a short last chunk
    paths = {"base": d / "base.raw", "derived": d / "derived.raw"}
    paths["base"].write_bytes(bytes(base))
    paths["derived"].write_bytes(bytes(derived))
    pushed = {}
    with Client(server.url, server.token) as c:
        for name, path in paths.items():
            info = c.push(path, name=f"chunks-{name}", disk_format="raw")
            m = manifest_of_file(path)
            assert info["sha256"] == m.sha256
            pushed[name] = Pushed(info["id"], path, m)
    return Images(pushed["base"], pushed["derived"], server.url, server.token)


def cache_with(root: Path, *items: Pushed) -> NodeCache:
    cache = NodeCache(root, 4 * GiB)
    for item in items:
        cache.add(item.id, item.path, DiskFormat.RAW, item.manifest.sha256,
                  manifest=item.manifest)
    return cache


# -- a test double of a node agent's chunk endpoint ---------------------------------------
class ChunkPeerDouble:
    """Serves `GET /v1/peer/chunks/{hex}` from a ChunkIndex (404 when absent); `lie` sends
    every chunk with one byte flipped."""

    def __init__(self, index: ChunkIndex, *, lie: bool = False, refuse: int = 0) -> None:
        self.index = index
        self.lie = lie
        self.refuse = refuse  # answer 403 (token not known yet) to this many requests first
        self.served = 0
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: object) -> None:
                pass

            def do_GET(self) -> None:
                double.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        prefix = "/v1/peer/chunks/"
        if h.headers.get("Authorization") != f"Bearer {PEER_TOKEN}":
            self._send(h, 401, b"{}")
            return
        if self.refuse > 0:
            self.refuse -= 1
            self._send(h, 403, b'{"error": {"code": "forbidden", "message": "unknown token"}}')
            return
        data = self.index.read(bytes.fromhex(h.path[len(prefix):])) \
            if h.path.startswith(prefix) else None
        if data is None:
            self._send(h, 404, b'{"error": {"code": "not_found", "message": "no"}}')
            return
        if self.lie:
            data = data[:-1] + bytes([data[-1] ^ 1])
        self.served += len(data)
        self._send(h, 200, data)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def doubles() -> Iterator[Callable[..., ChunkPeerDouble]]:
    made: list[ChunkPeerDouble] = []

    def make(index: ChunkIndex, **kw: Any) -> ChunkPeerDouble:
        made.append(ChunkPeerDouble(index, **kw))
        return made[-1]

    yield make
    for d in made:
        d.stop()


def context(images: Images, tmp_path: Path, node: str, plan: dict[str, Any],
            local: ChunkIndex | None, partial: PartialImage | None = None) -> FetchContext:
    m = images.derived.manifest
    return FetchContext(
        node=node, image_id=images.derived.id, sha256=m.sha256, disk_format=DiskFormat.RAW,
        manifest=m, partial=partial or PartialImage(tmp_path / f"{node}.partial", m),
        repo=RepoSource(images.url, images.token, deployment="d-chunks"), plan=plan,
        stats=TransferStats(), cancel=threading.Event(), workdir=tmp_path,
        peer_token=PEER_TOKEN, local=local, log=lambda _m: None)


def solo_plan(node: str, holders: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    return {"partners": [{"name": node, "url": "http://127.0.0.1:9"}],
            "holders": [{"name": n, "url": u} for n, u in holders]}


def finish(ctx: FetchContext, images: Images) -> None:
    try:
        assert ctx.partial.complete
        assert ctx.partial.path.read_bytes() == images.derived.path.read_bytes()
    finally:
        ctx.repo.close()
        ctx.partial.close()


def data_bytes(m: ImageManifest) -> int:
    return sum(m.chunk_length(i) for i, d in enumerate(m.chunks) if d != ZERO_DIGEST)


# -- the node side -------------------------------------------------------------------------
def test_derived_over_a_cached_base_moves_only_the_difference(images: Images,
                                                              tmp_path: Path) -> None:
    index = ChunkIndex(cache_with(tmp_path / "cache", images.base))
    ctx = context(images, tmp_path, "n1", solo_plan("n1"), index)
    chunks.NODE.fetch(ctx)
    finish(ctx, images)
    s = ctx.stats
    changed = images.changed_bytes()
    assert 0 < changed < data_bytes(images.derived.manifest) // 4
    assert s.repo_bytes == images.unique_new_bytes() <= 1.2 * changed
    assert s.repo_bytes < changed  # the thrice-repeated new chunk moved once
    assert s.local_bytes == data_bytes(images.derived.manifest) - s.repo_bytes
    assert s.peer_bytes == 0 and s.bad_chunks == 0 and s.dropped == []


def test_without_a_base_everything_comes_once(images: Images, tmp_path: Path) -> None:
    ctx = context(images, tmp_path, "n1", solo_plan("n1"), ChunkIndex(None))
    chunks.NODE.fetch(ctx)
    finish(ctx, images)
    m = images.derived.manifest
    unique = sum(m.chunk_length(m.chunks.index(d)) for d in m.unique_digests())
    assert ctx.stats.repo_bytes == unique < data_bytes(m)


def test_a_damaged_cached_chunk_is_caught_and_fetched_elsewhere(images: Images,
                                                                tmp_path: Path) -> None:
    cache = cache_with(tmp_path / "cache", images.base)
    index = ChunkIndex(cache)
    m = images.derived.manifest
    victim = next(i for i, d in enumerate(m.chunks) if d in images.base.manifest.chunks
                  and d != ZERO_DIGEST and i > 10)
    path = cache.get(images.base.id)
    assert path is not None
    offset = images.base.manifest.chunks.index(m.chunks[victim]) * CHUNK + 1234
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))
    ctx = context(images, tmp_path, "n1", solo_plan("n1"), index)
    chunks.NODE.fetch(ctx)
    finish(ctx, images)
    assert ctx.stats.bad_chunks == 1
    assert ctx.stats.repo_bytes == images.unique_new_bytes() + m.chunk_length(victim)
    assert index.damaged == {images.base.id}
    # The index no longer offers the damaged copy, to this node or to its peers: only the
    # good one in the transfer, until that is withdrawn.
    assert index.find(m.chunks[victim]) == (ctx.partial.path, victim * CHUNK)
    chunks.NODE.release(images.derived.id)
    assert index.find(m.chunks[victim]) is None and index.read(m.chunks[victim]) is None


def test_holders_serve_and_a_lying_one_is_dropped(
        images: Images, tmp_path: Path, doubles: Callable[..., ChunkPeerDouble]) -> None:
    holder_index = ChunkIndex(cache_with(tmp_path / "holder", images.derived))
    liar = doubles(holder_index, lie=True)
    honest = doubles(holder_index)
    index = ChunkIndex(cache_with(tmp_path / "cache", images.base))
    ctx = context(images, tmp_path, "n1",
                  solo_plan("n1", [("liar", liar.url), ("honest", honest.url)]), index)
    chunks.NODE.fetch(ctx)
    finish(ctx, images)
    s = ctx.stats
    assert s.bad_chunks == 1 and len(s.dropped) == 1 and s.dropped[0].startswith("liar:")
    assert s.repo_bytes == 0
    first = min(i for i, d in enumerate(images.derived.manifest.chunks)
                if d in images.new_digests())
    assert s.peer_bytes == images.unique_new_bytes() + \
        images.derived.manifest.chunk_length(first)  # the lie was one chunk
    assert honest.served == images.unique_new_bytes()


def test_deployment_nodes_share_new_chunks(
        images: Images, tmp_path: Path, doubles: Callable[..., ChunkPeerDouble]) -> None:
    """Three nodes with the base cached: each new chunk leaves the repository once in
    all, fetched by its owner and passed on from the owner's PartialImage in flight."""
    names = ["n1", "n2", "n3"]
    indexes = {n: ChunkIndex(cache_with(tmp_path / n, images.base)) for n in names}
    # n3 has not had its own request yet when the others first ask it (403): not a reason
    # to drop it.
    servers = {n: doubles(indexes[n], refuse=3 if n == "n3" else 0) for n in names}
    partners = [{"name": n, "url": servers[n].url} for n in names]
    ctxs = {}
    for n in names:
        plan = {"partners": partners, "holders": [], "owner_wait_seconds": 60}
        ctxs[n] = context(images, tmp_path, n, plan, indexes[n])
    errors: list[BaseException] = []

    def run(c: FetchContext) -> None:
        try:
            chunks.NODE.fetch(c)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in ctxs.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    some_new = next(iter(images.new_digests()))
    for n in names:
        # fetch offered the transfer through the node's index (what peers read from)
        assert indexes[n].find(some_new) == (ctxs[n].partial.path, ANY)
    chunks.NODE.release(images.derived.id)  # and release withdraws it
    for n, c in ctxs.items():
        assert indexes[n].find(some_new) is None
        finish(c, images)
        assert c.stats.dropped == []
    new = images.unique_new_bytes()
    owners = {d: chunks.owner_of(d, [chunks.Peer(p["name"], p["url"]) for p in partners]).name
              for d in images.new_digests()}
    assert len(set(owners.values())) > 1  # the shares really are spread
    assert sum(c.stats.repo_bytes for c in ctxs.values()) == new
    assert sum(c.stats.peer_bytes for c in ctxs.values()) == 2 * new
    assert servers["n3"].refuse == 0


def test_dead_partner_is_dropped_and_the_repository_fills_in(images: Images,
                                                              tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    plan = {"partners": [{"name": "n1", "url": "http://127.0.0.1:9"},
                         {"name": "gone", "url": dead}], "holders": []}
    index = ChunkIndex(cache_with(tmp_path / "cache", images.base))
    ctx = context(images, tmp_path, "n1", plan, index)
    chunks.NODE.fetch(ctx)
    finish(ctx, images)
    assert [d.split(":")[0] for d in ctx.stats.dropped] == ["gone"]
    assert ctx.stats.repo_bytes == images.unique_new_bytes()


def test_cancel(images: Images, tmp_path: Path) -> None:
    ctx = context(images, tmp_path, "n1", solo_plan("n1"), ChunkIndex(None))
    ctx.cancel.set()
    with pytest.raises(TransferAborted):
        chunks.NODE.fetch(ctx)
    assert not ctx.partial.complete
    ctx.repo.close()
    ctx.partial.close()


# -- real agents: a holder outside the deployment ------------------------------------------
@pytest.mark.integration
def test_a_holder_outside_the_deployment_serves_it_and_nothing_else(
        images: Images, server: Server, tmp_path: Path) -> None:
    """`hold` caches the derived image and is not in the deployment: the repository asks
    it to serve the deployment first, so the new chunks come from it (not one 403, not
    one byte from the repository). A peer token covers only its deployment's image."""
    import secrets

    import httpx

    from rain.client import Client
    from tests.distribute.conftest import start_agent, stop_agent

    agents = []
    try:
        hold = start_agent(server, "hold", tmp_path)
        agents.append(hold)
        agents.append(start_agent(server, "need", tmp_path))
        with Client(server.url, server.token) as c:
            for image, node in ((images.derived.id, "hold"), (images.base.id, "hold"),
                                (images.base.id, "need")):
                done = c.follow_deployment(c.prefetch(image, nodes=[node], method="http")["id"],
                                           timeout=60)
                assert done["status"] == "ready", done
            dep = c.follow_deployment(c.deploy(images.derived.id, nodes=["need"], count=1,
                                               method="chunks")["id"], timeout=120)
        assert dep["status"] == "ready", dep
        need = dep["report"]["per_node"]["need"]
        assert need["dropped"] == [] and need["repo_bytes"] == 0
        assert need["peer_bytes"] == images.unique_new_bytes()

        # What a token lets its bearer read from `hold`: the granted image, nothing else.
        token = secrets.token_urlsafe(16)
        control = {"Authorization": f"Bearer {hold.key}"}
        peer = {"Authorization": f"Bearer {token}"}
        granted = httpx.post(f"{hold.url}/v1/grants", headers=control,
                             json={"peer_token": token, "image_id": images.base.id})
        assert granted.status_code == 200, granted.text
        new = next(iter(images.new_digests())).hex()  # in the derived image only
        shared = next(d for d in images.base.manifest.chunks if d != ZERO_DIGEST).hex()

        def chunk(digest: str) -> int:
            return httpx.get(f"{hold.url}/v1/peer/chunks/{digest}", headers=peer).status_code

        def stripe(image_id: str) -> int:
            with httpx.stream("GET", f"{hold.url}/v1/peer/images/{image_id}/chunks",
                              headers=peer) as r:
                return r.status_code

        assert (chunk(shared), chunk(new)) == (200, 404)
        assert (stripe(images.base.id), stripe(images.derived.id)) == (200, 403)
        # Only the agent key grants, and only images the node caches.
        assert httpx.post(f"{hold.url}/v1/grants", headers=peer, json={
            "peer_token": token, "image_id": images.derived.id}).status_code == 403
        assert httpx.post(f"{hold.url}/v1/grants", headers=control, json={
            "peer_token": token, "image_id": "0" * 32}).status_code == 404
        assert httpx.request("DELETE", f"{hold.url}/v1/grants", headers=control,
                             json={"peer_token": token}).json() == {"revoked": True}
        assert chunk(shared) == 403
    finally:
        for a in agents:
            stop_agent(a)


# -- the index -----------------------------------------------------------------------------
def test_index_follows_the_cache_and_transfers_in_flight(images: Images,
                                                         tmp_path: Path) -> None:
    cache = cache_with(tmp_path / "cache")
    now = [0.0]
    index = ChunkIndex(cache, refresh_seconds=5, clock=lambda: now[0])
    base_digest = next(iter(images.base.manifest.unique_digests()))
    assert index.find(base_digest) is None
    cache.add(images.base.id, images.base.path, DiskFormat.RAW, images.base.manifest.sha256,
              manifest=images.base.manifest)
    assert index.find(base_digest) is None  # not announced, not refreshed yet
    now[0] += 6
    assert index.read(base_digest) is not None  # picked up by the periodic refresh
    only_derived = next(iter(images.new_digests()))
    cache.add(images.derived.id, images.derived.path, DiskFormat.RAW,
              images.derived.manifest.sha256, manifest=images.derived.manifest)
    assert index.add_image(images.derived.id)
    found = index.find(only_derived)
    assert found is not None
    data = index.read(only_derived)
    assert data is not None and hashlib.sha256(data).digest() == only_derived
    path, offset = found
    assert path.read_bytes()[offset : offset + len(data)] == data
    # A digest both images have moves to the other one when one is evicted.
    shared = next(d for d in images.base.manifest.unique_digests()
                  if d in images.derived.manifest.chunks)
    holder = index.find(shared)
    assert holder is not None
    evicted = images.base.id if holder[0].name.startswith(images.base.id) else \
        images.derived.id
    cache.evict(evicted)
    index.remove_image(evicted)
    after = index.find(shared)
    assert after is not None and after[0] != holder[0]
    # The short last chunk is read at its own length.
    m = images.derived.manifest
    last = m.chunks[-1]
    if evicted != images.derived.id:
        got = index.read(last)
        assert got is not None and len(got) == m.chunk_length(len(m.chunks) - 1)

    # A transfer in flight offers what it has verified, and nothing else.
    other = ChunkIndex(None)
    with PartialImage(tmp_path / "p", images.base.manifest) as p:
        other.register("img", p)
        i = next(j for j, d in enumerate(images.base.manifest.chunks) if d != ZERO_DIGEST)
        digest = images.base.manifest.chunks[i]
        assert other.find(digest) is None
        p.put(i, images.base.path.read_bytes()[i * CHUNK : (i + 1) * CHUNK])
        assert other.find(digest) == (p.path, i * CHUNK)
        assert other.read(digest) == images.base.path.read_bytes()[i * CHUNK : (i + 1) * CHUNK]
        other.unregister("img")
        assert other.find(digest) is None


def test_index_across_a_transfer_becoming_a_cached_image(images: Images,
                                                         tmp_path: Path) -> None:
    """The agent renames a finished transfer into the cache before it tells the index:
    meanwhile lookups miss (never fail), and afterwards the cached image serves."""
    cache = cache_with(tmp_path / "cache")
    index = ChunkIndex(cache, clock=lambda: 0.0)  # no periodic refresh: only what it is told
    m = images.base.manifest
    data = images.base.path.read_bytes()
    p = PartialImage(cache.partial_path(images.base.id), m)
    index.register(images.base.id, p)
    for i in range(p.count):
        if not p.present(i):
            p.put(i, data[i * CHUNK : (i + 1) * CHUNK])
    digest = next(iter(m.unique_digests()))
    assert index.read(digest) is not None
    p.sync()
    cache.add(images.base.id, p.path, DiskFormat.RAW, m.sha256, move=True, manifest=m,
              verified=True)
    p.close()
    assert index.read(digest) is None  # the file moved; nothing wrong is served
    index.unregister(images.base.id)
    assert index.add_image(images.base.id)
    got = index.read(digest)
    assert got is not None and hashlib.sha256(got).digest() == digest
    assert index.damaged == set()


# -- the coordinator ------------------------------------------------------------------------
def test_coordinator_lists_holders_and_partners(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[list[str]] = []

    def authorise_double(job: DeploymentJob, names: Sequence[str]) -> list[tuple[str, str]]:
        """Test double of the grant round trip: h3 does not answer."""
        asked.append(list(names))
        return [(n, f"http://{n}:8481/") for n in names if n != "h3"]

    monkeypatch.setattr(chunks, "authorise_holders", authorise_double)
    states = [NodeState("h1", "http://10.0.0.9:8481", up=True, cached=frozenset({"img"})),
              NodeState("h2", "http://10.0.0.8:8481", up=True, cached=frozenset({"img"})),
              NodeState("h3", "http://10.0.0.5:8481", up=True, cached=frozenset({"img"})),
              NodeState("down", "http://10.0.0.7:8481", up=False, cached=frozenset({"img"})),
              NodeState("other", "http://10.0.0.6:8481", up=True, cached=frozenset({"x"})),
              NodeState("n1", "http://10.0.0.1:8481", up=True, cached=frozenset())]
    server = cast(Any, SimpleNamespace(nodes=SimpleNamespace(node_states=lambda: states)))
    job = DeploymentJob(
        id="d", image=cast(Any, SimpleNamespace(id="img")), manifest=cast(Any, None),
        manifest_id="m", nodes=[NodeTarget("n1", "http://10.0.0.1:8481/", "k"),
                                NodeTarget("n2", "http://10.0.0.2:8481", "k")],
        peer_token=PEER_TOKEN, options=DeployOptions(), seed_file=lambda: Path("/nonexistent"),
        workdir=Path("/nonexistent"), server=server, log=lambda _m: None)
    plans = chunks.COORDINATOR.prepare(job)
    assert set(plans) == {"n1", "n2"}
    assert plans["n1"]["partners"] == [{"name": "n1", "url": "http://10.0.0.1:8481"},
                                       {"name": "n2", "url": "http://10.0.0.2:8481"}]
    assert asked == [["h1", "h2", "h3"]]  # up, caching, outside the deployment
    # Only the holders that agreed to serve the deployment are offered.
    assert plans["n1"]["holders"] == [{"name": "h1", "url": "http://h1:8481"},
                                      {"name": "h2", "url": "http://h2:8481"}]
    assert [h["name"] for h in plans["n2"]["holders"]] == ["h2", "h1"]  # load spread
    assert job.state["serve_nodes"] == ["h1", "h2"]
    assert chunks.COORDINATOR.repo_bytes(job) == 0
