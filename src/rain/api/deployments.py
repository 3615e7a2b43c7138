"""`POST /v1/deployments`: place instances on nodes (rain.schedule) and have the
coordinator move the image there (rain.distribute); prefetch; instance removal."""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse

from rain.api.deps import repo, viewer
from rain.api.images import parse_size
from rain.distribute.agentclient import AgentClient, AgentUnreachable
from rain.distribute.coordinator import Coordinator
from rain.model import (
    InstanceStatus,
    InvalidRequest,
    NodeState,
    NotFound,
    TransferMethod,
    User,
)
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

router = APIRouter(prefix="/v1", tags=["deployments"])
Repo = Annotated[Repository, Depends(repo)]
Viewer = Annotated[User | None, Depends(viewer)]
OPTIONS = {"size", "copy", "ephemeral_size", "fanout", "stripes", "encrypt", "rate",
           "max_rate", "stall_seconds", "web_seed"}
SIZE_OPTIONS = {"size", "ephemeral_size"}
MAX_COUNT = 100_000


def coordinator(request: Request) -> Coordinator:
    c: Coordinator = request.app.state.coordinator
    return c


def schedule(request: Request) -> ScheduleConfig:
    config: ScheduleConfig = request.app.state.schedule
    return config


Coord = Annotated[Coordinator, Depends(coordinator)]
Schedule = Annotated[ScheduleConfig, Depends(schedule)]


class NamedNodes(HostFilter):
    """Only the nodes the request names."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def passes(self, node: NodeState, request: PlacementRequest) -> bool:
        return node.name in self.names

    def why_not(self, node: NodeState, request: PlacementRequest) -> str:
        return ""  # not asked for: a refusal names only the nodes that were


@router.post("/deployments", status_code=202)
def create_deployment(r: Repo, user: Viewer, c: Coord, config: Schedule,
                      body: Annotated[dict[str, Any], Body()]) -> JSONResponse:
    """Start instances of an image on nodes, or (`prefetch`) only copy it there.

    Body: `{"image": REF, "nodes": [NAME, ...] | "all": true, "count": N,
    "method": auto|http|tree|multicast|bittorrent|chunks, "policy": spread|pack,
    "options": {...}, "prefetch": false}`. `policy` (default: the server's
    `[schedule]` multipliers, spread unless changed) decides whether the
    instances go to different nodes or fill few; the report's `placement` says
    which placed them. Options: size, ephemeral_size (bytes or "4G"), copy,
    fanout, stripes (tree), encrypt (bittorrent), rate (multicast cap, B/s),
    max_rate (per-node throttle, B/s), stall_seconds, web_seed. The answer is
    the deployment (202); follow it with GET /v1/deployments/{id}.
    """
    started = time.monotonic()
    me = require_user(user)
    image, _ = r.image_manifest(me, str(body.get("image") or ""))
    prefetch = bool(body.get("prefetch", False))
    count = _count(body.get("count", 0 if prefetch else 1), prefetch)
    method = _method(body.get("method") or c.side.config.default_method)
    options = _options(body.get("options") or {})
    policy = parse_policy(body.get("policy"))
    states = _current(r.node_states(), c.in_flight(), r.catalog.live_instance_counts())
    targets = _targets(states, body.get("nodes"), bool(body.get("all", False)))
    if prefetch:
        down = [s.name for s in states if s.name in targets and not s.up]
        if down:
            raise InvalidRequest(f"nodes down: {', '.join(down)}")
        if policy is not None:
            raise InvalidRequest("a prefetch places no instances: leave policy out")
        placements = []
        names = sorted(targets)
        placement = None
    else:
        placements = place(image.id, count, states, weighers_for(config, policy),
                           filters=[NodeUpFilter(), NamedNodes(targets), CacheSpaceFilter()],
                           image_size=image.size or 0)
        names = [p.node for p in placements]
        placement = describe(config, policy)
    dep = c.deploy(me, image, placements=placements, targets=names, method=method,
                   options=options, prefetch=prefetch, started=started, placement=placement)
    return JSONResponse(dep.to_dict(), status_code=202)


@router.post("/deployments/{deployment_id}/cancel")
def cancel_deployment(deployment_id: str, r: Repo, user: Viewer, c: Coord) -> dict[str, Any]:
    dep = r.get_deployment(user, deployment_id)  # NotFound unless the viewer's
    c.cancel(dep.id)
    return r.get_deployment(user, deployment_id).to_dict()


@router.delete("/instances/{instance_id}")
def delete_instance(instance_id: str, r: Repo, user: Viewer, c: Coord,
                    forget: bool = False) -> dict[str, Any]:
    """Delete an instance's disks on its node (owner or admin).

    `forget=true` is for a node that is gone for good: when its agent does not answer
    the record is closed anyway (the disk, if the node ever returns, stays there)."""
    inst = r.get_instance(user, instance_id)
    if inst.status != InstanceStatus.DELETED:
        address, key = r.agent_endpoint(inst.node)
        try:
            # NotFound: gone on the node already (e.g. its disk never got made).
            with AgentClient(inst.node, address, key, context=c.agent_context) as agent, \
                    contextlib.suppress(NotFound):
                agent.delete_instance(inst.id)
        except AgentUnreachable:
            if not forget:
                raise
        r.set_instance(inst.id, status=InstanceStatus.DELETED)
    return r.get_instance(user, instance_id).to_dict()


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


def _options(options: Any) -> dict[str, Any]:
    if not isinstance(options, dict):
        raise InvalidRequest("options must be an object")
    unknown = set(options) - OPTIONS
    if unknown:
        raise InvalidRequest(f"unknown options: {', '.join(sorted(unknown))}")
    out = dict(options)
    for key in SIZE_OPTIONS & set(out):
        if out[key] is not None:
            out[key] = parse_size(str(out[key]))
    for key in ("fanout", "stripes"):
        if key in out and (not isinstance(out[key], int) or not 1 <= out[key] <= 64):
            raise InvalidRequest(f"{key} must be a whole number from 1 to 64")
    for key in ("rate", "max_rate", "stall_seconds"):
        if key in out and (not isinstance(out[key], int | float) or out[key] <= 0):
            raise InvalidRequest(f"{key} must be a positive number")
    return out


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
