"""The node agent: `rain agent` on every compute node (issue 4).

It registers the node with the repository and keeps reporting (heartbeats),
keeps the node cache (`NodeCache`), fetches images by the method a deployment
asks for, makes copy-on-write instance disks (`Instances`), and serves
verified chunks to the deployment's other nodes. The repository drives it over
a small authenticated HTTP API (docs/agent.md).
"""

from rain.agent.cache import CachedImage, NodeCache
from rain.agent.config import AgentConfig
from rain.agent.instances import Instance, Instances
from rain.agent.node import Agent

__all__ = ["Agent", "AgentConfig", "CachedImage", "Instance", "Instances", "NodeCache"]
