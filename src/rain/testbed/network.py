"""Building a testbed's network from its plan: namespaces, bridges, veths, shaping.

Layout, all inside the switch namespace except each host's `eth0` and the
host link's root-side end:

    host ns: eth0 ══ port ─[link_bridge]─ upload_dev ══ download_dev ─[br0]─ …
                                           (tbf ↑)       (tbf ↓)

Both directions of a link are shaped on egress in the switch, never in the
sending host's own qdisc (see `rain.testbed.plan.Host`). The host link
(`rain-NAME` ══ `host`) joins br0 unshaped.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rain.model.errors import Conflict, Unsupported
from rain.testbed import iproute, teardown
from rain.testbed.congestion import Congestion
from rain.testbed.plan import (
    SLOT_PREFIX,
    SLOTS,
    Plan,
    Shaping,
    fair_buckets,
    host_link_name,
    make_plan,
    slot_network,
)

NO_NETEM = "this kernel has no netem qdisc (sch_netem): --latency is not available here"
_NO_IPV6 = {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"}


_held = threading.local()  # how deep this thread is inside creation_lock


@contextlib.contextmanager
def creation_lock(lock_file: Path) -> Iterator[None]:
    """Held while a testbed claims its name and slot, creates its network or puts host
    settings back; re-entrant within a thread (a failed `up` calls `down` while holding it)."""
    depth = getattr(_held, "depth", 0)
    if depth:
        _held.depth = depth + 1
        try:
            yield
        finally:
            _held.depth = depth
        return
    lock_file.parent.mkdir(mode=0o700, exist_ok=True)
    with open(lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        _held.depth = 1
        try:
            yield
        finally:
            _held.depth = 0
            fcntl.flock(f, fcntl.LOCK_UN)


def claim(name: str, nodes: int, slot: int | None) -> Plan:
    """Refuse a name in use; choose a free address slot (call under `creation_lock`).

    A slot is in use when any address of the root namespace lies in it: the
    host link of another testbed, or anything else of this machine's.
    """
    if teardown.namespaces_of(name) or host_link_name(name) in iproute.link_names():
        raise Conflict(f"testbed {name} already exists: run "
                       f"'rain testbed down --name {name}' first")
    addresses = [ipaddress.IPv4Address(a) for _, a in iproute.root_addresses()]
    used = {s for s in range(SLOTS) if any(a in slot_network(s) for a in addresses)}
    if slot is not None:
        if slot in used:
            raise Conflict(f"address slot {slot} ({slot_network(slot)}) is already in use "
                           "on this machine")
    else:
        free = [s for s in range(SLOTS) if s not in used]
        if not free:
            raise Conflict(f"all {SLOTS} testbed address slots are in use")
        slot = free[0]
    return make_plan(name, nodes, slot)


def build(plan: Plan, rate: int, repo_rate: int, latency: float | None,
          mtu: int = 1500, congestion: Congestion | None = None) -> None:
    """Create everything in `plan`; on error the caller removes it by name.

    `mtu` applies to every link: 9000 (jumbo frames, usual in HPC clusters) cuts the
    kernel's per-packet work, which is most of what emulating many hosts on one
    machine costs. `congestion` is every host's TCP congestion control (`rain.testbed.
    congestion`: set in each namespace unless they inherit it; None: the machine's)."""
    node_shaping, repo_shaping = Shaping.for_rate(rate), Shaping.for_rate(repo_rate)
    fair = iproute.FairQueue("dst", fair_buckets(len(plan.nodes)), (plan.repo.address,))
    iproute.Batch().add_netns(plan.switch).run()
    if latency is not None and not iproute.netem_available(plan.switch):
        raise Unsupported(NO_NETEM)
    root = iproute.Batch()
    for host in plan.hosts:
        root.add_netns(host.namespace)
    root.add_veth(plan.host_link, Plan.HOST_PORT, plan.switch)
    root.run()
    iproute.disable_ipv6_on(plan.host_link)
    with ThreadPoolExecutor(max_workers=4) as pool:
        if congestion is not None and congestion.set_in_hosts:
            tcp = {"net.ipv4.tcp_congestion_control": congestion.name}
            list(pool.map(lambda h: iproute.sysctl_in(h.namespace, tcp), plan.hosts))
        if Path("/proc/sys/net/ipv6").exists():
            # No router solicitations or MLD reports in the byte counters.
            list(pool.map(lambda ns: iproute.sysctl_in(ns, _NO_IPV6), plan.namespaces))
        switch = iproute.Batch(plan.switch).up("lo")
        switch.add_bridge(Plan.BRIDGE).up(Plan.BRIDGE)
        switch.mtu(Plan.HOST_PORT, mtu).set_master(Plan.HOST_PORT, Plan.BRIDGE)
        switch.up(Plan.HOST_PORT)
        for host in plan.hosts:
            shaping = repo_shaping if host is plan.repo else node_shaping
            switch.add_veth(host.port, Plan.IFACE, host.namespace)
            switch.add_veth(host.upload_dev, host.download_dev)
            switch.add_bridge(host.link_bridge)
            switch.set_master(host.port, host.link_bridge)
            switch.set_master(host.upload_dev, host.link_bridge)
            switch.set_master(host.download_dev, Plan.BRIDGE)
            for dev in (host.port, host.upload_dev, host.download_dev, host.link_bridge):
                switch.mtu(dev, mtu)
            for dev in (host.link_bridge, host.port, host.upload_dev, host.download_dev):
                switch.up(dev)
            # Upload: per-destination fair queues, as a host's own fq would
            # share its NIC; download: the switch port's single FIFO.
            switch.shape(host.upload_dev, shaping, latency, fair)
            switch.shape(host.download_dev, shaping)
        switch.run()
        # Multicast to the host would only cost it CPU.
        iproute.set_port_flag(plan.switch, Plan.HOST_PORT, "mcast_flood", False)
        batches = []
        for host in plan.hosts:
            b = iproute.Batch(host.namespace).up("lo")
            b.mtu(Plan.IFACE, mtu)
            b.add_address(Plan.IFACE, f"{host.address}/{SLOT_PREFIX}").up(Plan.IFACE)
            b.add_route("224.0.0.0/4", Plan.IFACE)  # multicast senders need a route
            batches.append(b)
        list(pool.map(iproute.Batch.run, batches))
    link = iproute.Batch()
    link.mtu(plan.host_link, mtu)
    link.add_address(plan.host_link, f"{plan.host_address}/{SLOT_PREFIX}").up(plan.host_link)
    link.run()
