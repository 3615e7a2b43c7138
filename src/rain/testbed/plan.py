"""What a testbed is made of, computed before anything is created.

Pure functions and plain data: the names of namespaces and interfaces, the
address of every host, and the checking of link rates, delays and testbed names.
Keeping this apart from the code that calls `ip` and `tc` means every rule
(name lengths, address spread, rate limits) is checked and tested without
root, and `up` fails on bad input before it has made anything.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from rain.model.errors import InvalidRequest
from rain.model.units import format_bits_per_second, parse_duration, parse_rate_bits_per_second

PREFIX = "rain"  # every namespace and the host interface start with "rain-"
REPO_PORT = 8480
AGENT_PORT = 8481

# All testbeds live in 198.18.0.0/15 (RFC 2544 benchmarking space: never
# routed on the internet). It is cut into SLOTS blocks of /18 so that two
# testbeds (a test run and a benchmark) can be reachable from the host at the
# same time: the host routes each block to its own testbed's host link. Slot 0
# puts the repository at 198.18.0.1.
SPACE = ipaddress.IPv4Network("198.18.0.0/15")
SLOT_PREFIX = 18
SLOTS = 1 << (SLOT_PREFIX - SPACE.prefixlen)
NODES_PER_OCTET = 250  # node addresses X.Y.k.1 .. X.Y.k.250
# A Linux bridge has at most 1024 ports (BR_MAX_PORTS); the repository and the
# host link take two.
MAX_NODES = 1000

NAME_RE = re.compile(r"[a-z][a-z0-9]{0,9}")  # "rain-" + name must fit IFNAMSIZ (15)
MIN_RATE = 64_000  # below this a 64 KiB burst is seconds of line time
MAX_RATE = 100 * 10**9


def check_link_rate(text: str | int) -> int:
    """A link's rate in bits/s (tc-style text or a number), within what tc shapes well."""
    bits = text if isinstance(text, int) else parse_rate_bits_per_second(text)
    if not MIN_RATE <= bits <= MAX_RATE:
        raise InvalidRequest(f"bad rate {text!r}: must be between "
                             f"{format_bits_per_second(MIN_RATE)} and "
                             f"{format_bits_per_second(MAX_RATE)}")
    return bits


def check_link_delay(text: str) -> float:
    """A one-way delay (`5ms`, `200us`, `0.1s`) in seconds, above 0 and at most 10 s."""
    try:
        seconds = parse_duration(text.strip().lower()).total_seconds()
    except InvalidRequest:
        raise InvalidRequest(f"bad latency {text!r}: use e.g. 5ms, 200us or 0.1s") from None
    if not 0 < seconds <= 10:
        raise InvalidRequest(f"bad latency {text!r}: must be above 0 and at most 10s")
    return seconds


def check_name(name: str) -> str:
    """Testbed names become namespace and interface names, and a glob for `down`."""
    if not NAME_RE.fullmatch(name):
        raise InvalidRequest(f"bad testbed name {name!r}: use 1-10 lowercase letters and "
                             "digits, starting with a letter")
    return name


def check_nodes(nodes: int) -> int:
    if not 1 <= nodes <= MAX_NODES:
        raise InvalidRequest(f"bad number of nodes {nodes}: must be 1 to {MAX_NODES}")
    return nodes


@dataclass(frozen=True)
class Shaping:
    """The tbf parameters of one direction of one link.

    The burst must hold a full 64 KiB GSO packet (else tbf has to segment
    every one) and about 4 ms of traffic at high rates (else the token bucket
    cannot keep up with timer granularity); the queue holds 25 ms of traffic
    on top, enough for TCP to keep the link busy after a loss without building
    a bufferbloat-sized delay.
    """

    rate: int  # bits/s
    burst: int  # bytes
    limit: int  # bytes

    @classmethod
    def for_rate(cls, rate: int) -> Shaping:
        rate_bytes = rate // 8
        burst = max(64 * 1024, rate_bytes // 250)
        return cls(rate=rate, burst=burst, limit=burst + rate_bytes // 40)


@dataclass(frozen=True)
class Host:
    """One namespace of the testbed (the repository or a node) and its link to the switch.

    In the switch namespace each link is `port` (the peer of the host's
    eth0) on a two-port bridge `link_bridge` with `upload_dev`, whose veth
    peer `download_dev` is a port of the main bridge. Both directions are
    shaped there, on the egress of `upload_dev` and `download_dev`: the
    queue builds up in the switch as on a real one, not in the sending
    host's own qdisc, where TCP Small Queues starves all but one of several
    flows (measured in docs/testbed.md).
    """

    name: str  # "repo" or a node name such as "n01"
    namespace: str  # rain-NAME-n01
    address: str  # its IPv4 address on eth0
    port: str  # the peer of its eth0, in the switch namespace

    @property
    def upload_dev(self) -> str:
        return self.port + "u"

    @property
    def download_dev(self) -> str:
        return self.port + "d"

    @property
    def link_bridge(self) -> str:
        return "b" + self.port

    @property
    def agent_url(self) -> str:
        return f"http://{self.address}:{AGENT_PORT}"


@dataclass(frozen=True)
class Plan:
    """Names and addresses of one testbed."""

    name: str
    slot: int
    repo: Host
    nodes: tuple[Host, ...]

    IFACE = "eth0"  # the link's end inside a repository or node namespace
    BRIDGE = "br0"
    HOST_PORT = "host"  # the host link's end in the switch namespace

    @property
    def switch(self) -> str:
        return switch_namespace(self.name)

    @property
    def host_link(self) -> str:
        """The host link's end in the root namespace."""
        return host_link_name(self.name)

    @property
    def network(self) -> ipaddress.IPv4Network:
        return slot_network(self.slot)

    @property
    def host_address(self) -> str:
        return str(self.network.network_address + 63 * 256 + 254)

    @property
    def url(self) -> str:
        return f"http://{self.repo.address}:{REPO_PORT}"

    @property
    def hosts(self) -> tuple[Host, ...]:
        return (self.repo, *self.nodes)

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.switch, *(h.namespace for h in self.hosts))

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if name in (h.name, h.namespace):
                return h
        raise InvalidRequest(f"testbed {self.name} has no node {name!r}")


def fair_buckets(nodes: int) -> int:
    """Per-destination queues on a host's upload: a power of two above the node count, ≤ 64.

    Node k's address ends in k (up to 250), so its low bits pick a queue of
    its own while there are fewer nodes than queues.
    """
    buckets = 2
    while buckets <= nodes and buckets < 64:
        buckets *= 2
    return buckets


def namespace_prefix(name: str) -> str:
    return f"{PREFIX}-{name}-"


def switch_namespace(name: str) -> str:
    return f"{PREFIX}-{name}-sw"


def host_link_name(name: str) -> str:
    return f"{PREFIX}-{name}"


def slot_network(slot: int) -> ipaddress.IPv4Network:
    if not 0 <= slot < SLOTS:
        raise InvalidRequest(f"bad address slot {slot}: must be 0 to {SLOTS - 1}")
    return list(SPACE.subnets(new_prefix=SLOT_PREFIX))[slot]


def node_names(nodes: int) -> list[str]:
    """n01 … n24; zero-padded to the width of the count, at least two digits."""
    width = max(2, len(str(nodes)))
    return [f"n{i:0{width}d}" for i in range(1, nodes + 1)]


def make_plan(name: str, nodes: int, slot: int) -> Plan:
    check_name(name)
    check_nodes(nodes)
    base = slot_network(slot).network_address
    prefix = namespace_prefix(name)
    repo = Host("repo", prefix + "repo", str(base + 1), "repo")
    hosts = []
    for i, node in enumerate(node_names(nodes)):
        octet, last = divmod(i, NODES_PER_OCTET)
        address = base + (1 + octet) * 256 + last + 1
        hosts.append(Host(node, prefix + node, str(address), node))
    return Plan(name=name, slot=slot, repo=repo, nodes=tuple(hosts))
