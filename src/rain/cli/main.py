"""`rain` command line. Server-side commands (`serve`, `admin`, `gc`) open the
repository directly; all others talk to a server through `rain.client`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from rain.cli import agent as agent_cmd
from rain.cli import builds, testbed, users, values
from rain.cli import deploy as deploy_cmd
from rain.cli.errors import WrongUsage
from rain.cli.errors import run as run_app
from rain.cli.listen import check_listen_address, check_tls
from rain.cli.options import DataDir, Db, Json, Token, Url, client
from rain.cli.output import (
    err,
    gc_held,
    image_detail,
    image_table,
    out,
    print_json,
    transfer_progress,
)
from rain.client import Client
from rain.client.client import image_file_size
from rain.model.errors import ImageRebuilding, RainError
from rain.model.units import format_bytes, plural

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="rain: build, store, share and deploy virtual machine images.")
admin_app = typer.Typer(no_args_is_help=True, help="Repository administration (direct access).")
app.add_typer(admin_app, name="admin")
app.add_typer(testbed.app, name="testbed")


def _print_version(value: bool) -> None:
    """This rain's version; with RAIN_URL set, also the server's (never an error)."""
    if not value:
        return
    from rain import __version__

    print(f"rain {__version__}")
    if os.environ.get("RAIN_URL"):
        try:
            with Client(timeout=3.0) as c:
                print(f"server {c.url}: rain {c.health().get('version', '?')}")
        except RainError as exc:
            print(f"server {os.environ['RAIN_URL']}: {exc.message}")
    raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version,
        help="Print rain's version (and the server's, with RAIN_URL set) and exit")] = False,
             ) -> None:
    """rain: build, store, share and deploy virtual machine images."""


def _client(url: str | None, token: str | None) -> Client:
    return client(url, token)


def _pairs(values: list[str] | None, what: str) -> dict[str, str]:
    result = {}
    for v in values or []:
        key, sep, val = v.partition("=")
        if not sep or not key:
            raise WrongUsage(f"bad {what} {v!r}: expected KEY=VALUE")
        result[key] = val
    return result


def _open_repo(data_dir: Path | None, db: str | None, *, create: bool = False) -> Any:
    """The repository `serve` would use; only `serve` (create=True) may make a new one."""
    from rain.config import load_config, require_repository
    from rain.repo import Repository

    cfg = load_config(data_dir, db)
    if not create:
        require_repository(cfg)
    return cfg, Repository.open(cfg.data_dir, cfg.db_url, cfg.store, cfg.repo)


# -- server side ----------------------------------------------------------------
@app.command()
def serve(host: Annotated[str | None, typer.Option(help="Listen address")] = None,
          port: Annotated[int | None, typer.Option(help="Listen port", min=1, max=65535)] = None,
          data_dir: DataDir = None, db: Db = None,
          server: Annotated[str, typer.Option(
              help="native (default) | uvicorn (pure ASGI, slower transfers)",
              parser=values.choice(("native", "uvicorn")))] = "native",
          tls_cert: Annotated[Path | None, typer.Option(
              "--tls-cert", help="PEM certificate: serve HTTPS")] = None,
          tls_key: Annotated[Path | None, typer.Option("--tls-key", help="PEM key")] = None,
          ) -> None:
    """Run the repository service."""
    from rain.api.server import run

    cfg, repo = _open_repo(data_dir, db, create=True)
    host = host or cfg.server.host
    port = port or cfg.server.port
    if tls_cert:
        cfg.server.tls_cert = str(tls_cert)
    if tls_key:
        cfg.server.tls_key = str(tls_key)
    if cfg.server.tls_cert or cfg.server.tls_key:
        if not (cfg.server.tls_cert and cfg.server.tls_key):
            raise RainError("give both --tls-cert and --tls-key ([server] tls_cert and tls_key)")
        check_tls(cfg.server.tls_cert, cfg.server.tls_key)
    check_listen_address(host, port)
    token = repo.bootstrap_admin()
    if token:
        token_file = cfg.data_dir / "admin.token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        err.print(f"created user 'admin'; its token (also in {token_file}):")
        print(token, flush=True)
    scheme = "https" if cfg.server.tls_cert else "http"
    err.print(f"rain serving on {scheme}://{host}:{port} (data: {cfg.data_dir}, catalog: "
              f"{cfg.db_url.split('@')[-1]})")
    repo.close()
    run(cfg, host, port, server)


@admin_app.command("create-user")
def create_user(name: str, admin: Annotated[bool, typer.Option("--admin")] = False,
                group: Annotated[list[str] | None, typer.Option("--group")] = None,
                quota_bytes: Annotated[str | None, typer.Option(
                    help="e.g. 50G", parser=values.size)] = None,
                quota_images: Annotated[int | None, typer.Option()] = None,
                data_dir: DataDir = None, db: Db = None, json: Json = False) -> None:
    """Create a user and print its token (shown only this once)."""
    from rain.model.units import parse_size

    _, repo = _open_repo(data_dir, db)
    user, token = repo.local_create_user(
        name, admin=admin, groups=group or [],
        quota_bytes=parse_size(quota_bytes) if quota_bytes else None, quota_images=quota_images)
    if json:
        print_json({"name": user.name, "admin": user.is_admin, "groups": user.groups,
                    "token": token})
    else:
        print(token)


@app.command()
def gc(data_dir: DataDir = None, db: Db = None,
       grace: Annotated[float | None, typer.Option(
           help="Keep unreferenced data younger than this many seconds [default: [repo] "
           "gc_grace_seconds, 6 h]; 0 frees it all now (only while no upload runs)")] = None,
       json: Json = False) -> None:
    """Delete chunks no image references (older than the grace period)."""
    _, repo = _open_repo(data_dir, db)
    report = repo.gc(local=True, grace_seconds=grace).to_dict()
    if json:
        print_json(report)
    else:
        out.print(f"deleted {report['chunks_deleted']} chunks "
                  f"({format_bytes(report['bytes_freed'])}), "
                  f"{report['manifests_deleted']} manifests, {report.get('packs_deleted', 0)} "
                  f"packs; repacked {report.get('packs_repacked', 0)} packs "
                  f"({format_bytes(report.get('bytes_repacked', 0))}); "
                  f"kept {report['chunks_kept']} chunks that images use")
        if report.get("held_until"):
            out.print(gc_held(report), markup=False, highlight=False)


# -- client side -----------------------------------------------------------------
@app.command()
def push(file: Path, name: Annotated[str, typer.Option("--name", help="Image name")],
         version: Annotated[str | None, typer.Option()] = None,
         description: Annotated[str | None, typer.Option()] = None,
         os_distro: Annotated[str | None, typer.Option("--os-distro")] = None,
         os_release: Annotated[str | None, typer.Option("--os-release")] = None,
         arch: Annotated[str | None, typer.Option()] = None,
         visibility: Annotated[str | None, typer.Option(
             help="private | shared | public", parser=values.visibility)] = None,
         tag: Annotated[list[str] | None, typer.Option("--tag")] = None,
         prop: Annotated[list[str] | None, typer.Option("--property", help="K=V")] = None,
         parent: Annotated[str | None, typer.Option(help="Image this one derives from")] = None,
         disk_format: Annotated[str | None, typer.Option(
             "--disk-format", help="Expected format; refused if the content disagrees",
             parser=values.disk_format)] = None,
         base: Annotated[bool, typer.Option("--base", help="Mark as a base image")] = False,
         url: Url = None, token: Token = None, json: Json = False) -> None:
    """Upload an image file; prints the new image id."""
    size = image_file_size(file)
    c = _client(url, token)
    with transfer_progress(f"push {file.name}", size) as progress:
        image = c.push(file, name=name, version=version, description=description,
                       os_distro=os_distro, os_release=os_release, arch=arch,
                       visibility=visibility, tags=tag or [], properties=_pairs(prop, "property"),
                       parent=parent, disk_format=disk_format, base=base or None,
                       progress=progress, phase=progress.phase if progress else None)
    if json:
        print_json(image)
    else:
        print(image["id"])


@app.command()
def pull(image: str, output: Annotated[Path | None, typer.Option("-o", "--output")] = None,
         format: Annotated[str | None, typer.Option(
             "--format", help="qcow2 | raw | vmdk | vhdx | vdi | vpc",
             parser=values.disk_format)] = None,
         url: Url = None, token: Token = None, json: Json = False) -> None:
    """Download an image (converted on the server if --format differs); verifies SHA-256."""
    c = _client(url, token)
    info = c.show(image)
    if info["status"] == "purged":
        _rebuild_before_pull(c, info)
    fmt = format or info.get("disk_format") or "img"
    dest = output or Path(f"{info['name']}{'-' + info['version'] if info.get('version') else ''}"
                          f".{fmt}")
    if format == info.get("disk_format"):
        format = None  # nothing to convert
    with transfer_progress(f"pull {info['name']}", info.get("size") if not format else None) as p:
        result = c.pull(info["id"], dest, format=format, progress=p,
                        phase=p.phase if p else None)
    if json:
        print_json(result)
    else:
        err.print(f"{dest}: {format_bytes(result['size'])}, sha256 {result['sha256']} verified")


def _rebuild_before_pull(c: Client, info: dict[str, Any]) -> None:
    """A purged image: asking for its data starts (or joins) its rebuild; wait for it."""
    try:
        c.get_range(info["id"], 0, 1)
        return  # rebuilt meanwhile
    except ImageRebuilding as exc:
        build_id = exc.build_id or c.rebuild_build_id(info["id"])
    if build_id:
        err.print(f"{info['id']} was purged; build {build_id} is rebuilding it first")
        builds.wait_for_build(c, c.build_status(build_id), follow=False,
                              label=f"rebuild {info['name']}")


@app.command()
def images(name: Annotated[str | None, typer.Option(help="Name or glob")] = None,
           q: Annotated[str | None, typer.Option("--search", help="Text in name/description")]
           = None,
           owner: Annotated[str | None, typer.Option()] = None,
           visibility: Annotated[str | None, typer.Option(parser=values.visibility)] = None,
           status: Annotated[list[str] | None, typer.Option(
               "--status", parser=values.image_status)] = None,
           os_distro: Annotated[str | None, typer.Option("--os-distro")] = None,
           os_release: Annotated[str | None, typer.Option("--os-release")] = None,
           arch: Annotated[str | None, typer.Option()] = None,
           disk_format: Annotated[str | None, typer.Option(
               "--disk-format", parser=values.disk_format)] = None,
           tag: Annotated[list[str] | None, typer.Option("--tag")] = None,
           prop: Annotated[list[str] | None, typer.Option("--property", help="K=V")] = None,
           package: Annotated[list[str] | None, typer.Option(
               "--package", help="e.g. 'nginx>=1.22'")] = None,
           min_size: Annotated[str | None, typer.Option(
               "--min-size", help="Disk size the guest sees (virtual size), e.g. 1G",
               parser=values.size)] = None,
           max_size: Annotated[str | None, typer.Option(
               "--max-size", help="Disk size the guest sees (virtual size)",
               parser=values.size)] = None,
           min_file_size: Annotated[str | None, typer.Option(
               "--min-file-size", help="Bytes of the image file (a qcow2 is smaller than its"
               " disk)", parser=values.size)] = None,
           max_file_size: Annotated[str | None, typer.Option(
               "--max-file-size", help="Bytes of the image file", parser=values.size)] = None,
           created_after: Annotated[str | None, typer.Option(
               "--created-after", parser=values.date)] = None,
           created_before: Annotated[str | None, typer.Option(
               "--created-before", parser=values.date)] = None,
           unused_for: Annotated[str | None, typer.Option(
               "--unused-for", help="e.g. 30d: purge candidates", parser=values.duration)]
           = None,
           base: Annotated[bool | None, typer.Option("--base/--not-base")] = None,
           sort: Annotated[str, typer.Option(help="field, '-' prefix for descending")]
           = "-created",
           limit: Annotated[int, typer.Option()] = 100,
           offset: Annotated[int, typer.Option()] = 0,
           url: Url = None, token: Token = None, json: Json = False) -> None:
    """Search the images you can see."""
    result = _client(url, token).images(
        name=name, q=q, owner=owner, visibility=visibility, status=status, os_distro=os_distro,
        os_release=os_release, arch=arch, disk_format=disk_format, tag=tag, property=prop,
        package=package, min_virtual_size=min_size, max_virtual_size=max_size,
        min_size=min_file_size, max_size=max_file_size, created_after=created_after,
        created_before=created_before, unused_for=unused_for,
        base=None if base is None else str(base).lower(), sort=sort, limit=limit, offset=offset)
    if json:
        print_json(result)
    else:
        image_table(result["images"], result["total"])


@app.command()
def show(image: str, url: Url = None, token: Token = None, json: Json = False) -> None:
    """Show one image's metadata."""
    info = _client(url, token).show(image)
    if json:
        print_json(info)
    else:
        image_detail(info)


@app.command()
def share(image: str, user: Annotated[str | None, typer.Option("--user")] = None,
          group: Annotated[str | None, typer.Option("--group")] = None,
          url: Url = None, token: Token = None, json: Json = False) -> None:
    """Let a user or a group read an image."""
    if (user is None) == (group is None):
        raise WrongUsage("give exactly one of --user or --group")
    info = _client(url, token).share(image, user=user, group=group)
    who = user or f"group {group}"
    print_json(info) if json else err.print(f"shared {info['id']} with {who}")


@app.command()
def unshare(image: str, user: Annotated[str | None, typer.Option("--user")] = None,
            group: Annotated[str | None, typer.Option("--group")] = None,
            url: Url = None, token: Token = None, json: Json = False) -> None:
    """Stop sharing an image with a user or a group."""
    if (user is None) == (group is None):
        raise WrongUsage("give exactly one of --user or --group")
    info = _client(url, token).unshare(image, user=user, group=group)
    print_json(info) if json else err.print(f"unshared {info['id']}")


@app.command("set")
def set_(image: str,
         prop: Annotated[list[str] | None, typer.Option("--property", help="K=V")] = None,
         unset: Annotated[list[str] | None, typer.Option("--unset-property")] = None,
         tag: Annotated[list[str] | None, typer.Option("--tag")] = None,
         untag: Annotated[list[str] | None, typer.Option("--untag")] = None,
         visibility: Annotated[str | None, typer.Option(parser=values.visibility)] = None,
         name: Annotated[str | None, typer.Option()] = None,
         version: Annotated[str | None, typer.Option()] = None,
         description: Annotated[str | None, typer.Option()] = None,
         os_distro: Annotated[str | None, typer.Option("--os-distro")] = None,
         os_release: Annotated[str | None, typer.Option("--os-release")] = None,
         arch: Annotated[str | None, typer.Option()] = None,
         protected: Annotated[bool | None, typer.Option("--protected/--unprotected")] = None,
         deactivate: Annotated[bool | None, typer.Option("--deactivate/--reactivate")] = None,
         base: Annotated[bool | None, typer.Option("--base/--not-base")] = None,
         url: Url = None, token: Token = None, json: Json = False) -> None:
    """Change an image's metadata (its content never changes)."""
    changes: dict[str, Any] = {
        "properties": _pairs(prop, "property") or None, "remove_properties": unset or None,
        "add_tags": tag or None, "remove_tags": untag or None, "visibility": visibility,
        "name": name, "version": version, "description": description, "os_distro": os_distro,
        "os_release": os_release, "arch": arch, "protected": protected,
        "deactivated": deactivate, "base": base}
    info = _client(url, token).update(image, **{k: v for k, v in changes.items()
                                                 if v is not None})
    print_json(info) if json else image_detail(info)


@app.command()
def rescan(image: str, url: Url = None, token: Token = None, json: Json = False) -> None:
    """Read OS, release, arch and packages again from a stored image's root filesystem."""
    info = _client(url, token).rescan(image)
    print_json(info) if json else image_detail(info)


@app.command()
def rm(image: str,
       force: Annotated[bool, typer.Option(
           "--force", help="Even if images derive from it or live instances use it")] = False,
       url: Url = None, token: Token = None, json: Json = False) -> None:
    """Delete an image (refused if protected, a parent or in use).

    Refused while it is protected; while images derive from it or live
    instance disks use it, unless --force."""
    info = _client(url, token).delete(image, force=force)
    print_json(info) if json else err.print(f"deleted {info['id']}")


@app.command()
def match(os_distro: Annotated[str | None, typer.Option("--os-distro", "--distro")] = None,
          release: Annotated[str | None, typer.Option(help="e.g. 12 or '>=11'")] = None,
          arch: Annotated[str | None, typer.Option()] = None,
          package: Annotated[list[str] | None, typer.Option("--package")] = None,
          tag: Annotated[list[str] | None, typer.Option("--tag")] = None,
          min_disk: Annotated[str | None, typer.Option(
              "--min-disk", help="e.g. 4G", parser=values.size)] = None,
          prefer: Annotated[list[str] | None, typer.Option(
              "--prefer", help="tag:T, package:P, property:K=V, base, newest, popular, smallest;"
              " append =WEIGHT")] = None,
          limit: Annotated[int, typer.Option()] = 20,
          url: Url = None, token: Token = None, json: Json = False) -> None:
    """Rank the images that meet hard requirements by weighted preferences."""
    req = {k: v for k, v in {"os_distro": os_distro, "release": release, "arch": arch,
                             "packages": package, "tags": tag, "min_disk": min_disk}.items() if v}
    report = _client(url, token).match_report(req, prefer or [], limit)
    matches = report["matches"]
    if json:
        print_json(report)
    elif not matches:
        err.print(f"no image meets the requirements: {_eliminated(report)}", markup=False,
                  highlight=False)
    if not matches:  # like grep: a script tells "none" from a match by the status
        raise typer.Exit(1)
    if json:
        return
    for rank, m in enumerate(matches, 1):
        i = m["image"]
        out.print(f"[bold]{rank}. {i['name']}{':' + i['version'] if i['version'] else ''}[/bold]"
                  f"  {i['id']}  score {m['score']:.2f}")
        for reason in m["reasons"]:
            out.print(f"     {reason}")


def _eliminated(report: dict[str, Any]) -> str:
    """`of 14 images you can see, os_distro debian removed 2, …, package x>=1 the last 8`."""
    if not report.get("candidates"):
        return "you can see no active image"
    steps = [e for e in report.get("eliminated") or [] if e["removed"]]
    said = [f"{e['requirement']} removed {'the last ' if not e['left'] else ''}{e['removed']}"
            for e in steps]
    return f"of {report['candidates']} images you can see, " + ", ".join(said)


@app.command()
def usage(image: Annotated[str | None, typer.Argument()] = None,
          user: Annotated[str | None, typer.Option("--user")] = None,
          url: Url = None, token: Token = None, json: Json = False) -> None:
    """Who pulled what, when, how much."""
    result = _client(url, token).usage(image, user)
    if json:
        print_json(result)
        return
    from rich.table import Table

    table = Table(show_edge=False, header_style="bold")
    for col in ("WHEN", "IMAGE", "USER", "ACTION", "BYTES"):
        table.add_column(col)
    for u in result["usage"]:
        table.add_row(u["at"][:19], u["image_name"], u["user"], u["action"],
                      format_bytes(u["bytes"]))
    out.print(table)
    out.print(f"{plural(result['pulls'], 'pull')}, {format_bytes(result['bytes'])}")


@app.command()
def whoami(url: Url = None, token: Token = None, json: Json = False) -> None:
    """Show the user the token belongs to."""
    me = _client(url, token).whoami()
    print_json(me) if json else out.print(f"{me['name']}{' (admin)' if me['admin'] else ''}")


app.command()(agent_cmd.agent)
app.command()(deploy_cmd.nodes)
app.command()(deploy_cmd.deploy)
app.command()(deploy_cmd.deployments)
app.command()(deploy_cmd.prefetch)
app.add_typer(deploy_cmd.instance_app, name="instance")
app.command()(users.users)
app.add_typer(users.user_app, name="user")
app.command()(users.groups)
app.add_typer(users.group_app, name="group")
app.add_typer(users.token_app, name="token")
app.command()(builds.build)
app.command("builds")(builds.builds)
app.command("cancel-build")(builds.cancel)
app.command()(builds.rebuild)
app.command()(builds.purge)
app.command()(builds.pedigree)


def main() -> None:
    sys.exit(run_app(app))


if __name__ == "__main__":
    main()
