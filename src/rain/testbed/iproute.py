"""The one place the testbed calls `ip`, `tc`, `bridge` and `sysctl`.

Everything goes through `rain.formats.tool.run_tool` (argv lists, timeouts,
`ToolFailed` quoting stderr). Setting up a namespace takes a dozen commands,
so `Batch` collects them and runs one `ip -batch` and one `tc -batch` per
namespace: a 24-node testbed takes ~55 processes, not ~2000 commands each
started on its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rain.formats.tool import run_tool
from rain.model.errors import ToolFailed
from rain.testbed.plan import Shaping

TIMEOUT = 30.0
NETNS_DIR = Path("/run/netns")


def ip(*args: str, ns: str | None = None, input: bytes | None = None,
       check: bool = True) -> str:
    """Run `ip [-n NS] ARGS…` and return its stdout."""
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    return run_tool(argv, timeout=TIMEOUT, input=input, check=check).stdout.decode()


def ip_json(*args: str, ns: str | None = None) -> list[dict[str, Any]]:
    text = ip("-j", *args, ns=ns)
    return json.loads(text) if text.strip() else []


def tc_json(*args: str, ns: str | None = None) -> list[dict[str, Any]]:
    argv = ["tc", *(["-n", ns] if ns else []), "-j", *args]
    text = run_tool(argv, timeout=TIMEOUT).stdout.decode()
    return json.loads(text) if text.strip() else []


@dataclass(frozen=True)
class FairQueue:
    """One queue per peer, served round-robin, under a link's rate limit.

    Peers are told apart by `key` (the destination address, for what a host
    sends) and put into `buckets` queues (a power of two) by the low bits of
    that address, which are distinct for the first `buckets - 1` nodes;
    `exact` addresses (the repository's) get a queue of their own.
    """

    key: str  # "dst" or "src"
    buckets: int
    exact: tuple[str, ...] = ()

    # Bytes a queue may send per turn. htb sends a packet before it checks the
    # deficit, so a quantum below the largest (GSO) packet would favour the
    # flows with the biggest packets; 64 KiB + one frame is above all of them.
    QUANTUM = 65536 + 1514


class Batch:
    """`ip` and `tc` commands for one namespace (or the root one), run together."""

    def __init__(self, ns: str | None = None) -> None:
        self.ns = ns
        self.ip_lines: list[str] = []
        self.tc_lines: list[str] = []

    def _ip(self, *words: str) -> Batch:
        self.ip_lines.append(" ".join(words))
        return self

    def add_netns(self, name: str) -> Batch:
        return self._ip("netns", "add", name)

    def add_bridge(self, name: str) -> Batch:
        # No IGMP snooping: the bridge floods multicast to every port, so a
        # multicast sender reaches all nodes without an IGMP querier.
        return self._ip("link", "add", name, "type", "bridge", "mcast_snooping", "0",
                        "stp_state", "0", "forward_delay", "0")

    def add_veth(self, name: str, peer: str, peer_ns: str | None = None) -> Batch:
        """A veth pair: `name` here, `peer` in `peer_ns` (here when None)."""
        where = ("netns", peer_ns) if peer_ns else ()
        return self._ip("link", "add", name, "type", "veth", "peer", "name", peer, *where)

    def set_master(self, dev: str, bridge: str) -> Batch:
        return self._ip("link", "set", dev, "master", bridge)

    def up(self, dev: str) -> Batch:
        return self._ip("link", "set", dev, "up")

    def mtu(self, dev: str, mtu: int) -> Batch:
        return self._ip("link", "set", dev, "mtu", str(mtu))

    def add_address(self, dev: str, cidr: str) -> Batch:
        return self._ip("address", "add", cidr, "dev", dev)

    def add_route(self, dst: str, dev: str) -> Batch:
        return self._ip("route", "add", dst, "dev", dev)

    def shape(self, dev: str, shaping: Shaping, delay: float | None = None,
              fair: FairQueue | None = None) -> Batch:
        """Limit what leaves `dev` (its egress) to `shaping.rate`, with `delay` added.

        tbf alone is one FIFO; with `fair`, tbf's child is an htb that only
        round-robins (its classes never throttle below the link rate) over
        one queue per peer. The delay needs netem: netem is the root and tbf
        its child, the order netem's own documentation gives for rate plus
        delay.
        """
        add = ["qdisc", "add", "dev", dev]
        tbf = ["tbf", "rate", f"{shaping.rate}bit", "burst", str(shaping.burst),
               "limit", str(shaping.limit)]
        if delay is None:
            self._tc(*add, "root", "handle", "1:", *tbf)
        else:
            # netem's queue (packets) must hold all that is in flight for `delay`.
            packets = max(1000, int(shaping.rate / 8 * delay / 1500) * 2)
            self._tc(*add, "root", "handle", "9:", "netem", "delay", f"{delay * 1e6:.0f}us",
                     "limit", str(packets))
            self._tc(*add, "parent", "9:1", "handle", "1:", *tbf)
        if fair is not None:
            self._fair(dev, shaping, fair)
        return self

    def _fair(self, dev: str, shaping: Shaping, fair: FairQueue) -> None:
        self._tc("qdisc", "add", "dev", dev, "parent", "1:1", "handle", "2:", "htb",
                 "default", "1")
        offset = "16" if fair.key == "dst" else "12"  # in the IPv4 header
        classes = 2 + fair.buckets  # 2:1 other traffic (ARP), 2:2 exact, 2:3… buckets
        for minor in range(1, classes + 1):
            self._tc("class", "add", "dev", dev, "parent", "2:", "classid", f"2:{minor:x}",
                     "htb", "rate", f"{shaping.rate}bit", "burst", str(shaping.limit),
                     "cburst", str(shaping.limit), "quantum", str(FairQueue.QUANTUM))
            self._tc("qdisc", "add", "dev", dev, "parent", f"2:{minor:x}", "bfifo",
                     "limit", str(shaping.limit))
        filter_ = ["filter", "add", "dev", dev, "parent", "2:", "protocol", "ip"]
        for address in fair.exact:
            self._tc(*filter_, "prio", "1", "u32", "match", "ip", fair.key, f"{address}/32",
                     "flowid", "2:2")
        mask = fair.buckets - 1
        for bucket in range(fair.buckets):
            self._tc(*filter_, "prio", "2", "u32", "match", "u32", f"{bucket:#x}",
                     f"{mask:#x}", "at", offset, "flowid", f"2:{bucket + 3:x}")

    def _tc(self, *words: str) -> None:
        self.tc_lines.append(" ".join(words))

    def run(self) -> None:
        ns_args = ["-n", self.ns] if self.ns else []
        if self.ip_lines:
            run_tool(["ip", *ns_args, "-batch", "-"], timeout=TIMEOUT,
                     input=("\n".join(self.ip_lines) + "\n").encode())
        if self.tc_lines:
            run_tool(["tc", *ns_args, "-batch", "-"], timeout=TIMEOUT,
                     input=("\n".join(self.tc_lines) + "\n").encode())


# -- namespaces -------------------------------------------------------------------
def netns_list() -> list[str]:
    return [entry["name"] for entry in ip_json("netns", "list")]


def netns_delete(name: str) -> None:
    """Delete a namespace (its interfaces go with it, and their veth peers)."""
    run_tool(["ip", "netns", "delete", name], timeout=TIMEOUT, check=False)


def netns_pids(names: Iterable[str]) -> dict[str, list[int]]:
    """The processes inside each named namespace, as `ip netns pids` finds them.

    One pass over /proc for all namespaces instead of one `ip` per namespace:
    `down` polls this while processes exit. Zombies have no namespace any
    more and are not listed.
    """
    wanted: dict[tuple[int, int], str] = {}
    result: dict[str, list[int]] = {}
    for name in names:
        result[name] = []
        with contextlib.suppress(OSError):
            st = os.stat(NETNS_DIR / name)
            wanted[(st.st_dev, st.st_ino)] = name
    if not wanted:
        return result
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:
            continue  # exited, or a kernel thread we may not look at
        ns = wanted.get((st.st_dev, st.st_ino))
        if ns is not None:
            result[ns].append(int(entry.name))
    return result


def sysctl_in(ns: str, settings: Mapping[str, str]) -> None:
    """Set sysctls inside a namespace (net.* values are per namespace)."""
    exec_in(ns, ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())])


def netem_available(ns: str) -> bool:
    """Whether this kernel has sch_netem: try it on `ns`'s loopback, then remove it."""
    result = run_tool(["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem",
                       "delay", "1ms"], timeout=TIMEOUT, check=False)
    if result.returncode != 0:
        return False
    run_tool(["tc", "-n", ns, "qdisc", "del", "dev", "lo", "root"], timeout=TIMEOUT,
             check=False)
    return True


# -- links ------------------------------------------------------------------------
def link_names(ns: str | None = None) -> list[str]:
    return [link["ifname"] for link in ip_json("link", "show", ns=ns)]


def link_delete(dev: str, ns: str | None = None) -> None:
    ip("link", "delete", dev, ns=ns, check=False)


def link_bytes(ns: str | None, dev: str) -> tuple[int, int]:
    """(received, transmitted) bytes of `dev`, from the kernel's 64-bit counters."""
    links = ip_json("-s", "link", "show", "dev", dev, ns=ns)
    if not links:
        raise ToolFailed(f"no interface {dev} in {ns or 'the root namespace'}", tool="ip")
    stats = links[0]["stats64"]
    return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])


def qdiscs(ns: str | None, dev: str) -> list[dict[str, Any]]:
    return tc_json("qdisc", "show", "dev", dev, ns=ns)


def root_addresses() -> list[tuple[str, str]]:
    """(interface, IPv4 address) of every address in the root namespace."""
    found = []
    for link in ip_json("-4", "address", "show"):
        for addr in link.get("addr_info", []):
            found.append((link["ifname"], addr["local"]))
    return found


def disable_ipv6_on(dev: str) -> None:
    """No IPv6 on a root-namespace interface: no router solicitations in the counters."""
    path = Path("/proc/sys/net/ipv6/conf") / dev / "disable_ipv6"
    if path.exists():
        path.write_text("1\n")


def set_port_flag(ns: str, dev: str, flag: str, on: bool) -> None:
    run_tool(["bridge", "-n", ns, "link", "set", "dev", dev, flag, "on" if on else "off"],
             timeout=TIMEOUT)


# -- processes --------------------------------------------------------------------
def exec_in(ns: str, argv: Sequence[str], *, timeout: float = 60.0, check: bool = True,
            input: bytes | None = None,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a command inside a namespace and wait for it."""
    return run_tool(["ip", "netns", "exec", ns, *argv], timeout=timeout, check=check,
                    input=input, env=env)


def spawn_in(ns: str, argv: Sequence[str], *, log: Path | IO[bytes] | None = None,
             env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a long-lived process inside a namespace, in its own session.

    Not `running_tool`: these processes must outlive the command that started
    them (`rain testbed up` returns while the servers keep running). They die
    with `down`, which kills whatever is inside the testbed's namespaces.
    """
    argv = ["ip", "netns", "exec", ns, *argv]
    out: Any = subprocess.DEVNULL
    opened = None
    if isinstance(log, Path):
        opened = out = open(log, "ab")  # noqa: SIM115 - handed to the child, closed below
    elif log is not None:
        out = log
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                env=dict(env) if env is not None else None,
                                start_new_session=True, close_fds=True)
    except OSError as exc:
        raise ToolFailed(f"ip netns exec could not be started: {exc.strerror}",
                         tool="ip") from None
    finally:
        if opened is not None:
            opened.close()
