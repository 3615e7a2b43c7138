"""Putting images on compute nodes: the node cache and instance disks (issue 4).

`NodeCache` keeps verified images on a node within a size bound; `Instances`
makes copy-on-write (or fully copied) instance disks over them and pins the
images they use so the cache never evicts a live disk's backing file.
The node agent (`rain.distribute.agent`), the transfer methods
(`rain.distribute.methods`) and the coordinator the repository runs
(`rain.distribute.coordinator`) build on these.
"""

from rain.distribute.agent import Agent, AgentConfig
from rain.distribute.cache import CachedImage, NodeCache
from rain.distribute.instances import Instance, Instances

__all__ = ["Agent", "AgentConfig", "CachedImage", "Instance", "Instances", "NodeCache"]
