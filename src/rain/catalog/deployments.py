"""Deployments and the instances they made, in the catalog.

A deployment row is written when `rain deploy` (or the prefetcher) starts
and updated as the coordinator learns how it went; `deployment_times` is
the popularity prefetcher's input. Instance rows outlive their node (no
foreign key on `node`) so the history of a removed node stays readable.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rain.catalog.db import Database, as_utc
from rain.catalog.references import ids_with_prefix
from rain.catalog.schema import DeploymentRow, ImageRow, InstanceRow
from rain.model import (
    Conflict,
    Deployment,
    DeploymentStatus,
    InstanceRecord,
    InstanceStatus,
    NotFound,
    User,
)
from rain.model.clock import utcnow


def deployment_model(row: DeploymentRow) -> Deployment:
    return Deployment(
        id=row.id, owner=row.owner.name, image_id=row.image_id, method=row.method,
        count=row.count, nodes=list(row.nodes or []), status=DeploymentStatus(row.status),
        report=dict(row.report or {}), options=dict(row.options or {}), error=row.error,
        prefetch=row.prefetch, created=as_utc(row.created), finished=as_utc(row.finished),
    )


def instance_model(row: InstanceRow) -> InstanceRecord:
    return InstanceRecord(
        id=row.id, deployment_id=row.deployment_id, owner=row.owner.name, node=row.node,
        image_id=row.image_id, status=InstanceStatus(row.status), disk=row.disk,
        error=row.error, created=as_utc(row.created), ready=as_utc(row.ready),
    )


class DeploymentCatalog:
    db: Database

    # -- deployments ---------------------------------------------------------
    def create_deployment(self, owner: User, *, image_id: str, method: str, count: int,
                          nodes: Iterable[str], options: dict[str, Any],
                          prefetch: bool = False) -> Deployment:
        with self.db.session() as s:
            if s.get(ImageRow, image_id) is None:
                raise NotFound(f"no image {image_id!r}")
            row = DeploymentRow(
                id=str(uuid.uuid4()), owner_id=owner.id, image_id=image_id, method=str(method),
                count=count, nodes=list(nodes), status=str(DeploymentStatus.RUNNING),
                report={}, options=dict(options), error=None, prefetch=prefetch,
                created=utcnow(), finished=None)
            s.add(row)
            s.flush()
            s.refresh(row)
            return deployment_model(row)

    def update_deployment(self, deployment_id: str, *, status: DeploymentStatus | str | None = None,
                          report: dict[str, Any] | None = None, error: str | None = None,
                          nodes: Iterable[str] | None = None,
                          finished: datetime | None = None) -> Deployment:
        """Set the fields given. A status that is final stamps `finished` (now, unless
        given) the first time; `report` replaces the whole report."""
        with self.db.session() as s:
            row = self._deployment_row(s, deployment_id)
            if status is not None:
                row.status = str(DeploymentStatus(status))
                if DeploymentStatus(status).finished and finished is None and not row.finished:
                    finished = utcnow()
            if report is not None:
                row.report = dict(report)
            if error is not None:
                row.error = error
            if nodes is not None:
                row.nodes = list(nodes)
            if finished is not None:
                row.finished = finished
            s.flush()
            return deployment_model(row)

    def get_deployment(self, deployment_id: str) -> Deployment:
        with self.db.session() as s:
            return deployment_model(self._deployment_row(s, deployment_id))

    def deployment_ids_with_prefix(self, prefix: str, owner_id: int | None) -> list[str]:
        """Deployment ids starting with `prefix`: `owner_id`'s, or everyone's for None."""
        where = [DeploymentRow.owner_id == owner_id] if owner_id is not None else []
        with self.db.session() as s:
            return ids_with_prefix(s, DeploymentRow.id, prefix, *where)

    def list_deployments(self, *, owner_id: int | None = None, image_id: str | None = None,
                         since: datetime | None = None,
                         status: DeploymentStatus | str | None = None, limit: int = 100,
                         offset: int = 0) -> tuple[list[Deployment], int]:
        """Newest first, and how many match in all."""
        stmt = select(DeploymentRow)
        if owner_id is not None:
            stmt = stmt.where(DeploymentRow.owner_id == owner_id)
        if image_id is not None:
            stmt = stmt.where(DeploymentRow.image_id == image_id)
        if since is not None:
            stmt = stmt.where(DeploymentRow.created >= since)
        if status is not None:
            stmt = stmt.where(DeploymentRow.status == str(DeploymentStatus(status)))
        with self.db.session() as s:
            total = s.scalar(select(func.count()).select_from(stmt.subquery())) or 0
            rows = s.scalars(stmt.order_by(DeploymentRow.created.desc(), DeploymentRow.id)
                             .limit(limit).offset(offset)).all()
            return [deployment_model(r) for r in rows], total

    def deployment_times(self, since: datetime, *,
                         include_prefetch: bool = False) -> list[tuple[str, datetime]]:
        """(image id, created) of every deployment since `since`, oldest first: what
        `rain.schedule.popular_images` counts. Prefetches are left out unless asked
        for (they would make popular images look more popular still)."""
        stmt = select(DeploymentRow.image_id, DeploymentRow.created).where(
            DeploymentRow.created >= since)
        if not include_prefetch:
            stmt = stmt.where(DeploymentRow.prefetch.is_(False))
        with self.db.session() as s:
            rows = s.execute(stmt.order_by(DeploymentRow.created, DeploymentRow.id)).all()
        return [(image_id, as_utc(created) or created) for image_id, created in rows]

    # -- instances -----------------------------------------------------------
    def create_instances(self, owner: User, deployment_id: str,
                         items: Iterable[tuple[str, str, str]]) -> list[InstanceRecord]:
        """One `creating` record per (instance id, node, image id)."""
        now = utcnow()
        try:
            with self.db.session() as s:
                self._deployment_row(s, deployment_id)
                rows = [InstanceRow(id=instance_id, deployment_id=deployment_id,
                                    owner_id=owner.id, node=node, image_id=image_id,
                                    status=str(InstanceStatus.CREATING), disk="", error=None,
                                    created=now, ready=None)
                        for instance_id, node, image_id in items]
                s.add_all(rows)
                s.flush()
                for row in rows:
                    s.refresh(row)
                return [instance_model(r) for r in rows]
        except IntegrityError:
            raise Conflict("an instance with one of these ids already exists") from None

    def update_instance(self, instance_id: str, *, status: InstanceStatus | str | None = None,
                        disk: str | None = None, error: str | None = None,
                        ready: datetime | None = None) -> InstanceRecord:
        """Set the fields given; becoming `ready` stamps `ready` (now, unless given)."""
        with self.db.session() as s:
            row = self._instance_row(s, instance_id)
            if status is not None:
                row.status = str(InstanceStatus(status))
                if InstanceStatus(status) == InstanceStatus.READY and ready is None \
                        and not row.ready:
                    ready = utcnow()
            if disk is not None:
                row.disk = disk
            if error is not None:
                row.error = error
            if ready is not None:
                row.ready = ready
            s.flush()
            return instance_model(row)

    def get_instance(self, instance_id: str) -> InstanceRecord:
        with self.db.session() as s:
            return instance_model(self._instance_row(s, instance_id))

    def list_instances(self, *, owner_id: int | None = None, node: str | None = None,
                       deployment_id: str | None = None,
                       include_deleted: bool = False) -> list[InstanceRecord]:
        """Oldest first."""
        stmt = select(InstanceRow)
        if owner_id is not None:
            stmt = stmt.where(InstanceRow.owner_id == owner_id)
        if node is not None:
            stmt = stmt.where(InstanceRow.node == node)
        if deployment_id is not None:
            stmt = stmt.where(InstanceRow.deployment_id == deployment_id)
        if not include_deleted:
            stmt = stmt.where(InstanceRow.status != str(InstanceStatus.DELETED))
        with self.db.session() as s:
            rows = s.scalars(stmt.order_by(InstanceRow.created, InstanceRow.id)).all()
            return [instance_model(r) for r in rows]

    def live_instance_counts(self, image_id: str | None = None) -> dict[str, int]:
        """Instances being made or ready (of `image_id`, if given), per node: what the
        repository itself has put there (heartbeats say the same, but only every few
        seconds)."""
        live = [str(InstanceStatus.CREATING), str(InstanceStatus.READY)]
        stmt = select(InstanceRow.node, func.count()).where(InstanceRow.status.in_(live))
        if image_id is not None:
            stmt = stmt.where(InstanceRow.image_id == image_id)
        stmt = stmt.group_by(InstanceRow.node)
        with self.db.session() as s:
            return {str(node): int(n) for node, n in s.execute(stmt).all()}

    @staticmethod
    def _deployment_row(s: Session, deployment_id: str) -> DeploymentRow:
        row = s.get(DeploymentRow, deployment_id)
        if row is None:
            raise NotFound(f"no deployment {deployment_id!r}")
        return row

    @staticmethod
    def _instance_row(s: Session, instance_id: str) -> InstanceRow:
        row = s.get(InstanceRow, instance_id)
        if row is None:
            raise NotFound(f"no instance {instance_id!r}")
        return row
