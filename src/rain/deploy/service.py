"""Deployments as a service: check what a user asks for, place the instances on nodes
(rain.schedule) and have the coordinator move the image there; cancel; remove instances.

The HTTP routes (rain.api.deployments, rain.api.nodes) only parse, authorise and
serialise; everything a deployment decides happens here, and every refusal is a
rain.model.errors exception.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from typing import Any

from rain.deploy.coordinator import Coordinator
from rain.distribute.agentclient import AgentClient
from rain.model import (
    Deployment,
    InstanceRecord,
    InstanceStatus,
    InvalidRequest,
    NodeState,
    NotFound,
    TransferMethod,
    User,
)
from rain.model.deploy import DeployOptions
from rain.model.errors import AgentUnreachable
from rain.repo import Repository
from rain.repo.access import require_user
from rain.schedule import (
    CacheSpaceFilter,
    HostFilter,
    NodeUpFilter,
    PlacementRequest,
    ScheduleConfig,
    describe,
    parse_policy,
    place,
    weighers_for,
)

MAX_COUNT = 100_000


@dataclass(frozen=True)
class DeploymentRequest:
    """What a user asks a deployment for, as sent (`POST /v1/deployments`'s fields);
    `DeploymentService.create` checks every field."""

    image: str  # an image reference
    nodes: Any = None  # node names (a list, or "a,b"); None with all_nodes
    all_nodes: bool = False
    count: Any = None  # instances; None: 1 (a prefetch: 0)
    method: str | None = None  # None: the server's default_method
    policy: Any = None  # spread | pack | None (the server's [schedule] multipliers)
    options: DeployOptions = field(default_factory=DeployOptions)
    prefetch: bool = False  # only copy the image to the nodes


class NamedNodes(HostFilter):
    """Only the nodes the request names."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def passes(self, node: NodeState, request: PlacementRequest) -> bool:
        return node.name in self.names

    def why_not(self, node: NodeState, request: PlacementRequest) -> str:
        return ""  # not asked for: a refusal names only the nodes that were


class DeploymentService:
    """One repository server's deployments."""

    def __init__(self, repo: Repository, coordinator: Coordinator,
                 schedule: ScheduleConfig) -> None:
        self.repo = repo
        self.coordinator = coordinator
        self.schedule = schedule
        self.nodes = coordinator.nodes
        self.records = coordinator.records

    def create(self, viewer: User | None, req: DeploymentRequest) -> Deployment:
        """Start instances of an image on nodes, or (`prefetch`) only copy it there; the
        deployment runs on in the coordinator."""
        started = time.monotonic()
        me = require_user(viewer)
        r, c = self.repo, self.coordinator
        image, _ = r.image_manifest(me, req.image)
        count = _count(req.count if req.count is not None else (0 if req.prefetch else 1),
                       req.prefetch)
        method = _method(req.method or c.side.config.default_method)
        policy = parse_policy(req.policy)
        states = _current(self.nodes.node_states(), c.in_flight(),
                          self.records.live_instance_counts())
        targets = _targets(states, req.nodes, req.all_nodes)
        if req.prefetch:
            down = [s.name for s in states if s.name in targets and not s.up]
            if down:
                raise InvalidRequest(f"nodes down: {', '.join(down)}")
            if policy is not None:
                raise InvalidRequest("a prefetch places no instances: leave policy out")
            placements = []
            names = sorted(targets)
            placement = None
        else:
            placements = place(image.id, count, states, weighers_for(self.schedule, policy),
                               filters=[NodeUpFilter(), NamedNodes(targets),
                                        CacheSpaceFilter()],
                               image_size=image.size or 0)
            names = [p.node for p in placements]
            placement = describe(self.schedule, policy)
        return c.deploy(me, image, placements=placements, targets=names, method=method,
                        options=req.options, prefetch=req.prefetch, started=started,
                        placement=placement)

    def cancel(self, viewer: User | None, deployment_id: str) -> Deployment:
        dep = self.records.get_deployment(viewer, deployment_id)  # NotFound unless the viewer's
        self.coordinator.cancel(dep.id)
        return self.records.get_deployment(viewer, deployment_id)

    def delete_instance(self, viewer: User | None, instance_id: str, *,
                        forget: bool = False) -> InstanceRecord:
        """Delete an instance's disks on its node (owner or admin); `forget`: close the
        record even when the node's agent does not answer (a node gone for good)."""
        r = self.records
        inst = r.get_instance(viewer, instance_id)
        if inst.status != InstanceStatus.DELETED:
            address, key = self.nodes.agent_endpoint(inst.node)
            try:
                # NotFound: gone on the node already (e.g. its disk never got made).
                with AgentClient(inst.node, address, key,
                                 context=self.coordinator.agent_context) as agent, \
                        contextlib.suppress(NotFound):
                    agent.delete_instance(inst.id)
            except AgentUnreachable:
                if not forget:
                    raise
            r.set_instance(inst.id, status=InstanceStatus.DELETED)
        return r.get_instance(viewer, instance_id)


def _count(value: Any, prefetch: bool) -> int:
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"count must be a whole number, not {value!r}") from None
    if prefetch and count:
        raise InvalidRequest("a prefetch starts no instances: leave count out")
    if not prefetch and not 1 <= count <= MAX_COUNT:
        raise InvalidRequest(f"count must be between 1 and {MAX_COUNT}")
    return count


def _method(value: Any) -> str:
    try:
        method = TransferMethod(str(value))
    except ValueError:
        raise InvalidRequest(f"unknown method {value!r}: use one of "
                             f"{', '.join(m.value for m in TransferMethod if m.value != 'cache')}"
                             ) from None
    if method is TransferMethod.CACHE:
        raise InvalidRequest("method 'cache' is what a deployment reports, not one to ask for")
    return str(method)


def _targets(states: list[NodeState], nodes: Any, everyone: bool) -> set[str]:
    known = {s.name for s in states}
    if everyone:
        if nodes:
            raise InvalidRequest("give either nodes or all, not both")
        return {s.name for s in states if s.up}
    if not nodes:
        raise InvalidRequest("name the nodes (nodes: [...]) or ask for all of them (all: true)")
    if isinstance(nodes, str):
        nodes = [n for n in nodes.split(",") if n]
    if not isinstance(nodes, list):
        raise InvalidRequest("nodes must be a list of node names")
    unknown = sorted({str(n) for n in nodes} - known)
    if unknown:
        raise NotFound(f"no such node: {', '.join(unknown)}")
    return {str(n) for n in nodes}


def _current(states: list[NodeState], in_flight: dict[str, set[str]],
             instances: dict[str, int]) -> list[NodeState]:
    """What the agents last reported, brought up to date with what this server knows
    already and their next heartbeat would say: images it is sending them right now,
    and the instances it has made or removed there."""
    return [replace(s, in_flight=s.in_flight | frozenset(in_flight.get(s.name, ())),
                    running_instances=instances.get(s.name, 0))
            for s in states]
