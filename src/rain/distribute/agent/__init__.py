"""The node agent: `rain agent` on every compute node (issue 4).

It registers the node with the repository and keeps reporting (heartbeats),
keeps the node cache, fetches images by the method a deployment asks for,
makes instance disks, and serves verified chunks to the deployment's other
nodes. The repository drives it over a small authenticated HTTP API
(docs/agent.md).
"""

from rain.distribute.agent.config import AgentConfig
from rain.distribute.agent.node import Agent

__all__ = ["Agent", "AgentConfig"]
