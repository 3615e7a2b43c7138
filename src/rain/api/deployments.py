"""`POST /v1/deployments` (rain.deploy.service places the instances and has the
coordinator move the image), cancelling one, and instance removal: the routes only
parse, authorise and serialise."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse

from rain.api.deps import viewer
from rain.deploy.service import DeploymentRequest, DeploymentService
from rain.model import User
from rain.model.deploy import DeployOptions

router = APIRouter(prefix="/v1", tags=["deployments"])
Viewer = Annotated[User | None, Depends(viewer)]


def deployments(request: Request) -> DeploymentService:
    service: DeploymentService = request.app.state.deployments
    return service


Deployments = Annotated[DeploymentService, Depends(deployments)]


@router.post("/deployments", status_code=202)
def create_deployment(d: Deployments, user: Viewer,
                      body: Annotated[dict[str, Any], Body()]) -> JSONResponse:
    """Start instances of an image on nodes, or (`prefetch`) only copy it there.

    Body: `{"image": REF, "nodes": [NAME, ...] | "all": true, "count": N,
    "method": auto|http|tree|multicast|bittorrent|chunks, "policy": spread|pack,
    "options": {...}, "prefetch": false}`. `policy` (default: the server's
    `[schedule]` multipliers, spread unless changed) decides whether the
    instances go to different nodes or fill few; the report's `placement` says
    which placed them. `options`: rain.model.deploy.DeployOptions (docs/api.md
    lists them). The answer is the deployment (202); follow it with
    GET /v1/deployments/{id}.
    """
    req = DeploymentRequest(
        image=str(body.get("image") or ""), nodes=body.get("nodes"),
        all_nodes=bool(body.get("all", False)), count=body.get("count"),
        method=body.get("method") or None, policy=body.get("policy"),
        options=DeployOptions.from_json(body.get("options")),
        prefetch=bool(body.get("prefetch", False)))
    return JSONResponse(d.create(user, req).to_dict(), status_code=202)


@router.post("/deployments/{deployment_id}/cancel")
def cancel_deployment(deployment_id: str, d: Deployments, user: Viewer) -> dict[str, Any]:
    return d.cancel(user, deployment_id).to_dict()


@router.delete("/instances/{instance_id}")
def delete_instance(instance_id: str, d: Deployments, user: Viewer,
                    forget: bool = False) -> dict[str, Any]:
    """Delete an instance's disks on its node (owner or admin).

    `forget=true` is for a node that is gone for good: when its agent does not answer
    the record is closed anyway (the disk, if the node ever returns, stays there)."""
    return d.delete_instance(user, instance_id, forget=forget).to_dict()
