"""Python API over rain's HTTP service; the CLI, node agents and users' scripts use it."""

from rain.client.client import DEFAULT_URL, Client

__all__ = ["DEFAULT_URL", "Client"]
