"""Putting images on compute nodes: the node cache and instance disks (issue 4).

`NodeCache` keeps verified images on a node within a size bound; `Instances`
makes copy-on-write (or fully copied) instance disks over them and pins the
images they use so the cache never evicts a live disk's backing file.
Transfer methods and the node agent will build on these.
"""

from rain.distribute.cache import CachedImage, NodeCache
from rain.distribute.instances import Instance, Instances

__all__ = ["CachedImage", "Instance", "Instances", "NodeCache"]
