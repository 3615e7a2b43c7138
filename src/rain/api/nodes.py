"""`/v1/nodes` (node agents register and report), `/v1/deployments` and `/v1/instances`
(what deployments asked for and made). Agent keys never leave the server."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request

from rain.api.deps import principal, viewer
from rain.deploy.nodes import NodeRegistry
from rain.deploy.records import DeploymentRecords
from rain.model import Node, User

router = APIRouter(prefix="/v1")


def node_registry(request: Request) -> NodeRegistry:
    nodes: NodeRegistry = request.app.state.deployments.nodes
    return nodes


def deployment_records(request: Request) -> DeploymentRecords:
    records: DeploymentRecords = request.app.state.deployments.records
    return records


Nodes = Annotated[NodeRegistry, Depends(node_registry)]
Records = Annotated[DeploymentRecords, Depends(deployment_records)]
Viewer = Annotated[User | None, Depends(viewer)]
Agent = Annotated[User | None, Depends(principal)]
Report = Annotated[dict[str, Any], Body()]


def node_dict(r: NodeRegistry, node: Node) -> dict[str, Any]:
    return {**node.to_dict(), "up": r.node_up(node)}


# -- nodes ---------------------------------------------------------------------------
@router.post("/nodes", tags=["nodes"], status_code=201)
def register_node(r: Nodes, user: Agent, report: Report) -> dict[str, Any]:
    """The node's token (or an admin's): register a node, or register it again after a
    restart.

    Body: `{"name", "address": "http://HOST:PORT", "agent_key", "capacity_instances",
    "running_instances", "cache_capacity", "cache_used", "cache_pinned", "cached":
    [IMAGE_ID, ...], "in_flight": [IMAGE_ID, ...], "version"}`; what is left out is reset
    to 0 / empty. `cache_pinned` is the part of `cache_used` live instance disks need:
    placement counts the rest as room, since the agent evicts it for a new image.
    """
    return node_dict(r, r.register_node(user, report))


@router.put("/nodes/{name}", tags=["nodes"])
def node_heartbeat(name: str, r: Nodes, user: Agent, report: Report) -> dict[str, Any]:
    """The node's token (or an admin's): the agent is alive; the fields sent replace the
    old ones."""
    return node_dict(r, r.node_heartbeat(user, name, report))


@router.get("/nodes", tags=["nodes"])
def list_nodes(r: Nodes, user: Viewer) -> dict[str, Any]:
    """Every registered node, by name; `up` is false once its heartbeat is too old."""
    return {"nodes": [node_dict(r, n) for n in r.list_nodes(user)]}


@router.get("/nodes/{name}", tags=["nodes"])
def show_node(name: str, r: Nodes, user: Viewer) -> dict[str, Any]:
    return node_dict(r, r.get_node(user, name))


@router.delete("/nodes/{name}", tags=["nodes"])
def remove_node(name: str, r: Nodes, user: Viewer) -> dict[str, Any]:
    """Admin: forget a node (the records of its instances stay); returns it."""
    return node_dict(r, r.remove_node(user, name))


# -- deployments and instances ------------------------------------------------------
@router.get("/deployments", tags=["deployments"])
def list_deployments(r: Records, user: Viewer, image: str | None = None, limit: int = 100,
                     offset: int = 0) -> dict[str, Any]:
    """Your deployments, newest first (admins: everyone's); `image=REF` narrows to one image."""
    found, total = r.list_deployments(user, image=image, limit=limit, offset=offset)
    return {"deployments": [d.to_dict() for d in found], "total": total, "limit": limit,
            "offset": offset}


@router.get("/deployments/{deployment_id}", tags=["deployments"])
def show_deployment(deployment_id: str, r: Records, user: Viewer) -> dict[str, Any]:
    return r.get_deployment(user, deployment_id).to_dict()


@router.get("/instances", tags=["deployments"])
def list_instances(r: Records, user: Viewer, node: str | None = None,
                   deployment: str | None = None,
                   include_deleted: Annotated[bool, Query(alias="all")] = False,
                   ) -> dict[str, Any]:
    """Your instances (admins: everyone's), oldest first; `all=true` includes deleted ones."""
    found = r.list_instances(user, node=node, deployment=deployment,
                             include_deleted=include_deleted)
    return {"instances": [i.to_dict() for i in found]}


@router.get("/instances/{instance_id}", tags=["deployments"])
def show_instance(instance_id: str, r: Records, user: Viewer) -> dict[str, Any]:
    return r.get_instance(user, instance_id).to_dict()
