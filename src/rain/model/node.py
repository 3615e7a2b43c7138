"""Compute nodes, deployments and instances as plain data.

`Node` is what the repository knows of a registered agent (its last report);
`NodeState` is the snapshot the scheduler works on; `Deployment` and
`InstanceRecord` are what `rain deploy` asked for and what came of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from rain.model.errors import InvalidRequest

NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_node_name(name: Any) -> str:
    """A node's name as registered and as node tokens are bound to it (InvalidRequest if bad)."""
    if not isinstance(name, str) or not NODE_NAME.fullmatch(name):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise InvalidRequest(f"bad node name {shown}: use 1-64 letters, digits, '.', "
                             "'_', '-', starting with a letter or digit")
    return name


@dataclass(frozen=True)
class NodeState:
    """A snapshot of one node's agent report; the scheduler never mutates it."""

    name: str
    address: str = ""
    up: bool = True
    capacity_instances: int = 0
    running_instances: int = 0
    free_cache_bytes: int = 0
    # Image ids fully cached (verified) on the node.
    cached: frozenset[str] = field(default_factory=frozenset)
    # Image ids being fetched to the node right now (counted by the cache weigher).
    in_flight: frozenset[str] = field(default_factory=frozenset)
    last_heartbeat: datetime | None = None

    @property
    def free_instances(self) -> int:
        return max(0, self.capacity_instances - self.running_instances)


@dataclass(frozen=True)
class Placement:
    """`count` instances of one deployment go to node `node`."""

    node: str
    count: int


class TransferMethod(StrEnum):
    """How image bytes reach the nodes of a deployment (issue 4, seeds 001 §3 and 004)."""

    AUTO = "auto"
    HTTP = "http"  # every node pulls from the repository
    TREE = "tree"  # pipelined k-ary trees of nodes
    MULTICAST = "multicast"  # one udpcast stream to all nodes
    BITTORRENT = "bittorrent"  # libtorrent swarm seeded by the repository
    CHUNKS = "chunks"  # only the chunks the node's cache lacks
    CACHE = "cache"  # nothing to move: the node already has the image


@dataclass
class Node:
    """A registered node agent, as of its last report."""

    name: str
    address: str  # the agent's base URL, e.g. http://198.18.0.11:8481
    capacity_instances: int = 0
    running_instances: int = 0
    cache_capacity: int = 0
    cache_used: int = 0
    # Of cache_used, what backs live instance disks; the rest can be evicted.
    cache_pinned: int = 0
    cached: list[str] = field(default_factory=list)
    in_flight: list[str] = field(default_factory=list)
    version: str = ""
    registered: datetime | None = None
    last_heartbeat: datetime | None = None

    @property
    def free_cache_bytes(self) -> int:
        """Room for a new image: a full cache of images no disk uses still has room."""
        return max(0, self.cache_capacity - self.cache_pinned)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "address": self.address,
            "capacity_instances": self.capacity_instances,
            "running_instances": self.running_instances,
            "cache_capacity": self.cache_capacity,
            "cache_used": self.cache_used,
            "cache_pinned": self.cache_pinned,
            "cached": list(self.cached),
            "in_flight": list(self.in_flight),
            "version": self.version,
            "registered": _iso(self.registered),
            "last_heartbeat": _iso(self.last_heartbeat),
        }


class DeploymentStatus(StrEnum):
    RUNNING = "running"
    READY = "ready"  # every node has its instances
    PARTIAL = "partial"  # some nodes failed, the others are ready
    FAILED = "failed"  # no node is ready
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self is not DeploymentStatus.RUNNING


@dataclass
class Deployment:
    """One `rain deploy` (or prefetch, with `count` 0): an image onto nodes."""

    id: str
    owner: str
    image_id: str
    method: str  # as asked (may be "auto")
    count: int
    nodes: list[str] = field(default_factory=list)  # the nodes it uses
    status: DeploymentStatus = DeploymentStatus.RUNNING
    # The report `rain deploy --json` prints: makespan_s, first_ready_s, per_node,
    # repo_bytes_sent, peer_bytes_sent, method (as chosen), ...
    report: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    prefetch: bool = False
    created: datetime | None = None
    finished: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "owner": self.owner,
            "image_id": self.image_id,
            "method": self.method,
            "count": self.count,
            "nodes": list(self.nodes),
            "status": str(self.status),
            "report": dict(self.report),
            "options": dict(self.options),
            "error": self.error,
            "prefetch": self.prefetch,
            "created": _iso(self.created),
            "finished": _iso(self.finished),
        }


class InstanceStatus(StrEnum):
    CREATING = "creating"
    READY = "ready"
    FAILED = "failed"
    DELETED = "deleted"


@dataclass
class InstanceRecord:
    """One instance disk a deployment made on a node."""

    id: str
    deployment_id: str
    owner: str
    node: str
    image_id: str
    status: InstanceStatus = InstanceStatus.CREATING
    disk: str = ""  # path of the disk on the node
    error: str | None = None
    created: datetime | None = None
    ready: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "deployment_id": self.deployment_id,
            "owner": self.owner,
            "node": self.node,
            "image_id": self.image_id,
            "status": str(self.status),
            "disk": self.disk,
            "error": self.error,
            "created": _iso(self.created),
            "ready": _iso(self.ready),
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
