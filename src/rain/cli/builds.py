"""`rain build`, `builds`, `rebuild`, `purge`, `pedigree` (registered in `rain.cli.main`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from rain.cli import values
from rain.cli.buildview import BuildDisplay
from rain.cli.errors import WrongUsage
from rain.cli.options import Json, Token, Url, client
from rain.cli.output import build_table, err, image_table, out, print_json
from rain.client import Client
from rain.model.errors import RainError

Follow = Annotated[bool, typer.Option("--follow", "-f",
                                      help="Show each phase, its duration and progress")]
Log = Annotated[bool, typer.Option("--log", help="Also show the raw build log (implies "
                                   "--follow)")]
Detach = Annotated[bool, typer.Option("--detach", help="Print the build id, do not wait")]


def wait_for_build(c: Client, build: dict[str, Any], *, follow: bool,
                   label: str, log: bool = False) -> dict[str, Any]:
    """Follow a build to its end; a build that did not succeed is a one-line error
    (after the end of its log, when it was followed)."""
    if build["status"] not in ("succeeded", "failed", "cancelled") or follow or log:
        with BuildDisplay(label, phases=follow, show_log=log) as display:
            build = c.follow_build(build["id"], display.update)
            if build["status"] != "succeeded" and (follow or log):
                display.failed(build)
    if build["status"] != "succeeded":
        raise RainError(f"build {build['id']} {build['status']}: "
                        f"{build.get('error') or 'no reason given'}")
    return build


def build(template: Path, follow: Follow = False, log: Log = False, detach: Detach = False,
          url: Url = None, token: Token = None, json: Json = False) -> None:
    """Build an image from a template file; prints the image id.

    Templates it extends (`from: template:PATH`) are read and sent along.
    A template whose image already exists answers at once (a template hit).
    """
    c = client(url, token)
    submitted = c.build_file(template)
    if detach:
        print_json(submitted) if json else print(submitted["id"])
        return
    done = wait_for_build(c, submitted, follow=follow, log=log,
                          label=f"build {template.name}")
    if json:
        print_json(done)
        return
    if done.get("cached"):
        err.print(f"template hit: image {done['image_id']} already has this template")
    print(done["image_id"])


def builds(build_id: Annotated[str | None, typer.Argument(help="Show this build")] = None,
           status: Annotated[list[str] | None, typer.Option(
               "--status", help="queued | running | succeeded | failed | cancelled",
               parser=values.build_status)] = None,
           image: Annotated[str | None, typer.Option(
               "--image", help="Builds that made or remake this image")] = None,
           follow: Follow = False, log: Log = False,
           cancel: Annotated[bool, typer.Option(
               "--cancel", help="Cancel it (a running build stops at its next step)")] = False,
           limit: Annotated[int, typer.Option()] = 50,
           offset: Annotated[int, typer.Option()] = 0,
           url: Url = None, token: Token = None, json: Json = False) -> None:
    """List your builds (admins: all), or show one build with its log."""
    c = client(url, token)
    if build_id is None:
        if cancel:
            raise WrongUsage("--cancel needs a build id")
        result = c.builds(status=status or [], image=image, limit=limit, offset=offset)
        print_json(result) if json else build_table(result["builds"], result["total"])
        return
    if cancel:
        _cancel(c, build_id, json)
        return
    one = c.build_status(build_id)
    if follow or log:  # one that ends failed or cancelled fails, as `rain build` does
        one = wait_for_build(c, one, follow=True, log=log, label=f"build {build_id[:8]}")
    if json:
        print_json(one)
        return
    if not (follow or log):
        out.print(one["log"], markup=False, highlight=False, end="")
    err.print(f"build {one['id']}: {one['status']}"
              + (f" ({one['phase']} {100 * one['progress']:.0f}%)" if one["status"] == "running"
                 else "")
              + (f", image {one['image_id']}" if one.get("image_id") else "")
              + (f": {one['error']}" if one.get("error") else ""),
              markup=False, highlight=False)


def cancel(build_id: str, url: Url = None, token: Token = None, json: Json = False) -> None:
    """Cancel a build: a queued one at once, a running one at its next step."""
    _cancel(client(url, token), build_id, json)


def _cancel(c: Client, build_id: str, json: bool) -> None:
    done = c.cancel_build(build_id)
    if json:
        print_json(done)
    elif done["status"] == "cancelling":
        err.print(f"cancelling build {done['id']}: it stops at its next step "
                  f"(`rain builds {done['id'][:8]} --follow` to see it end)",
                  markup=False, highlight=False)
    else:
        err.print(f"cancelled build {done['id']}", markup=False, highlight=False)


def rebuild(image: str, follow: Follow = False, log: Log = False, detach: Detach = False,
            url: Url = None, token: Token = None, json: Json = False) -> None:
    """Rebuild a purged image from its template (same id); prints the image id."""
    c = client(url, token)
    submitted = c.rebuild(image)
    if detach:
        print_json(submitted) if json else print(submitted["id"])
        return
    done = wait_for_build(c, submitted, follow=follow, log=log, label=f"rebuild {image}")
    print_json(done) if json else print(done["image_id"])


def purge(image: Annotated[str | None, typer.Argument()] = None,
          unused_for: Annotated[str | None, typer.Option(
              "--unused-for", help="e.g. 90d: every built image not pulled for that long",
              parser=values.duration)]
          = None,
          dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list them")] = False,
          url: Url = None, token: Token = None, json: Json = False) -> None:
    """Drop an image's content but keep its template and metadata; pulling rebuilds it."""
    if (image is None) == (unused_for is None):
        raise WrongUsage("give either an IMAGE or --unused-for")
    c = client(url, token)
    if image is not None:
        if dry_run:
            raise WrongUsage("--dry-run goes with --unused-for")
        info = c.purge(image)
        print_json(info) if json else err.print(f"purged {info['id']}")
        return
    assert unused_for is not None
    result = c.purge_unused(unused_for, dry_run=dry_run)
    if json:
        print_json(result)
        return
    if result["images"]:
        image_table(result["images"])
    verb = "would purge" if dry_run else "purged"
    err.print(f"{verb} {result['count']} image{'s' if result['count'] != 1 else ''}")


def pedigree(image: str, url: Url = None, token: Token = None, json: Json = False) -> None:
    """The image and what it derives from, parent by parent."""
    chain = client(url, token).pedigree(image)
    if json:
        print_json(chain)
        return
    for depth, entry in enumerate(chain):
        lead = "  " * (depth - 1) + "└ " if depth else ""
        if entry.get("hidden"):
            out.print(f"{lead}{entry['id']}  (not visible to you)", markup=False)
            continue
        name = entry["name"] + (f":{entry['version']}" if entry.get("version") else "")
        digest = (entry.get("template_digest") or "")[:12]
        out.print(f"{lead}{name}  {entry['id']}  {entry['status']}"
                  + (f"  template {digest}" if digest else "  (no template)"), markup=False)
    last = chain[-1] if chain else {}
    base = last.get("from")
    if base and not last.get("hidden") and not base.startswith(("image:", "template:")):
        out.print("  " * (len(chain) - 1) + f"└ {base}", markup=False)
