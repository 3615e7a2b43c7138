"""Node agents in the catalog: who is registered, where, and what each said last.

A report is the agent's view of itself (capacity, cache, version); the
repository validates it before it gets here. `agent_key` is kept apart from
the `Node` model so nothing that prints a node can leak it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rain.catalog.db import Database, as_utc
from rain.catalog.schema import NodeRow
from rain.model import Node, NotFound
from rain.model.clock import utcnow

# The fields of a report, with the value a registration without them gets.
REPORT_DEFAULTS: dict[str, Any] = {
    "capacity_instances": 0, "running_instances": 0, "cache_capacity": 0, "cache_used": 0,
    "cache_pinned": 0, "cached": [], "in_flight": [], "version": "",
}
REPORT_FIELDS = frozenset({"address", *REPORT_DEFAULTS})


def node_model(row: NodeRow) -> Node:
    return Node(
        name=row.name, address=row.address, capacity_instances=row.capacity_instances,
        running_instances=row.running_instances, cache_capacity=row.cache_capacity,
        cache_used=row.cache_used, cache_pinned=row.cache_pinned, cached=list(row.cached or []),
        in_flight=list(row.in_flight or []), version=row.version,
        registered=as_utc(row.registered), last_heartbeat=as_utc(row.last_heartbeat),
    )


def _apply(row: NodeRow, report: dict[str, Any]) -> None:
    for key, value in report.items():
        if key in REPORT_FIELDS:
            # Fresh lists: JSON columns only notice assignment, not mutation.
            setattr(row, key, list(value) if isinstance(value, list | tuple) else value)


class NodeCatalog:
    db: Database

    def upsert_node(self, name: str, *, address: str, agent_key: str, owner_id: int | None,
                    report: dict[str, Any]) -> Node:
        """Register `name`, or register it again: a registration is the node's whole state,
        so what the report leaves out goes back to its default; `registered` is kept."""
        for attempt in range(2):
            now = utcnow()
            try:
                with self.db.session() as s:
                    row = s.get(NodeRow, name, with_for_update=True)
                    if row is None:
                        row = NodeRow(name=name, registered=now)
                        s.add(row)
                    _apply(row, {**REPORT_DEFAULTS, **report})
                    row.address, row.agent_key, row.owner_id = address, agent_key, owner_id
                    row.last_heartbeat = now
                    s.flush()
                    return node_model(row)
            except IntegrityError:
                # Two first registrations of one name raced; the second one updates.
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def node_heartbeat(self, name: str, report: dict[str, Any]) -> Node:
        """The agent is alive; the fields it reports replace the old ones, the rest stay.
        An `agent_key` in the report replaces the key."""
        with self.db.session() as s:
            row = self._node_row(s, name)
            _apply(row, report)
            if report.get("agent_key"):
                row.agent_key = str(report["agent_key"])
            row.last_heartbeat = utcnow()
            s.flush()
            return node_model(row)

    def note_cached(self, name: str, image_id: str) -> None:
        """`image_id` is verified on `name` now: cached, no longer in flight, until the
        node's next heartbeat says otherwise. Not a heartbeat: `last_heartbeat` stays."""
        with self.db.session() as s:
            row = s.get(NodeRow, name, with_for_update=True)
            if row is None:
                return
            if image_id not in (row.cached or []):
                row.cached = [*(row.cached or []), image_id]
            if image_id in (row.in_flight or []):
                row.in_flight = [i for i in row.in_flight if i != image_id]

    def get_node(self, name: str) -> Node:
        with self.db.session() as s:
            return node_model(self._node_row(s, name))

    def node_agent_key(self, name: str) -> str:
        with self.db.session() as s:
            return self._node_row(s, name).agent_key

    def list_nodes(self) -> list[Node]:
        with self.db.session() as s:
            return [node_model(r) for r in s.scalars(select(NodeRow).order_by(NodeRow.name))]

    def delete_node(self, name: str) -> None:
        with self.db.session() as s:
            res = s.execute(delete(NodeRow).where(NodeRow.name == name))
            if not res.rowcount:  # type: ignore[attr-defined]
                raise NotFound(f"no node {name!r}")

    @staticmethod
    def _node_row(s: Session, name: str) -> NodeRow:
        row = s.get(NodeRow, name)
        if row is None:
            raise NotFound(f"no node {name!r}")
        return row
