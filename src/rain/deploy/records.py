"""Deployments and instances, as the repository server records them in its catalog.

Deployments and instances are their owner's (and admins') business: anyone
else gets NotFound, as for images they may not see. The coordinator writes
them through the internal methods (no viewer) once the user's request was
checked.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from rain.catalog import Catalog, is_id_prefix, unique_prefix
from rain.model import (
    Deployment,
    Image,
    InstanceRecord,
    InvalidRequest,
    NotFound,
    TransferMethod,
    User,
)
from rain.repo.access import require_readable_data, require_user

MAX_PAGE = 1000


class DeploymentRecords:
    """Deployments and their instances in the repository's catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    # -- deployments -----------------------------------------------------------
    def new_deployment(self, viewer: User | None, image: Image, *, method: str, count: int,
                       nodes: Iterable[str], options: dict[str, Any],
                       prefetch: bool = False) -> Deployment:
        """Record a deployment of `image` (resolved through the viewer) as running."""
        user = require_user(viewer)
        require_readable_data(user, image)
        try:
            chosen = TransferMethod(str(method))
        except ValueError:
            raise InvalidRequest(f"unknown transfer method {method!r}: use one of "
                                 f"{', '.join(m.value for m in TransferMethod)}") from None
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= 100_000:
            raise InvalidRequest(f"bad count {count!r}: use a whole number from 0 to 100000")
        names = list(nodes)
        if not all(isinstance(n, str) for n in names):
            raise InvalidRequest("nodes must be a list of node names")
        if not isinstance(options, dict):
            raise InvalidRequest("options must be an object")
        return self.catalog.create_deployment(user, image_id=image.id, method=str(chosen),
                                              count=count, nodes=names, options=dict(options),
                                              prefetch=prefetch)

    def save_deployment(self, deployment_id: str, **fields: Any) -> Deployment:
        """Internal: status, report, error, nodes, finished (see Catalog.update_deployment)."""
        return self.catalog.update_deployment(deployment_id, **fields)

    def deployment_times(self, since: datetime) -> list[tuple[str, datetime]]:
        """Internal: (image id, created) of every deployment since `since` but prefetches,
        oldest first (what the prefetcher counts)."""
        return self.catalog.deployment_times(since)

    def get_deployment(self, viewer: User | None, deployment_id: str) -> Deployment:
        """The viewer's deployment (admins: any), by id or unique id prefix."""
        user = require_user(viewer)
        try:
            deployment = self.catalog.get_deployment(deployment_id)
        except NotFound:
            if not is_id_prefix(deployment_id):
                raise
            ids = self.catalog.deployment_ids_with_prefix(
                deployment_id, None if user.is_admin else user.id)
            return unique_prefix("deployment", deployment_id,
                                 [self.catalog.get_deployment(i) for i in ids],
                                 lambda d: f"{d.id} ({d.owner}, {d.status})")
        if not (user.is_admin or deployment.owner == user.name):
            raise NotFound(f"no deployment {deployment_id!r}")
        return deployment

    def list_deployments(self, viewer: User | None, *, image: str | None = None,
                         limit: int = 100, offset: int = 0) -> tuple[list[Deployment], int]:
        """Newest first: admins see all, others their own; `image` is an image ref."""
        user = require_user(viewer)
        if not 1 <= limit <= MAX_PAGE or offset < 0:
            raise InvalidRequest(f"limit must be 1-{MAX_PAGE} and offset >= 0")
        image_id = None
        if image:
            try:
                image_id = self.catalog.resolve(image, user).id
            except NotFound:
                # A deleted image is no longer resolvable, but its deployments are still
                # listed by its id (and only the viewer's own, unless an admin asks).
                image_id = image
        return self.catalog.list_deployments(owner_id=None if user.is_admin else user.id,
                                             image_id=image_id, limit=limit, offset=offset)

    # -- instances ---------------------------------------------------------------
    def add_instances(self, deployment: Deployment,
                      items: Iterable[tuple[str, str, str]]) -> list[InstanceRecord]:
        """Internal: `creating` records of (instance id, node, image id), owned by the
        deployment's owner."""
        owner = self.catalog.get_user(deployment.owner)
        return self.catalog.create_instances(owner, deployment.id, list(items))

    def set_instance(self, instance_id: str, **fields: Any) -> InstanceRecord:
        """Internal: status, disk, error, ready (see Catalog.update_instance)."""
        return self.catalog.update_instance(instance_id, **fields)

    def live_instance_counts(self) -> dict[str, int]:
        """Internal: instances being made or ready, per node (what placement counts before
        the nodes' next heartbeats)."""
        return self.catalog.live_instance_counts()

    def list_instances(self, viewer: User | None, *, node: str | None = None,
                       deployment: str | None = None,
                       include_deleted: bool = False) -> list[InstanceRecord]:
        """The viewer's instances (admins: everyone's), oldest first; `deployment` is an id
        or unique id prefix of one of the viewer's deployments (404 otherwise)."""
        user = require_user(viewer)
        if deployment:
            deployment = self.get_deployment(user, deployment).id
        return self.catalog.list_instances(owner_id=None if user.is_admin else user.id,
                                           node=node, deployment_id=deployment,
                                           include_deleted=include_deleted)

    def get_instance(self, viewer: User | None, instance_id: str) -> InstanceRecord:
        user = require_user(viewer)
        instance = self.catalog.get_instance(instance_id)
        if not (user.is_admin or instance.owner == user.name):
            raise NotFound(f"no instance {instance_id!r}")
        return instance
