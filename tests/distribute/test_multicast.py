"""The multicast method on the real udpcast, between network namespaces.

A private network per module: a bridge in a namespace of its own, the
repository's namespace and three nodes' (a, b, c), joined by veth pairs with
tbf on both ends (the node links slower than the repository's, so the sender
outruns them and udpcast has losses to repair). No default route anywhere.

The coordinator and node sides run in threads of this process that have
entered a namespace (setns acts on the calling thread, and the udp-sender /
udp-receiver they start inherit it). The repository server the repair path
uses listens on loopback in the root namespace, so the nodes' RepoSource
connects from there (`RootRepoSource`): only the udpcast traffic crosses the
test network.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from rain.distribute.methods.base import DeploymentJob, FetchContext, NodeTarget, RepoSide
from rain.distribute.methods.multicast import method as multicast
from rain.distribute.methods.multicast import udpcast
from rain.distribute.methods.multicast.method import MulticastConfig, stream_bytes, stream_order
from rain.distribute.partial import PartialImage, TransferAborted
from rain.distribute.source import RepoSource, TransferStats
from rain.model import DiskFormat, InvalidRequest, ToolFailed
from rain.model.deploy import DeployOptions
from rain.repo.convert import store_file
from rain.store import ChunkStore, ImageReader, StoreConfig
from rain.store.backends.fs import FilesystemBackend
from rain.store.manifest import ZERO_DIGEST, ImageManifest
from tests.distribute.conftest import CHUNK, RepoImage

pytestmark = pytest.mark.integration

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
NODES = ("a", "b", "c")
JOIN = 60.0  # seconds a node thread may take before the test calls it hung


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _tc(ns: str, *args: str) -> None:
    proc = subprocess.run(["ip", "netns", "exec", ns, "tc", *args], capture_output=True,
                          text=True, timeout=30)
    if proc.returncode != 0:
        raise AssertionError(f"tc {' '.join(args)} in {ns}: {proc.stderr.strip()}")


@dataclass
class MiniNet:
    """The namespaces: `repo` (where udp-sender runs) and one per node."""

    prefix: str
    net: str  # "198.19.N"
    made: list[str] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def addr(self, role: str) -> str:
        return f"{self.net}.{1 if role == 'repo' else 10 + NODES.index(role)}"

    def create(self, rates: dict[str, str]) -> None:
        sw = self.ns("sw")
        self._add(sw)
        _ip("-n", sw, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", sw, "link", "set", "br0", "up")
        for role, rate in rates.items():
            ns = self.ns(role)
            self._add(ns)
            dev, port = f"eth-{role}", f"p-{role}"
            _ip("link", "add", "name", dev, "netns", ns, "type", "veth",
                "peer", "name", port, "netns", sw)
            _ip("-n", ns, "addr", "add", f"{self.addr(role)}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", sw, "link", "set", port, "master", "br0", "up")
            if role != "c":  # node c has no multicast route: udpcast must not need one
                _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", dev)
            for where, link in ((ns, dev), (sw, port)):  # upload and download of the link
                _tc(where, "qdisc", "add", "dev", link, "root", "tbf", "rate", rate,
                    "burst", "65536", "limit", "200000")

    def _add(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.made.append(ns)

    def destroy(self) -> None:
        for ns in reversed(self.made):
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                _ip("netns", "del", ns)
        self.made.clear()


def _usable() -> str:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "tc", udpcast.SENDER, udpcast.RECEIVER):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return ""


@pytest.fixture(scope="module")
def net() -> Iterator[MiniNet]:
    why = _usable()
    if why:
        pytest.skip(why)
    t = MiniNet(f"rmc-{secrets.token_hex(3)}", f"198.19.{200 + secrets.randbelow(50)}")
    try:
        t.create({"repo": "200mbit", "a": "50mbit", "b": "50mbit", "c": "50mbit"})
        yield t
    finally:
        t.destroy()


# -- running code inside a namespace ----------------------------------------------------------
_ROOT_NS = os.open("/proc/thread-self/ns/net", os.O_RDONLY)  # this (main) thread's namespace


class RootRepoSource(RepoSource):
    """The test repository (loopback, root namespace) as seen from inside a node namespace."""

    def _connection(self) -> Any:
        if self._conn is None:
            here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            try:
                _setns(_ROOT_NS)
                try:
                    conn = super()._connection()
                    conn.connect()
                finally:
                    _setns(here)
            finally:
                os.close(here)
        return self._conn


class InNamespace(threading.Thread):
    """Runs `fn` in a thread that has entered namespace `ns`; keeps its result or error."""

    def __init__(self, ns: str, fn: Callable[[], Any], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.ns, self.fn = ns, fn
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            fd = os.open(f"/run/netns/{self.ns}", os.O_RDONLY)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            self.result = self.fn()
        except BaseException as exc:  # reported by value()
            self.error = exc

    def value(self) -> Any:
        self.join(JOIN)
        assert not self.is_alive(), f"{self.name} hung"
        if self.error is not None:
            raise self.error
        return self.result


def in_ns(ns: str, fn: Callable[[], Any], name: str = "") -> Any:
    t = InNamespace(ns, fn, name or f"in-{ns}")
    t.start()
    return t.value()


# -- a deployment ----------------------------------------------------------------------------
class WatchedStats(TransferStats):
    """TransferStats that call `on_bytes(total)` as multicast/repository bytes arrive."""

    def __init__(self, on_bytes: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self._on_bytes = on_bytes

    def add(self, what: str, n: int) -> None:
        super().add(what, n)
        if what == "repo_bytes" and self._on_bytes is not None:
            self._on_bytes(self.repo_bytes)


@dataclass
class Deployment:
    net: MiniNet
    image: RepoImage
    cfg: MulticastConfig
    work: Path
    store: ChunkStore | None = None
    job: DeploymentJob | None = None
    plans: dict[str, dict[str, Any]] = field(default_factory=dict)
    cancels: list[threading.Event] = field(default_factory=list)

    def prepare(self, nodes: tuple[str, ...], options: dict[str, Any] | None = None,
                host: str = "") -> None:
        store = self.store
        chunks = SimpleNamespace(chunk_reader=lambda m, image_id="": ImageReader(
            cast(ChunkStore, store), m, image=image_id))  # Repository.chunk_reader's part
        side = RepoSide(repo=cast(Any, chunks),
                        config=SimpleNamespace(multicast=self.cfg),
                        host=host or self.net.addr("repo"), port=0, data_dir=self.work)
        m = self.image.manifest
        self.job = DeploymentJob(
            id=secrets.token_hex(8), image=cast(Any, SimpleNamespace(id=self.image.id)),
            manifest=m, manifest_id=m.id,
            nodes=[NodeTarget(n, f"http://{self.net.addr(n)}:1", "k") for n in nodes],
            peer_token="t", options=DeployOptions.from_json(options),
            seed_file=lambda: self.image.path,
            workdir=self.work, server=side, log=lambda _msg: None)
        job = self.job
        self.plans = in_ns(self.net.ns("repo"), lambda: multicast.COORDINATOR.prepare(job),
                           "coordinator")

    def node(self, role: str, stats: TransferStats, plan: dict[str, Any] | None = None,
             repo: RepoSource | None = None) -> InNamespace:
        """Start `role`'s fetch in its namespace; the thread's value is its PartialImage."""
        cancel = threading.Event()
        self.cancels.append(cancel)
        partial = PartialImage(self.work / f"{role}.raw", self.image.manifest)

        def fetch() -> PartialImage:
            source = repo or RootRepoSource(self.image.url, self.image.token)
            ctx = FetchContext(
                node=role, image_id=self.image.id, sha256=self.image.sha256,
                disk_format=DiskFormat.RAW, manifest=self.image.manifest, partial=partial,
                repo=source, plan=plan if plan is not None else self.plans[role], stats=stats,
                cancel=cancel, workdir=self.work, peer_token="t", host=self.net.addr(role),
                log=lambda _msg: None)
            try:
                multicast.NODE.fetch(ctx)
            finally:
                source.close()
                partial.close()
            return partial

        t = InNamespace(self.net.ns(role), fetch, f"node-{role}")
        t.start()
        return t

    def finish(self) -> None:
        for c in self.cancels:
            c.set()
        if self.job is not None:
            multicast.COORDINATOR.finish(self.job)

    def repo_bytes(self) -> int:
        assert self.job is not None
        return multicast.COORDINATOR.repo_bytes(self.job)

    def sender_stats(self) -> udpcast.SenderStats:
        assert self.job is not None
        stats: udpcast.SenderStats = self.job.state["multicast"].stats
        return stats


@pytest.fixture
def deployment(net: MiniNet, repo_image: RepoImage, tmp_path: Path) -> Iterator[Deployment]:
    cfg = MulticastConfig(source="file", max_wait=5, retries_until_drop=12,
                          receive_timeout=5)
    d = Deployment(net, repo_image, cfg, tmp_path)
    try:
        yield d
    finally:
        d.finish()


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


UNREACHABLE = "http://127.0.0.1:9"  # a node that needs the repository here fails loudly


# -- the tests ---------------------------------------------------------------------------------
def test_every_node_ends_with_exactly_the_image(deployment: Deployment) -> None:
    # From the chunk store (the default source): the repository's own copy, no seed file.
    store = ChunkStore(FilesystemBackend(deployment.work / "store"),
                       StoreConfig(chunk_size=CHUNK, direct_io=False))
    manifest, _mid, _ = store_file(store, deployment.image.path)
    assert manifest.chunks == deployment.image.manifest.chunks
    deployment.store, deployment.cfg.source = store, "store"
    deployment.prepare(("a", "b", "c"))
    expect = stream_bytes(deployment.image.manifest, stream_order(deployment.image.manifest))
    plan = deployment.plans["a"]
    assert plan["stream_bytes"] == expect < deployment.image.manifest.size  # no zero chunks
    stats = {n: TransferStats() for n in NODES}
    # No HTTP repair is possible here: everything must come over multicast.
    threads = {n: deployment.node(n, stats[n], repo=RepoSource(UNREACHABLE, None))
               for n in NODES}
    for n, t in threads.items():
        partial = t.value()
        assert partial.complete
        assert sha256_file(partial.path) == deployment.image.sha256
        assert stats[n].repo_bytes == expect
    deployment.finish()
    sent = deployment.repo_bytes()
    assert sent >= expect
    s = deployment.sender_stats()
    assert s.connected == 3 and s.dropped == 0
    assert sent == expect + s.retransmitted_blocks * udpcast.BLOCK_SIZE


def test_a_node_that_dies_mid_stream_does_not_stop_the_others(deployment: Deployment) -> None:
    deployment.prepare(("a", "b"))
    expect = deployment.plans["a"]["stream_bytes"]
    receivers: dict[str, subprocess.Popen[bytes]] = {}
    real = udpcast.udp_receiver

    @contextlib.contextmanager
    def recorded(argv: list[str]) -> Iterator[Any]:
        with real(argv) as (proc, log):
            receivers[threading.current_thread().name] = proc
            yield proc, log

    killed = threading.Event()

    def kill_a(total: int) -> None:
        # Node a's receiver dies hard (no goodbye to the sender) a quarter of the way in.
        if total >= expect // 4 and not killed.is_set():
            killed.set()
            os.kill(receivers["node-a"].pid, signal.SIGKILL)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(udpcast, "udp_receiver", recorded)
        a = deployment.node("a", WatchedStats(kill_a))
        b_stats = TransferStats()
        b = deployment.node("b", b_stats, repo=RepoSource(UNREACHABLE, None))
        b_image = b.value()
        a_image = a.value()  # its receiver died: the rest came from the repository
    assert killed.is_set()
    assert sha256_file(b_image.path) == deployment.image.sha256
    assert b_stats.repo_bytes == expect  # b got it all over multicast
    assert sha256_file(a_image.path) == deployment.image.sha256
    deployment.finish()
    assert deployment.sender_stats().dropped == 1


def test_damaged_data_and_a_missed_stream_are_repaired(deployment: Deployment) -> None:
    deployment.prepare(("a", "b"))
    order = stream_order(deployment.image.manifest)
    real = multicast._read_exact
    damaged = {"reads": 0}

    def flipping(stream: Any, view: memoryview) -> int:
        k = real(stream, view)
        if threading.current_thread().name == "node-a":
            damaged["reads"] += 1
            if damaged["reads"] == 3 and k:  # the third chunk of the stream arrives corrupt
                view[0] ^= 0xFF
        return k

    # Node c never finds a sender (nothing on that port): it times out and repairs all.
    missed = dict(deployment.plans["a"], portbase=deployment.plans["a"]["portbase"] + 200,
                  start_timeout=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(multicast, "_read_exact", flipping)
        stats = {n: TransferStats() for n in NODES}
        threads = {"a": deployment.node("a", stats["a"]),
                   "b": deployment.node("b", stats["b"], repo=RepoSource(UNREACHABLE, None)),
                   "c": deployment.node("c", stats["c"], plan=missed)}
        images = {n: t.value() for n, t in threads.items()}
    for n in NODES:
        assert sha256_file(images[n].path) == deployment.image.sha256, n
    assert stats["a"].bad_chunks == 1
    # a got the stream once, then the damaged chunk again over HTTP
    m = deployment.image.manifest
    again = sum(m.chunk_length(i) for i in order[2][1])
    assert stats["a"].repo_bytes == stream_bytes(m, order) + again
    assert stats["c"].repo_bytes == images["c"].data_bytes()  # all of it over HTTP


def test_a_cancelled_node_stops_and_leaves_the_others(deployment: Deployment) -> None:
    deployment.prepare(("a", "b"))
    expect = deployment.plans["a"]["stream_bytes"]

    def cancel_a(total: int) -> None:
        if total >= expect // 3:
            deployment.cancels[0].set()  # node a's, made first

    a = deployment.node("a", WatchedStats(cancel_a))
    b = deployment.node("b", TransferStats(), repo=RepoSource(UNREACHABLE, None))
    with pytest.raises(TransferAborted):
        a.value()
    assert sha256_file(b.value().path) == deployment.image.sha256
    deployment.finish()
    # SIGINT first: udp-receiver said goodbye, so the sender did not have to drop it.
    assert deployment.sender_stats().dropped == 0


def test_a_rate_cap_is_passed_to_udp_sender(deployment: Deployment) -> None:
    deployment.prepare(("a",), options={"rate": 50e6 / 8})
    assert deployment.job is not None
    run = deployment.job.state["multicast"]
    argv = run.sender.argv
    bitrate = int(argv[argv.index("--max-bitrate") + 1])
    assert 0.9 * 50e6 < bitrate < 50e6
    partial = deployment.node("a", TransferStats(), repo=RepoSource(UNREACHABLE, None)).value()
    assert sha256_file(partial.path) == deployment.image.sha256


def test_finish_stops_a_sender_still_waiting_for_its_nodes(deployment: Deployment) -> None:
    # The server listens on every address: the sender takes the interface facing the nodes.
    deployment.prepare(("a", "b"), host="0.0.0.0")
    assert deployment.plans["a"]["sender"] == deployment.net.addr("repo")
    assert deployment.job is not None
    sender = deployment.job.state["multicast"].sender
    assert sender.running()
    deployment.finish()
    assert not sender.running()
    assert deployment.repo_bytes() == 0


# -- no network needed --------------------------------------------------------------------------
def test_missing_udpcast_tools_are_one_clear_error(repo_image: RepoImage, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = MulticastConfig(sender="udp-sender-not-installed")
    side = RepoSide(repo=cast(Any, None), config=SimpleNamespace(multicast=cfg),
                    host="198.19.0.1", port=0, data_dir=tmp_path)
    m = repo_image.manifest
    job = DeploymentJob(id="d", image=cast(Any, SimpleNamespace(id=repo_image.id)), manifest=m,
                        manifest_id=m.id, nodes=[NodeTarget("a", "http://198.19.0.2:1", "k")],
                        peer_token="t", options=DeployOptions(),
                        seed_file=lambda: repo_image.path,
                        workdir=tmp_path, server=side)
    with pytest.raises(ToolFailed, match="udp-sender-not-installed is not installed"):
        multicast.COORDINATOR.prepare(job)
    multicast.COORDINATOR.finish(job)
    assert multicast.COORDINATOR.repo_bytes(job) == 0

    monkeypatch.setattr(udpcast, "RECEIVER", "udp-receiver-not-installed")
    order = stream_order(m)
    plan = {"stream": multicast.STREAM, "stream_bytes": stream_bytes(m, order),
            "portbase": 9000, "rdv_group": "239.255.0.0", "data_group": "239.255.0.1",
            "sender": "198.19.0.1"}
    with PartialImage(tmp_path / "p.raw", m) as partial:
        ctx = FetchContext(node="a", image_id=repo_image.id, sha256=repo_image.sha256,
                           disk_format=DiskFormat.RAW, manifest=m, partial=partial,
                           repo=RepoSource(UNREACHABLE, None), plan=plan,
                           stats=TransferStats(), cancel=threading.Event(), workdir=tmp_path,
                           peer_token="t")
        with pytest.raises(ToolFailed, match="udp-receiver-not-installed is not installed"):
            multicast.NODE.fetch(ctx)


def test_the_stream_holds_each_distinct_data_chunk_once() -> None:
    a, b, c = (hashlib.sha256(x).digest() for x in (b"a", b"b", b"c"))
    m = ImageManifest(4, 22, "", [a, ZERO_DIGEST, b, a, ZERO_DIGEST, c])
    assert stream_order(m) == [(a, [0, 3]), (b, [2]), (c, [5])]
    assert stream_bytes(m, stream_order(m)) == 4 + 4 + 2  # the last chunk is short


def test_sender_statistics_are_parsed() -> None:
    sender = udpcast.UdpSender(["udp-sender"])
    for line in (b"New connection from 198.19.0.2  (#0) 00000009",
                 b"bytes= 67 108 864  re-xmits=0000262 (  0.5%) slice=0112 -   2",
                 b"Dropping client #1 because of timeout"):
        sender._on_line(line)
    assert sender.stats == udpcast.SenderStats(67108864, 262, 1, 1)
    cfg = MulticastConfig()
    bits = multicast.max_bitrate(100e6 / 8, cfg)
    assert bits is not None and 0.9 * 100e6 < bits < 100e6
    assert multicast.max_bitrate(None, cfg) is None
    assert udpcast.fec_overhead("8x8/128") == 8 / 128


def test_a_bad_plan_never_reaches_udp_receiver() -> None:
    good = {"portbase": 9000, "rdv_group": "239.255.0.0", "data_group": "239.255.0.1",
            "sender": "198.19.0.1"}
    session, sender = multicast.plan_session(good)
    assert (session.portbase, sender) == (9000, "198.19.0.1")
    for bad in ({"portbase": 9001}, {"rdv_group": "--file=/etc/passwd"},
                {"data_group": "198.19.0.9"}, {"sender": "node-a"}, {"portbase": None}):
        with pytest.raises(InvalidRequest, match="bad multicast plan"):
            multicast.plan_session({**good, **bad})
