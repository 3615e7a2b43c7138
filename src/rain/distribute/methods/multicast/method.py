"""`multicast`: one udpcast stream from the repository to every node of a deployment.

The repository runs one `udp-sender` per deployment; every node runs
`udp-receiver`. udpcast repairs losses itself: the sender multicasts a slice
of blocks, asks every receiver which blocks it lacks and multicasts those
again, so each link carries the image about once, whatever the number of
nodes: T ≈ S / min(R_repo, R_node).

What is streamed is not the image file but its *distinct non-zero chunks*, in
manifest order of first appearance (`stream_order`). Zero chunks are present
on a node from the start and a repeated chunk is needed once, so a mostly
empty disk moves only its data, like the other methods. The receiver writes
the stream to its stdout; the node cuts it back into chunks and puts each one
into the PartialImage, which checks it against the manifest's SHA-256 before
it counts (and writes it at every index that has that digest). Nothing udpcast
delivers is trusted unverified.

Whatever the stream did not bring — a receiver that started too late, was
dropped by the sender (dead or too slow), lost its stream, or got a chunk that
failed verification — the node then fetches from the repository over HTTP
(`RepoSource.fetch` of the missing chunks): the loss repair of last resort.
A node that dies is dropped by the sender after `retries_until_drop`
unanswered acknowledgement requests, and the others go on.

Ordering: the coordinator starts the sender in `prepare` (it returns once the
sender listens), before any node has its plan. The sender starts as soon as
all the deployment's nodes have connected, or `max_wait` seconds after the
first one did; a receiver that has not been admitted by then gives up after
`start_timeout` and repairs everything from the repository.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar

from rain.distribute.methods.base import DeploymentJob, FetchContext
from rain.distribute.methods.multicast import udpcast
from rain.distribute.partial import BadChunk, TransferAborted
from rain.model.errors import InvalidImage, InvalidRequest, RainError
from rain.store.manifest import ZERO_DIGEST, ImageManifest

STREAM = "distinct-chunks-v1"  # what the stream holds: see stream_order
_FEED_BLOCK = 4 * 1024 * 1024


@dataclass
class MulticastConfig:
    """Settings of the multicast method (`[distribute.multicast]`)."""

    # Deployment k of those running at once uses UDP ports port_base + 2k and + 2k + 1
    # and the groups group_base + 2k (rendezvous) and + 2k + 1 (data).
    port_base: int = 9000
    slots: int = 500
    group_base: str = "239.255.0.0"  # organisation-local scope: never routed off-site
    ttl: int = 1  # one bridge / one LAN
    # The sender starts when every node has connected, or this long after the first one
    # did (then late nodes repair from the repository); min_wait delays even a full house.
    max_wait: float = 10.0
    min_wait: float = 0.0
    # Unanswered acknowledgement requests before the sender drops a receiver: the first
    # ten come within a few round trips, each later one a second or more apart. A dead
    # node holds the others that long (measured: 12 → 3 s, 15 → 6 s, 20 → 12 s); too few
    # and a live but starved receiver is dropped (it then repairs over HTTP).
    retries_until_drop: int = 15
    hello_interval_ms: int = 100  # also how soon the sender notices its start condition
    start_timeout: float = 60.0  # sender: give up when no node at all connected by then
    receive_timeout: float = 20.0  # receiver: give up when the sender is silent this long
    # After the last acknowledgement a receiver lingers this long in case the sender did
    # not hear it (udpcast's default is 500 ms, all of it on the makespan); a receiver
    # gone too soon is only dropped late by a sender nobody waits for any more.
    exit_wait_ms: int = 100
    rcvbuf: int | None = None  # receiver socket buffer (bytes; capped by net.core.rmem_max)
    # Send rate cap in bytes/s of the slowest link (the deployment's "rate" option wins);
    # None: udpcast's own flow control (the slice acknowledgements) alone.
    rate: float | None = None
    rate_margin: float = 0.97  # cap at this share of the link, so tbf never queues to drop
    fec: str | None = None  # udpcast --fec "STRIPESxREDUNDANCY/STRIPESIZE"; off: see docs
    blocksize: int = udpcast.BLOCK_SIZE
    slice_size: int | None = None  # blocks a slice (acknowledged as one); udpcast: 112
    # "store": stream chunks straight from the chunk store (no copy); "file": from the
    # materialised seed file (job.seed_file()).
    source: str = "store"
    sender: str = udpcast.SENDER
    ready_timeout: float = 10.0  # for the sender to bind and listen


def stream_order(manifest: ImageManifest) -> list[tuple[bytes, list[int]]]:
    """The stream: each distinct non-zero digest once, by first index, with all its indices.

    Sender and nodes compute it from the same manifest. Only the image's last chunk
    can be short, and its digest cannot equal a full chunk's, so it is last if present.
    """
    where: dict[bytes, list[int]] = {}
    for i, digest in enumerate(manifest.chunks):
        if digest != ZERO_DIGEST:
            where.setdefault(digest, []).append(i)
    return list(where.items())


def stream_bytes(manifest: ImageManifest, order: list[tuple[bytes, list[int]]]) -> int:
    return sum(manifest.chunk_length(idx[0]) for _, idx in order)


def max_bitrate(rate: float | None, cfg: MulticastConfig) -> int | None:
    """udpcast's --max-bitrate (bits/s of its packets) for a link of `rate` bytes/s.

    udpcast counts its packets (header + block); tbf counts Ethernet frames, 42 bytes
    more each: without the correction a cap of exactly the link rate still overflows it.
    """
    if not rate or rate <= 0:
        return None
    packet = cfg.blocksize + 16
    return int(rate * 8 * packet / (cfg.blocksize + udpcast.FRAME_OVERHEAD) * cfg.rate_margin)


# -- the repository's side -------------------------------------------------------------------
class _Slots:
    """Port/group slots of the deployments running on this server."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._used: set[int] = set()
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            start = random.randrange(self.count)  # a restarted server avoids stale senders
            for k in range(self.count):
                slot = (start + k) % self.count
                if slot not in self._used:
                    self._used.add(slot)
                    return slot
        raise RainError(f"all {self.count} multicast slots are in use")

    def give(self, slot: int) -> None:
        with self._lock:
            self._used.discard(slot)


def session_for(cfg: MulticastConfig, slot: int) -> udpcast.Session:
    base = ipaddress.IPv4Address(cfg.group_base)
    return udpcast.Session(portbase=cfg.port_base + 2 * slot, rdv_group=str(base + 2 * slot),
                           data_group=str(base + 2 * slot + 1), ttl=cfg.ttl)


@dataclass
class _Run:
    sender: udpcast.UdpSender | None
    slot: int | None
    blocksize: int
    fec: str | None
    stopped: bool = False
    stats: udpcast.SenderStats = field(default_factory=udpcast.SenderStats)


def sender_interface(job: DeploymentJob) -> tuple[str, str]:
    """(interface, its address) carrying `job.server.host`, else the route to the nodes."""
    host = job.server.host
    name = udpcast.local_interface(host)
    if name is not None and name != "lo":  # a server on loopback: look where the nodes are
        return name, host
    for node in job.nodes:
        route = udpcast.route_interface(node.host)
        if route is None:
            continue
        dev, src = route
        if dev == "lo":
            raise InvalidRequest(f"node {node.name} is reached over loopback: multicast "
                                 "needs the nodes on a network interface")
        addr = src or udpcast.interface_address(dev)
        if addr:
            return dev, addr
    raise RainError(f"no interface for multicast: {host!r} is not an address here and no "
                    "node address has a route")


class MulticastCoordinator:
    name: ClassVar[str] = "multicast"

    def prepare(self, job: DeploymentJob) -> dict[str, dict[str, Any]]:
        cfg: MulticastConfig = getattr(job.server.config, "multicast", None) or \
            MulticastConfig()
        order = stream_order(job.manifest)
        total = stream_bytes(job.manifest, order)
        plan: dict[str, Any] = {"stream": STREAM, "stream_bytes": total,
                                "size": job.manifest.size, "chunks": len(order)}
        if total == 0 or not job.nodes:  # an all-zero image: nothing to send
            job.state["multicast"] = _Run(None, None, cfg.blocksize, cfg.fec)
            return {n.name: dict(plan) for n in job.nodes}
        tool = udpcast.require(cfg.sender)
        interface, address = sender_interface(job)
        rate = job.options.rate_bytes_per_s or cfg.rate
        bitrate = max_bitrate(float(rate) if rate else None, cfg)
        udpcast.fec_overhead(cfg.fec)  # a bad setting fails here, not in udp-sender
        feed = self._feeder(job, cfg, order)
        with job.server.lock:
            slots = job.server.services.get("multicast")
            if slots is None:
                slots = job.server.services["multicast"] = _Slots(cfg.slots)
        failure: Exception | None = None
        for _attempt in range(3):  # a port may be held by something else: take another slot
            slot = slots.take()
            session = session_for(cfg, slot)
            sender = udpcast.UdpSender(udpcast.sender_argv(
                tool, session, interface, receivers=len(job.nodes), max_wait=cfg.max_wait,
                min_wait=cfg.min_wait, retries_until_drop=cfg.retries_until_drop,
                hello_interval_ms=cfg.hello_interval_ms,
                start_timeout=cfg.start_timeout + cfg.max_wait, max_bitrate=bitrate,
                fec=cfg.fec, blocksize=cfg.blocksize, slice_size=cfg.slice_size), feed)
            try:
                sender.start(cfg.ready_timeout)
            except RainError as exc:
                slots.give(slot)
                failure = exc
                continue
            job.state["multicast"] = _Run(sender, slot, cfg.blocksize, cfg.fec)
            job.log(f"udp-sender on {interface} ({address}), port {session.portbase}, "
                    f"group {session.data_group}, {len(job.nodes)} nodes, {total} bytes, "
                    f"cap {f'{bitrate / 1e6:.1f} Mbit/s' if bitrate else 'none'}")
            plan.update(portbase=session.portbase, rdv_group=session.rdv_group,
                        data_group=session.data_group, ttl=session.ttl, sender=address,
                        start_timeout=cfg.max_wait + 10.0,
                        receive_timeout=cfg.receive_timeout, exit_wait_ms=cfg.exit_wait_ms,
                        rcvbuf=cfg.rcvbuf)
            return {n.name: dict(plan) for n in job.nodes}
        assert failure is not None
        raise failure

    def _feeder(self, job: DeploymentJob, cfg: MulticastConfig,
                order: list[tuple[bytes, list[int]]]) -> Callable[[IO[bytes]], None]:
        m = job.manifest
        if cfg.source == "file":
            path = job.seed_file()  # now: a missing or bad seed fails prepare, not the feed

            def feed_file(out: IO[bytes]) -> None:
                fd = os.open(path, os.O_RDONLY)
                try:
                    for _digest, idx in order:
                        out.write(os.pread(fd, m.chunk_length(idx[0]), idx[0] * m.chunk_size))
                finally:
                    os.close(fd)
            return feed_file
        if cfg.source != "store":
            raise InvalidRequest(f"multicast source {cfg.source!r}: use 'store' or 'file'")
        # The stream as an image of its own: the reader fetches ahead and verifies each chunk.
        streamed = ImageManifest(m.chunk_size, stream_bytes(m, order), "", [d for d, _ in order])
        repo = job.server.repo

        def feed_store(out: IO[bytes]) -> None:
            reader = repo.chunk_reader(streamed, job.image.id)
            for block in reader.iter_range():
                out.write(block)
        return feed_store

    def finish(self, job: DeploymentJob) -> None:
        run: _Run | None = job.state.get("multicast")
        if run is None or run.stopped:
            return
        run.stopped = True
        if run.sender is not None:
            run.sender.stop()
            run.stats = s = run.sender.stats
            job.log(f"udp-sender: {s.acked_bytes} bytes acknowledged, "
                    f"{s.retransmitted_blocks} blocks re-sent, {s.connected} nodes connected, "
                    f"{s.dropped} dropped")
            if run.sender.feed_error is not None:
                job.log(f"multicast feed failed: {run.sender.feed_error}")
        if run.slot is not None:
            slots: _Slots | None = job.server.services.get("multicast")
            if slots is not None:
                slots.give(run.slot)

    def repo_bytes(self, job: DeploymentJob) -> int:
        """Payload udp-sender sent: the stream once, re-sent blocks and FEC blocks on top.

        From udp-sender's own statistics (acknowledged bytes, re-sent blocks); packet
        headers (44 bytes a block) are not counted, as HTTP counts bodies only.
        """
        run: _Run | None = job.state.get("multicast")
        if run is None:
            return 0
        stats = run.sender.stats if run.sender is not None else run.stats
        extra = stats.acked_bytes * udpcast.fec_overhead(run.fec)
        return int(stats.acked_bytes + stats.retransmitted_blocks * run.blocksize + extra)


# -- the node's side -------------------------------------------------------------------------
def node_interface(host: str, sender: str) -> str:
    """The interface holding this node's address, else the one facing the sender."""
    name = udpcast.local_interface(host) if host else None
    if name is not None:
        return name
    route = udpcast.route_interface(sender)
    if route is not None:
        return route[0]
    raise RainError(f"no interface for multicast: {host!r} is not an address here and the "
                    f"repository ({sender}) has no route")


def plan_session(plan: dict[str, Any]) -> tuple[udpcast.Session, str]:
    """The udpcast session and sender address of a plan, checked before they reach argv."""
    try:
        portbase = int(plan["portbase"])
        rdv = ipaddress.IPv4Address(str(plan["rdv_group"]))
        data = ipaddress.IPv4Address(str(plan["data_group"]))
        sender = ipaddress.IPv4Address(str(plan["sender"]))
        ttl = int(plan.get("ttl", 1))
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidRequest(f"bad multicast plan: {exc}") from None
    if not (1024 <= portbase <= 65534 and portbase % 2 == 0 and rdv.is_multicast
            and data.is_multicast and 1 <= ttl <= 255):
        raise InvalidRequest(f"bad multicast plan: port {portbase}, groups {rdv}/{data}, "
                             f"ttl {ttl}")
    return udpcast.Session(portbase, str(rdv), str(data), ttl), str(sender)


class MulticastNode:
    name: ClassVar[str] = "multicast"

    def fetch(self, ctx: FetchContext) -> None:
        plan = ctx.plan
        if plan.get("stream") != STREAM:
            raise InvalidRequest(f"multicast plan for a stream of kind {plan.get('stream')!r}, "
                                 f"this node reads {STREAM!r}")
        order = stream_order(ctx.manifest)
        total = stream_bytes(ctx.manifest, order)
        if int(plan.get("stream_bytes", -1)) != total:
            raise InvalidImage(f"the multicast plan announces {plan.get('stream_bytes')} bytes, "
                               f"the manifest of {ctx.image_id} makes {total}")
        if total and plan.get("portbase") is not None:
            self._receive(ctx, order, total)
        missing = ctx.partial.missing()
        if missing and not ctx.cancel.is_set():
            ctx.log(f"multicast left {len(missing)} chunks missing: fetching them from the "
                    "repository")
            ctx.repo.fetch(ctx.image_id, ctx.partial, missing, stats=ctx.stats,
                           cancel=ctx.cancel)
        if ctx.cancel.is_set():
            raise TransferAborted(f"transfer of {ctx.image_id} cancelled")

    def _receive(self, ctx: FetchContext, order: list[tuple[bytes, list[int]]],
                 total: int) -> None:
        plan = ctx.plan
        tool = udpcast.require(udpcast.RECEIVER)
        session, sender = plan_session(plan)
        interface = node_interface(ctx.host, sender)
        start_timeout = float(plan.get("start_timeout", 20.0))
        receive_timeout = float(plan.get("receive_timeout", 20.0))
        rcvbuf = plan.get("rcvbuf")
        argv = udpcast.receiver_argv(tool, session, interface, start_timeout=start_timeout,
                                     receive_timeout=receive_timeout,
                                     exit_wait_ms=int(plan.get("exit_wait_ms", 500)),
                                     rcvbuf=int(rcvbuf) if rcvbuf else None)
        got = 0
        with udpcast.udp_receiver(argv) as (proc, log):
            assert proc.stdout is not None
            progress = [time.monotonic(), 0]  # last progress, bytes by then
            done = threading.Event()

            def watch() -> None:
                # udpcast has its own timeouts; this covers cancel and a receiver that hangs
                # anyway (a few seconds past them, so theirs normally fire first). SIGINT
                # first: udp-receiver then tells the sender it leaves, so the others need
                # not wait for it to be dropped.
                while not done.wait(0.2):
                    limit = (receive_timeout if progress[1] else start_timeout) + 5.0
                    if ctx.cancel.is_set() or time.monotonic() - progress[0] > limit:
                        with contextlib.suppress(OSError):
                            proc.send_signal(signal.SIGINT)
                        if not done.wait(1.0):
                            with contextlib.suppress(OSError):
                                proc.kill()
                        return

            watcher = threading.Thread(target=watch, name="udp-receiver-watch", daemon=True)
            watcher.start()
            try:
                got = self._read_stream(ctx, proc.stdout, order, progress)
            finally:
                done.set()
                watcher.join()
            try:
                rc = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                rc = None  # killed on leaving the block
        if got < total and not ctx.cancel.is_set():
            ctx.log(f"udp-receiver stopped after {got} of {total} bytes "
                    f"(exit {rc}): {udpcast.stderr_line(log.text)}")

    def _read_stream(self, ctx: FetchContext, stream: IO[bytes],
                     order: list[tuple[bytes, list[int]]], progress: list[Any]) -> int:
        """Cut the stream into chunks and put them; returns the bytes read."""
        m = ctx.manifest
        buf = bytearray(m.chunk_size)
        got = 0
        for _digest, indices in order:
            n = m.chunk_length(indices[0])
            view = memoryview(buf)[:n]
            k = _read_exact(stream, view)
            got += k
            ctx.stats.add("repo_bytes", k)
            if k < n:
                return got
            progress[0], progress[1] = time.monotonic(), got
            for i in indices:
                try:
                    ctx.partial.put(i, view, "multicast")
                except BadChunk:
                    # Keep reading: this node's acknowledgements pace the whole group.
                    ctx.stats.add("bad_chunks", 1)
                    break
        return got

    def cached(self, ctx: FetchContext, path: Path) -> None:
        return None

    def release(self, image_id: str) -> None:
        return None


def _read_exact(stream: IO[bytes], view: memoryview) -> int:
    got = 0
    while got < len(view):
        k = stream.readinto(view[got:])  # type: ignore[attr-defined]
        if not k:
            break
        got += k
    return got


NODE = MulticastNode()
COORDINATOR = MulticastCoordinator()
