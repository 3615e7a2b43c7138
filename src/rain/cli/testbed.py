"""`rain testbed up/down/status`: a cluster of network namespaces on this machine.

Registered in `rain.cli.main`. Like `serve`, these commands act on this
machine directly (through `rain.testbed`), not through a server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from rain.cli.options import Json
from rain.cli.output import err, out, print_json
from rain.testbed import DEFAULT_NAME, Testbed, find_data_dir, inspect
from rain.testbed import down as remove
from rain.testbed.teardown import existing_testbeds

app = typer.Typer(no_args_is_help=True,
                  help="A small cluster of network namespaces with rate-limited links, "
                       "on this machine (needs root).")

Name = Annotated[str, typer.Option("--name", help="Testbed name: namespaces are rain-NAME-*")]
TestbedDir = Annotated[Path | None, typer.Option(
    "--data-dir", help="Repository, caches, logs, state [default: /var/tmp/rain-testbed/NAME]")]


@app.command()
def up(nodes: Annotated[int, typer.Option("--nodes", help="Number of compute nodes")],
       rate: Annotated[str, typer.Option(
           "--rate", help="Each node's link, both directions: 50mbit, 1gbit, 800kbit, bits/s")],
       latency: Annotated[str | None, typer.Option(
           "--latency", help="One-way delay added to what each host sends: 5ms (needs netem)")]
       = None,
       repo_rate: Annotated[str | None, typer.Option(
           "--repo-rate", help="The repository's link [default: --rate]")] = None,
       mtu: Annotated[int, typer.Option(
           "--mtu", help="Every link's MTU (9000: jumbo frames, much less CPU per byte)")]
       = 1500,
       congestion: Annotated[str | None, typer.Option(
           "--congestion", help="Every host's TCP congestion control, not the machine's "
                                "default, so results are comparable [default: cubic, or the "
                                "machine's default where the kernel lacks cubic]")] = None,
       name: Name = DEFAULT_NAME, data_dir: TestbedDir = None,
       cache_size: Annotated[str, typer.Option(help="Each agent's cache size")] = "8G",
       capacity: Annotated[int, typer.Option(help="Instances per node")] = 8,
       agents: Annotated[bool, typer.Option(
           "--agents/--no-agents", help="Start a node agent in every node")] = True,
       server_arg: Annotated[list[str] | None, typer.Option(
           "--server-arg", help="Extra argument for `rain serve` (repeatable)")] = None,
       agent_arg: Annotated[list[str] | None, typer.Option(
           "--agent-arg", help="Extra argument for every `rain agent` (repeatable)")] = None,
       slot: Annotated[int | None, typer.Option(
           help="Address block 0-7 of 198.18.0.0/15 [default: the first free one]")] = None,
       timeout: Annotated[float, typer.Option(
           help="Seconds to wait for the repository and for each agent")] = 60.0,
       json: Json = False) -> None:
    """Create the namespaces and links, start the repository and the agents."""
    tb = Testbed(name, nodes, rate, data_dir, repo_rate=repo_rate, latency=latency, mtu=mtu,
                 congestion=congestion, cache_size=cache_size, capacity=capacity, agents=agents,
                 server_args=server_arg or [], agent_args=agent_arg or [], slot=slot,
                 timeout=timeout)
    tb.up()
    info = tb.describe()
    if json:
        print_json(info)
        return
    shaped = f"links {info['rate']}"
    if info["repo_rate"] != info["rate"]:
        shaped += f", repository {info['repo_rate']}"
    if info["latency"]:
        shaped += f", +{info['latency']} one way"
    if info["mtu"] != 1500:
        shaped += f", MTU {info['mtu']}"
    shaped += f", TCP {info['congestion']}"
    err.print(f"testbed {name} is up: {nodes} nodes{'' if agents else ' (no agents)'}, "
              f"{shaped}; data in {info['data_dir']}", markup=False, highlight=False)
    if info["congestion_note"]:
        err.print(f"note: {info['congestion_note']}", markup=False, highlight=False)
    _show(info)


def _show(info: dict[str, Any]) -> None:
    out.print(f"url    {info['url']}", markup=False, highlight=False)
    out.print(f"token  {info['token']}", markup=False, highlight=False)
    out.print("nodes  " + " ".join(n["name"] for n in info["nodes"]), markup=False,
              highlight=False)


@app.command()
def down(name: Name = DEFAULT_NAME, data_dir: TestbedDir = None,
         purge: Annotated[bool, typer.Option(
             "--purge", help="Also delete the repository, caches and logs")] = False,
         json: Json = False) -> None:
    """Remove all testbed NAME made: processes, namespaces, host link (also after a crash)."""
    removed = remove(name, data_dir, purge=purge)
    if json:
        print_json({"name": name, **removed.to_dict()})
    elif removed.anything:
        err.print(f"testbed {name}: removed {len(removed.namespaces)} namespaces, "
                  f"{removed.processes} processes"
                  f"{', the host link' if removed.host_link else ''}")
    else:
        err.print(f"testbed {name}: nothing to remove")


@app.command()
def status(name: Annotated[str | None, typer.Option(
               "--name", help="One testbed [default: list all]")] = None,
           data_dir: TestbedDir = None, json: Json = False) -> None:
    """Show which testbeds exist, or what exists of one."""
    if name is None:
        present = {n: inspect(n) for n in existing_testbeds()}
        if json:
            print_json(present)
            return
        if not present:
            err.print("no testbed on this machine")
        for n, info in present.items():
            state = info["state"] or {}
            procs = sum(info["namespaces"].values())
            out.print(f"{n}  {len(info['namespaces'])} namespaces, {procs} processes  "
                      f"{state.get('url', '(no state in ' + str(find_data_dir(n)) + ')')}",
                      markup=False, highlight=False)
        return
    info = inspect(name, data_dir)
    if json:
        print_json(info)
        return
    if not info["exists"]:
        err.print(f"testbed {name} does not exist")
        return
    for ns, procs in info["namespaces"].items():
        out.print(f"{ns}  {procs} processes", markup=False, highlight=False)
    if info["state"]:
        _show(info["state"])
