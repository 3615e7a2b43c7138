"""`rain agent`: run the node agent on a compute node (server-side: no rain.client calls)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from rain.cli import values
from rain.model.errors import InvalidRequest
from rain.model.units import parse_size


def agent(
    name: Annotated[str, typer.Option("--name", help="This node's name")],
    repo: Annotated[str, typer.Option("--repo", envvar="RAIN_URL",
                                      help="Repository URL, e.g. http://10.0.0.1:8480")],
    token: Annotated[str, typer.Option("--token", envvar="RAIN_TOKEN",
                                       help="This node's token (rain token create --node NAME)")],
    cache_dir: Annotated[Path, typer.Option("--cache-dir", help="Node cache directory")],
    cache_size: Annotated[str, typer.Option(
        "--cache-size", help="e.g. 50G", parser=values.size)] = "16G",
    listen: Annotated[str, typer.Option(
        "--listen", help="HOST:PORT the agent listens on")] = "0.0.0.0:8481",
    advertise: Annotated[str | None, typer.Option(
        "--advertise", help="URL others reach this agent at [default: from --listen]")] = None,
    capacity: Annotated[int, typer.Option("--capacity", help="Instances this node can run")] = 8,
    heartbeat: Annotated[float, typer.Option("--heartbeat", help="Seconds between reports")]
    = 5.0,
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key")] = None,
    ca: Annotated[Path | None, typer.Option("--ca", help="CA to verify the repository")]
    = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the node agent: cache, transfers, instance disks (stays in the foreground)."""
    from rain.agent import Agent, AgentConfig

    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidRequest(f"bad --listen {listen!r}: use HOST:PORT")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    cfg = AgentConfig(name=name, repo_url=repo.rstrip("/"), token=token, cache_dir=cache_dir,
                      cache_size=parse_size(cache_size), listen_host=host or "0.0.0.0",
                      listen_port=int(port), advertise=advertise or "",
                      capacity_instances=capacity, heartbeat_seconds=heartbeat,
                      tls_cert=tls_cert, tls_key=tls_key, ca_file=ca)
    a = Agent(cfg)
    a.bind()
    typer.echo(f"rain agent {name} on {a.address} (repository {cfg.repo_url})", err=True)
    a.serve_forever()
