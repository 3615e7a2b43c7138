"""`rain users`, `rain user …`, `rain groups`, `rain group …`, `rain token …`: administration
through the server (`rain admin create-user` is the direct-access one)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from rain.cli import values
from rain.cli.errors import WrongUsage
from rain.cli.options import Json, Token, Url, client
from rain.cli.output import err, out, print_json
from rain.model.units import format_bytes, parse_size, plural

user_app = typer.Typer(no_args_is_help=True, help="One user: show, create, disable, enable, rm.")
group_app = typer.Typer(no_args_is_help=True, help="Groups: show, create, rm, add, remove.")
token_app = typer.Typer(no_args_is_help=True, help="API tokens: ls, create, revoke.")

Name = Annotated[str, typer.Argument(help="User name")]
GroupName = Annotated[str, typer.Argument(help="Group name")]


def _when(value: str | None) -> str:
    return (value or "")[:19].replace("T", " ") or "-"


def _state(u: dict[str, Any]) -> str:
    return "deleted" if u.get("deleted") else "disabled" if u.get("disabled") else "active"


# -- users -------------------------------------------------------------------------------
def users(include_deleted: Annotated[bool, typer.Option("--all", help="Deleted users too")]
          = False, url: Url = None, token: Token = None, json: Json = False) -> None:
    """The users (admin)."""
    found = client(url, token).users(include_deleted=include_deleted)
    if json:
        print_json(found)
        return
    table = Table(show_edge=False, header_style="bold")
    for col in ("NAME", "ADMIN", "STATE", "GROUPS", "QUOTA", "CREATED"):
        table.add_column(col, overflow="fold")
    for u in found:
        quota = " / ".join(x for x in (
            format_bytes(u["quota_bytes"]) if u.get("quota_bytes") is not None else "",
            f"{u['quota_images']} images" if u.get("quota_images") is not None else "") if x)
        table.add_row(u["name"], "yes" if u["admin"] else "", _state(u),
                      ", ".join(u.get("groups") or []), quota or "-", _when(u.get("created")))
    out.print(table)


@user_app.command("show")
def user_show(name: Name, url: Url = None, token: Token = None, json: Json = False) -> None:
    """One user (admin, or yourself)."""
    u = client(url, token).user(name)
    if json:
        print_json(u)
        return
    out.print(f"{u['name']}{' (admin)' if u['admin'] else ''}: {_state(u)}, groups "
              f"{', '.join(u.get('groups') or []) or '-'}, created {_when(u.get('created'))}")


@user_app.command("create")
def user_create(name: Name, admin: Annotated[bool, typer.Option("--admin")] = False,
                group: Annotated[list[str] | None, typer.Option("--group")] = None,
                quota_bytes: Annotated[str | None, typer.Option(
                    help="e.g. 50G", parser=values.size)] = None,
                quota_images: Annotated[int | None, typer.Option()] = None,
                url: Url = None, token: Token = None, json: Json = False) -> None:
    """Create a user (admin) and print its token, shown only this once."""
    created = client(url, token).create_user(
        name, admin=admin, groups=group or [],
        quota_bytes=parse_size(quota_bytes) if quota_bytes else None, quota_images=quota_images)
    print_json(created) if json else print(created["token"])


@user_app.command("disable")
def user_disable(name: Name, url: Url = None, token: Token = None, json: Json = False) -> None:
    """Disable a user (admin): every token of theirs is refused (401) from now on."""
    u = client(url, token).set_user_disabled(name, True)
    print_json(u) if json else err.print(f"disabled {u['name']}: their tokens are refused")


@user_app.command("enable")
def user_enable(name: Name, url: Url = None, token: Token = None, json: Json = False) -> None:
    """Enable a disabled user again (admin): their tokens work again."""
    u = client(url, token).set_user_disabled(name, False)
    print_json(u) if json else err.print(f"enabled {u['name']}")


@user_app.command("rm")
def user_rm(name: Name, transfer_to: Annotated[str | None, typer.Option(
                "--transfer-to", help="Give the user's images to this user")] = None,
            url: Url = None, token: Token = None, json: Json = False) -> None:
    """Delete a user (admin). Refused while they own images that are not deleted, unless
    --transfer-to gives them to another user. The name stays taken."""
    gone = client(url, token).delete_user(name, transfer_to=transfer_to)
    if json:
        print_json(gone)
        return
    moved = gone.get("images_transferred") or 0
    err.print(f"deleted user {gone['name']}"
              + (f"; {plural(moved, 'image')} now {'belongs' if moved == 1 else 'belong'} to "
                 f"{transfer_to}" if moved else ""))


# -- groups ------------------------------------------------------------------------------
def groups(url: Url = None, token: Token = None, json: Json = False) -> None:
    """The groups and their members (admin)."""
    found = client(url, token).groups()
    if json:
        print_json(found)
        return
    table = Table(show_edge=False, header_style="bold")
    table.add_column("GROUP")
    table.add_column("MEMBERS", overflow="fold")
    for g in found:
        table.add_row(g["name"], ", ".join(g["members"]) or "-")
    out.print(table)


def _group_line(g: dict[str, Any]) -> str:
    return f"group {g['name']}: {', '.join(g['members']) or 'no members'}"


@group_app.command("show")
def group_show(name: GroupName, url: Url = None, token: Token = None,
               json: Json = False) -> None:
    """A group and its members (admin)."""
    g = client(url, token).group(name)
    print_json(g) if json else out.print(_group_line(g))


@group_app.command("create")
def group_create(name: GroupName, url: Url = None, token: Token = None,
                 json: Json = False) -> None:
    """Create a group (admin)."""
    g = client(url, token).create_group(name)
    print_json(g) if json else err.print(f"created group {g['name']}")


@group_app.command("rm")
def group_rm(name: GroupName, url: Url = None, token: Token = None, json: Json = False) -> None:
    """Delete a group (admin): images shared with it are no longer shared with its members."""
    g = client(url, token).delete_group(name)
    print_json(g) if json else err.print(f"deleted group {g['name']}")


@group_app.command("add")
def group_add(name: GroupName, user: Annotated[list[str], typer.Argument(help="User names")],
              url: Url = None, token: Token = None, json: Json = False) -> None:
    """Add users to a group (admin)."""
    g = client(url, token).add_group_members(name, user)
    print_json(g) if json else err.print(_group_line(g))


@group_app.command("remove")
def group_remove(name: GroupName,
                 user: Annotated[list[str], typer.Argument(help="User names")],
                 url: Url = None, token: Token = None, json: Json = False) -> None:
    """Remove users from a group (admin)."""
    g = client(url, token).remove_group_members(name, user)
    print_json(g) if json else err.print(_group_line(g))


# -- tokens ------------------------------------------------------------------------------
User = Annotated[str | None, typer.Option("--user", help="Another user's (admin)")]
Node = Annotated[str | None, typer.Option("--node", help="A node agent's (admin)")]


@token_app.command("ls")
def token_ls(user: User = None, node: Node = None,
             everyone: Annotated[bool, typer.Option("--all", help="Everyone's (admin)")]
             = False, url: Url = None, token: Token = None, json: Json = False) -> None:
    """Your tokens: id, label, created, last used (never the secret)."""
    found = client(url, token).tokens(user=user, node=node, everyone=everyone)
    if json:
        print_json(found)
        return
    table = Table(show_edge=False, header_style="bold")
    for col in ("ID", "FOR", "LABEL", "CREATED", "LAST USED"):
        table.add_column(col, overflow="fold")
    for t in found:
        table.add_row(str(t["id"]), f"node {t['node']}" if t.get("node") else t.get("user") or "",
                      t.get("label") or "", _when(t.get("created")), _when(t.get("last_used")))
    out.print(table)


@token_app.command("create")
def token_create(label: Annotated[str, typer.Option("--label", help="What it is for")] = "",
                 user: User = None, node: Node = None, url: Url = None, token: Token = None,
                 json: Json = False) -> None:
    """Create a token and print it (shown only this once). --node NAME makes the token a
    node agent runs with: it registers and reports node NAME, and reads only the images
    deployed to it."""
    if user and node:
        raise WrongUsage("give at most one of --user or --node")
    created = client(url, token).create_token(label=label, user=user, node=node)
    if json:
        print_json(created)
        return
    err.print(f"token {created['id']} for "
              f"{'node ' + created['node'] if created.get('node') else created['user']}:")
    print(created["token"], flush=True)


@token_app.command("revoke")
def token_revoke(token_id: Annotated[list[int], typer.Argument(help="Token ids (rain token ls)")],
                 url: Url = None, token: Token = None, json: Json = False) -> None:
    """Revoke tokens: requests with them are refused (401) from now on."""
    c = client(url, token)
    done = [c.revoke_token(i) for i in token_id]
    if json:
        print_json(done)
        return
    for t in done:
        err.print(f"revoked token {t['id']}")
