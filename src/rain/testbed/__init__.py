"""A cluster of network namespaces on one machine, for tests and benchmarks of deployment.

See docs/testbed.md. `Testbed` is the Python API; `rain testbed up/down` the CLI.
"""

from rain.testbed.plan import Host, Shaping, check_link_delay, check_link_rate
from rain.testbed.testbed import (
    DEFAULT_NAME,
    LinkBytes,
    Testbed,
    default_data_dir,
    down,
    find_data_dir,
    inspect,
)

__all__ = [
    "DEFAULT_NAME",
    "Host",
    "LinkBytes",
    "Shaping",
    "Testbed",
    "check_link_delay",
    "check_link_rate",
    "default_data_dir",
    "down",
    "find_data_dir",
    "inspect",
]
