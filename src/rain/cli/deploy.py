"""`rain nodes`, `rain deploy`, `rain deployments`, `rain prefetch`, `rain instance ...`."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rain.cli import values
from rain.cli.errors import WrongUsage
from rain.cli.options import Json, Token, Url, client
from rain.cli.output import err, out, print_json
from rain.model.deploy import DeployOptions
from rain.model.errors import RainError
from rain.model.units import format_bytes, parse_rate_bytes_per_second, parse_size, plural

instance_app = typer.Typer(no_args_is_help=True, help="Instance disks on nodes.")

Nodes = Annotated[str | None, typer.Option("--nodes", help="Comma-separated node names")]
All = Annotated[bool, typer.Option("--all", help="Every node that is up")]
Method = Annotated[str | None, typer.Option(
    "--method", help="auto | http | tree | multicast | bittorrent | chunks",
    parser=values.method)]
MaxRate = Annotated[str | None, typer.Option(
    "--max-rate", help="Cap each node's download, e.g. 200mbit", parser=values.rate)]


def nodes(url: Url = None, token: Token = None, json: Json = False) -> None:
    """The registered nodes: up or not, instances, cache."""
    found = client(url, token).nodes()
    if json:
        print_json(found)
        return
    table = Table(show_edge=False, header_style="bold")
    for col in ("NAME", "ADDRESS", "UP", "INSTANCES", "CACHE USED", "CACHED", "IN FLIGHT",
                "LAST HEARTBEAT"):
        table.add_column(col, overflow="fold")
    for n in found:
        table.add_row(n["name"], n["address"], "yes" if n.get("up") else "NO",
                      f"{n['running_instances']}/{n['capacity_instances']}",
                      f"{format_bytes(n['cache_used'])} of {format_bytes(n['cache_capacity'])}",
                      str(len(n.get("cached") or [])), str(len(n.get("in_flight") or [])),
                      (n.get("last_heartbeat") or "")[:19].replace("T", " "))
    out.print(table)


def deploy(
    image: str, node_names: Nodes = None, everyone: All = False,
    count: Annotated[int, typer.Option("--count", "-n", help="Instances to start")] = 1,
    method: Method = None,
    copy: Annotated[bool, typer.Option("--copy", help="Full disk copies, not overlays")]
    = False,
    size: Annotated[str | None, typer.Option(
        "--size", help="Grow each disk to, e.g. 20G", parser=values.size)] = None,
    ephemeral: Annotated[str | None, typer.Option(
        "--ephemeral", help="Add a sparse scratch disk of this size", parser=values.size)]
    = None,
    fanout: Annotated[int | None, typer.Option("--fanout", help="tree: children per node")]
    = None,
    stripes: Annotated[int | None, typer.Option(
        "--stripes", help="tree: number of trees sharing the image (1: a single tree)")] = None,
    encrypt: Annotated[bool, typer.Option("--encrypt", help="bittorrent: encrypted peers")]
    = False,
    rate: Annotated[str | None, typer.Option(
        "--rate", help="multicast: send rate cap, e.g. 100mbit", parser=values.rate)] = None,
    max_rate: MaxRate = None,
    max_holders: Annotated[int | None, typer.Option(
        "--max-holders", help="chunks: nodes outside the deployment that cache the image "
        "and are asked to serve it (0-64; default 8)")] = None,
    owner_wait: Annotated[float | None, typer.Option(
        "--owner-wait-seconds", help="chunks: how long a node waits for a silent owner's "
        "share before taking it from the repository (default 15)")] = None,
    stall: Annotated[float | None, typer.Option(
        "--stall-seconds", help="Give up on a silent source or node after this long "
        "(default: the server's [distribute] stall_seconds)")] = None,
    spread: Annotated[bool, typer.Option(
        "--spread", help="Instances on different nodes first (the usual default)")] = False,
    pack: Annotated[bool, typer.Option(
        "--pack", help="Fill the nodes that have the image before using others")] = False,
    follow: Annotated[bool, typer.Option("--follow", help="Show every node's progress")]
    = False,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the end")] = True,
    url: Url = None, token: Token = None, json: Json = False,
) -> None:
    """Start COUNT instances of IMAGE on nodes; the image moves by the best method."""
    if spread and pack:
        raise WrongUsage("give --spread or --pack, not both")
    targets = _targets(node_names, everyone)
    options = DeployOptions(
        size_bytes=_size(size), ephemeral_size_bytes=_size(ephemeral), copy=copy,
        fanout=fanout, stripes=stripes, encrypt=encrypt, rate_bytes_per_s=_rate(rate),
        max_rate_bytes_per_s=_rate(max_rate), stall_seconds=stall, max_holders=max_holders,
        owner_wait_seconds=owner_wait)
    c = client(url, token)
    dep = c.deploy(image, nodes=targets, all=everyone, count=count, method=method,
                   options=options, policy="spread" if spread else "pack" if pack else None)
    _finish(c, dep, follow=follow, wait=wait, json=json)


def prefetch(image: str, node_names: Nodes = None, everyone: All = False,
             method: Method = None,
             max_rate: MaxRate = None,
             follow: Annotated[bool, typer.Option("--follow")] = False,
             wait: Annotated[bool, typer.Option("--wait/--no-wait")] = True,
             url: Url = None, token: Token = None, json: Json = False) -> None:
    """Copy IMAGE into the nodes' caches now, so later deployments start at once."""
    targets = _targets(node_names, everyone)
    c = client(url, token)
    dep = c.prefetch(image, nodes=targets, all=everyone, method=method,
                     options=DeployOptions(max_rate_bytes_per_s=_rate(max_rate)))
    _finish(c, dep, follow=follow, wait=wait, json=json)


def deployments(deployment: Annotated[str | None, typer.Argument()] = None,
                image: Annotated[str | None, typer.Option("--image")] = None,
                cancel: Annotated[bool, typer.Option("--cancel", help="Stop it")] = False,
                limit: Annotated[int, typer.Option()] = 50,
                url: Url = None, token: Token = None, json: Json = False) -> None:
    """Your deployments, or one (with its report)."""
    c = client(url, token)
    if deployment:
        dep = c.cancel_deployment(deployment) if cancel else c.deployment(deployment)
        if json:
            print_json(dep)
        else:
            _report(dep)
        return
    found = c.deployments(image=image, limit=limit)
    if json:
        print_json(found)
        return
    table = Table(show_edge=False, header_style="bold")
    for col in ("ID", "IMAGE", "STATUS", "METHOD", "NODES", "INSTANCES", "MAKESPAN", "CREATED"):
        table.add_column(col, overflow="fold")
    for d in found["deployments"]:
        r = d.get("report") or {}
        table.add_row(d["id"][:8], d["image_id"][:8], d["status"] + (" (prefetch)"
                      if d.get("prefetch") else ""), str(r.get("method") or d["method"]),
                      str(len(d.get("nodes") or [])), str(d["count"]),
                      _secs(r.get("makespan_s")), (d.get("created") or "")[:19].replace("T", " "))
    out.print(table)


@instance_app.command("ls")
def instance_ls(node: Annotated[str | None, typer.Option("--node")] = None,
                deployment: Annotated[str | None, typer.Option("--deployment")] = None,
                include_deleted: Annotated[bool, typer.Option("--all", help="Deleted too")]
                = False,
                url: Url = None, token: Token = None, json: Json = False) -> None:
    """Instances you started (admins: everyone's)."""
    found = client(url, token).instances(node=node, deployment=deployment, all=include_deleted)
    if json:
        print_json(found)
        return
    table = Table(show_edge=False, header_style="bold")
    for col in ("ID", "NODE", "IMAGE", "STATUS", "DISK", "OWNER", "READY"):
        table.add_column(col, overflow="fold")
    for i in found:
        table.add_row(i["id"], i["node"], i["image_id"][:8], i["status"], i.get("disk") or "",
                      i["owner"], (i.get("ready") or "")[:19].replace("T", " "))
    out.print(table)


@instance_app.command("rm")
def instance_rm(instance: Annotated[list[str], typer.Argument(help="Instance ids")],
                forget: Annotated[bool, typer.Option(
                    "--forget", help="Close the record even if the node does not answer "
                    "(a node gone for good)")] = False,
                url: Url = None, token: Token = None, json: Json = False) -> None:
    """Delete instances' disks on their nodes."""
    c = client(url, token)
    done = [c.delete_instance(i, forget=forget) for i in instance]
    if json:
        print_json(done)
    else:
        for i in done:
            err.print(f"deleted {i['id']} on {i['node']}")


# -- helpers ---------------------------------------------------------------------------
def _targets(value: str | None, everyone: bool) -> list[str] | None:
    """The node names of `--nodes N1,N2`; a usage error unless exactly one of it and
    `--all` is given (the server would refuse it too, in the API's terms)."""
    names = [n.strip() for n in value.split(",") if n.strip()] if value else None
    if everyone and names:
        raise WrongUsage("give --nodes N1,N2 or --all, not both")
    if not everyone and not names:
        raise WrongUsage("give --nodes N1,N2 or --all")
    return names


def _size(text: str | None) -> int | None:
    return None if text is None else parse_size(text)


def _rate(text: str | None) -> float | None:
    return None if text is None else parse_rate_bytes_per_second(text)


def _finish(c: Any, dep: dict[str, Any], *, follow: bool, wait: bool, json: bool) -> None:
    if not wait:
        print_json(dep) if json else print(dep["id"])
        return
    shown: dict[str, str] = {}

    def update(d: dict[str, Any]) -> None:
        if not follow:
            return
        for name, n in sorted(((d.get("report") or {}).get("per_node") or {}).items()):
            line = f"{name}: {n['state']} {100 * n.get('progress', 0):.0f}%"
            if n.get("error"):
                line += f" — {n['error']}"
            if shown.get(name) != line:
                shown[name] = line
                sys.stderr.write(line + "\n")
        sys.stderr.flush()

    if not json and not follow:
        err.print(f"deployment {dep['id']} started", markup=False, highlight=False)
    with deployment_progress(dep) as bar:
        def show(d: dict[str, Any]) -> None:
            update(d)
            if bar is not None:
                bar(d)

        final = c.follow_deployment(dep["id"], show)
    if json:
        print_json({**(final.get("report") or {}), "id": final["id"],
                    "status": final["status"], "image_id": final["image_id"],
                    "count": final["count"], "error": final.get("error")})
    else:
        _report(final)
    if final["status"] != "ready":
        raise RainError(f"deployment {final['id']} {final['status']}: "
                        f"{final.get('error') or 'see its report'}")


@contextmanager
def deployment_progress(dep: dict[str, Any]) -> Iterator[Any]:
    """On a terminal: a bar of the image's progress over all nodes, and nodes ready."""
    if not err.is_terminal:
        yield None
        return
    with Progress("[progress.description]{task.description}", BarColumn(),
                  "{task.percentage:>3.0f}%", TextColumn("{task.fields[ready]}"),
                  TimeElapsedColumn(), console=err, transient=True) as progress:
        task = progress.add_task(f"deploy {dep['id'][:8]}", total=1.0, ready="")

        def bar(d: dict[str, Any]) -> None:
            nodes = ((d.get("report") or {}).get("per_node") or {}).values()
            if not nodes:
                return
            done = sum(1 for n in nodes if n.get("state") == "ready")
            share = sum(float(n.get("progress") or 0.0) for n in nodes) / len(nodes)
            progress.update(task, completed=share, ready=f"{done}/{len(nodes)} nodes ready")

        yield bar


def _report(d: dict[str, Any]) -> None:
    r = d.get("report") or {}
    table = Table(show_edge=False, header_style="bold")
    for col in ("NODE", "STATE", "SOURCE", "FETCHED", "READY", "INSTANCES", "FROM REPO",
                "FROM PEERS", "TO PEERS", "NOTE"):
        table.add_column(col, overflow="fold")
    for name, n in sorted((r.get("per_node") or {}).items()):
        note = n.get("error") or (f"fallback: {n['fallback']}" if n.get("fallback") else "")
        if n.get("dropped"):
            note = (note + "; " if note else "") + f"dropped {plural(len(n['dropped']), 'source')}"
        table.add_row(name, n["state"], n.get("source") or "", _secs(n.get("fetched_s")),
                      _secs(n.get("ready_s")), str(len(n.get("instances") or [])),
                      format_bytes(n.get("repo_bytes")), format_bytes(n.get("peer_bytes")),
                      format_bytes(n.get("sent_bytes")), note)
    out.print(table)
    what = "prefetch" if d.get("prefetch") else plural(r.get("instances_ready", 0), "instance")
    out.print(f"{d['status']}: {what} on {plural(len(r.get('per_node') or {}), 'node')}, "
              f"makespan {_secs(r.get('makespan_s'))} (first ready "
              f"{_secs(r.get('first_ready_s'))}), method {r.get('method') or d['method']}"
              f" ({r.get('method_reason') or ''}){_placed(r.get('placement'))}; repository "
              f"sent {format_bytes(r.get('repo_bytes_sent'))}, nodes sent each other "
              f"{format_bytes(r.get('peer_bytes_sent'))}", markup=False, highlight=False)


def _placed(placement: dict[str, Any] | None) -> str:
    """`, placed by spread (the server's default)` or `, placed by pack (asked)`."""
    if not placement:
        return ""
    how = "asked" if placement.get("asked") else "the server's default"
    return f", placed by {placement.get('policy')} ({how})"


def _secs(value: Any) -> str:
    return "-" if value is None else f"{float(value):.2f} s"
