"""Node agents as the repository knows them: registration, heartbeats, who is up.

Agents run with a node token (bound to one node name) or an admin token:
registering and reporting a node takes one of them, removing it an admin;
any user may see the nodes. What an agent reports is checked here field by
field (a report is untrusted input), and its `agent_key` — the bearer token
the repository sends back when it calls the agent — is kept by the catalog
and handed out only by `agent_endpoint`.
"""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from rain.catalog import Catalog
from rain.model import InvalidRequest, Node, NodeState, User
from rain.model.clock import utcnow
from rain.model.node import check_node_name
from rain.repo.access import require_admin, require_agent, require_user
from rain.repo.config import RepoConfig

AGENT_KEY = re.compile(r"[A-Za-z0-9_-]{16,128}")
INT_LIMITS = {"capacity_instances": 2**31 - 1, "running_instances": 2**31 - 1,
              "cache_capacity": 2**63 - 1, "cache_used": 2**63 - 1, "cache_pinned": 2**63 - 1}
LIST_FIELDS = ("cached", "in_flight")
MAX_LIST = 100_000
REPORT_KEYS = frozenset({"name", "address", "agent_key", "version", *INT_LIMITS, *LIST_FIELDS})


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_address(address: Any) -> str:
    """An http(s) base URL with a host and a port, e.g. http://198.18.0.11:8481."""
    bad = InvalidRequest(f"bad node address {_shown(address)}: use http://HOST:PORT or "
                         "https://HOST:PORT")
    if not isinstance(address, str) or len(address) > 255 or not address.isprintable() \
            or any(c.isspace() for c in address):
        raise bad
    try:
        url = urlsplit(address)
        port = url.port
    except ValueError:
        raise bad from None
    if url.scheme not in ("http", "https") or not url.hostname or port is None or port == 0 \
            or url.username is not None or url.query or url.fragment:
        raise bad
    return address.rstrip("/")


def check_agent_key(key: Any) -> str:
    # Never echo it: it is a secret even when malformed.
    if not isinstance(key, str) or not AGENT_KEY.fullmatch(key):
        raise InvalidRequest("bad agent_key: use 16-128 characters of A-Z, a-z, 0-9, '-', '_'")
    return key


def check_report(report: Any, *, registering: bool) -> dict[str, Any]:
    """The report's fields, checked; `name`, `address`, `agent_key` are required to register."""
    if not isinstance(report, dict):
        raise InvalidRequest("a node report must be a JSON object")
    unknown = set(report) - REPORT_KEYS
    if unknown:
        raise InvalidRequest(f"unknown node fields: {', '.join(sorted(map(str, unknown)))} "
                             f"(known: {', '.join(sorted(REPORT_KEYS))})")
    if registering:
        missing = [k for k in ("name", "address", "agent_key") if report.get(k) is None]
        if missing:
            raise InvalidRequest(f"registering a node needs {', '.join(missing)}")
    out: dict[str, Any] = {}
    for key, value in report.items():
        if key == "name":
            out[key] = check_node_name(value)
        elif key == "address":
            out[key] = check_address(value)
        elif key == "agent_key":
            out[key] = check_agent_key(value)
        elif key == "version":
            if not isinstance(value, str) or len(value) > 64 or not value.isprintable():
                raise InvalidRequest(f"bad node version {_shown(value)}: use a string of at "
                                     "most 64 printable characters")
            out[key] = value
        elif key in INT_LIMITS:
            if not isinstance(value, int) or isinstance(value, bool) or not (
                    0 <= value <= INT_LIMITS[key]):
                raise InvalidRequest(f"bad {key} {_shown(value)}: use a whole number from 0 to "
                                     f"{INT_LIMITS[key]}")
            out[key] = value
        else:  # cached, in_flight: image ids
            if not isinstance(value, list) or len(value) > MAX_LIST or not all(
                    isinstance(v, str) and 0 < len(v) <= 128 for v in value):
                raise InvalidRequest(f"bad {key}: use a list of image ids (strings)")
            out[key] = list(dict.fromkeys(value))
    return out


class NodeRegistry:
    """The repository server's nodes, kept in its catalog."""

    def __init__(self, catalog: Catalog, config: RepoConfig) -> None:
        self.catalog = catalog
        self.config = config  # node_timeout_seconds

    def register_node(self, viewer: User | None, report: dict[str, Any]) -> Node:
        """Admin or the node's token: register a node, or register it again (a restarted
        agent, maybe on another port: its address and key are replaced). A registration
        is the node's whole state; what it leaves out is reset to 0 / empty."""
        require_agent(viewer)
        fields = check_report(report, registering=True)
        name, address, key = fields.pop("name"), fields.pop("address"), fields.pop("agent_key")
        user = require_agent(viewer, name)
        return self.catalog.upsert_node(name, address=address, agent_key=key,
                                        owner_id=None if user.node else user.id, report=fields)

    def node_heartbeat(self, viewer: User | None, name: str, report: dict[str, Any]) -> Node:
        """Admin or the node's token: the agent is alive; the fields it sends replace the
        old ones."""
        require_agent(viewer, name)
        fields = check_report(report, registering=False)
        if fields.pop("name", name) != name:
            raise InvalidRequest(f"the report names node {report['name']!r}, not {name!r}")
        return self.catalog.node_heartbeat(name, fields)

    def list_nodes(self, viewer: User | None) -> list[Node]:
        return self._as_seen_by(require_user(viewer), self.catalog.list_nodes())

    def get_node(self, viewer: User | None, name: str) -> Node:
        return self._as_seen_by(require_user(viewer), [self.catalog.get_node(name)])[0]

    def _as_seen_by(self, viewer: User, nodes: list[Node]) -> list[Node]:
        """Node caches list only the images the viewer may see (admins: all)."""
        if viewer.is_admin:
            return nodes
        seen = self.catalog.visible_image_ids(
            [i for n in nodes for i in (*n.cached, *n.in_flight)], viewer)
        return [replace(n, cached=[i for i in n.cached if i in seen],
                        in_flight=[i for i in n.in_flight if i in seen]) for n in nodes]

    def remove_node(self, viewer: User | None, name: str) -> Node:
        """Admin: forget a node (the records of its instances stay); returns it."""
        require_admin(viewer)
        node = self.catalog.get_node(name)
        self.catalog.delete_node(name)
        return node

    # -- for the server's own scheduler and coordinator (no viewer) -------------
    def node_up(self, node: Node, now: datetime | None = None) -> bool:
        """Whether the node reported within `node_timeout_seconds` (of `now`)."""
        if node.last_heartbeat is None:
            return False
        age = (now or utcnow()) - node.last_heartbeat
        return age <= timedelta(seconds=self.config.node_timeout_seconds)

    def node_states(self, now: datetime | None = None) -> list[NodeState]:
        """Every registered node as the scheduler sees it, by name."""
        now = now or utcnow()
        return [NodeState(
            name=n.name, address=n.address, up=self.node_up(n, now),
            capacity_instances=n.capacity_instances, running_instances=n.running_instances,
            free_cache_bytes=n.free_cache_bytes, cached=frozenset(n.cached),
            in_flight=frozenset(n.in_flight), last_heartbeat=n.last_heartbeat,
        ) for n in self.catalog.list_nodes()]

    def agent_endpoint(self, name: str) -> tuple[str, str]:
        """(address, agent key) to call node `name`'s agent with."""
        return self.catalog.get_node(name).address, self.catalog.node_agent_key(name)

    def note_cached(self, name: str, image_id: str) -> None:
        """A deployment verified `image_id` on node `name`: placement and `auto` see it
        before the node's next heartbeat."""
        self.catalog.note_cached(name, image_id)
