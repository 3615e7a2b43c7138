"""What a node agent reports when it registers, for API tests that play the agent."""

from __future__ import annotations

from typing import Any

KEY = "agent-key-0123456789abcdef"


def report(name: str = "n1", **kw: Any) -> dict[str, Any]:
    return {"name": name, "address": "http://198.18.0.11:8481", "agent_key": KEY,
            "capacity_instances": 8, "running_instances": 0, "cache_capacity": 10 << 30,
            "cache_used": 0, "cached": [], "in_flight": [], "version": "0.1.0", **kw}
