"""Printing for people (rich tables) and scripts (`--json`), and one-line errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from rain.cli.transferbar import TransferBar
from rain.model.units import format_bytes

# Piped output is not cut to 80 columns: scripts and `grep` see whole rows.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 250)
err = Console(stderr=True, soft_wrap=True)


def gc_held(report: dict[str, Any]) -> str:
    """What only gc's grace period kept, until when, and how to free it now."""
    until = datetime.fromisoformat(report["held_until"]).astimezone()
    hours = float(report.get("grace_seconds") or 0) / 3600
    return (f"held for the grace period ({hours:g} h): {format_bytes(report.get('bytes_held'))} in "
            f"{report.get('chunks_held', 0)} chunks no image uses (deleted images, unfinished "
            f"uploads), until {until:%Y-%m-%d %H:%M %Z}; `rain gc --grace 0` frees them now "
            "(only while no upload runs)")


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def image_table(images: list[dict[str, Any]], total: int | None = None) -> None:
    table = Table(show_edge=False, header_style="bold")
    for col in ("ID", "NAME", "VERSION", "OS", "ARCH", "FORMAT", "DISK", "FILE", "STORED",
                "VISIBILITY", "STATUS", "OWNER"):
        table.add_column(col, overflow="fold")
    for i in images:
        os_name = " ".join(x for x in (i.get("os_distro"), i.get("os_release")) if x)
        table.add_row(i["id"][:8], i["name"], i.get("version") or "", os_name,
                      i.get("arch") or "", i.get("disk_format") or "",
                      format_bytes(i.get("virtual_size") or i.get("size")),
                      format_bytes(i.get("size")), format_bytes(i.get("stored_bytes")),
                      i["visibility"], i["status"], i["owner"])
    out.print(table)
    if total is not None and total > len(images):
        out.print(f"[dim]{len(images)} of {total} shown; use --limit/--offset for more[/dim]")


def image_detail(i: dict[str, Any]) -> None:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key in ("id", "name", "version", "description", "owner", "visibility", "status",
                "os_distro", "os_release", "arch", "disk_format"):
        table.add_row(key, str(i.get(key) or ""))
    for key in ("size", "virtual_size", "stored_bytes"):
        table.add_row(key, f"{format_bytes(i.get(key))} ({i.get(key)})" if i.get(key) is not None
                      else "-")
    table.add_row("sha256", i.get("sha256") or "")
    table.add_row("tags", ", ".join(i.get("tags") or []))
    table.add_row("properties", ", ".join(f"{k}={v}" for k, v in
                                          sorted((i.get("properties") or {}).items())))
    pk = i.get("packages") or {}
    table.add_row("packages", f"{len(pk)}: " + ", ".join(f"{k}={v}" for k, v in
                                                          sorted(pk.items())[:20])
                  + (" …" if len(pk) > 20 else "") if pk else "")
    table.add_row("members", ", ".join(m.get("user") or f"group:{m.get('group')}"
                                       for m in i.get("members") or []))
    for key in ("parent", "template_digest", "base", "protected", "created", "updated",
                "last_access", "access_count"):
        table.add_row(key, str(i.get(key) if i.get(key) is not None else ""))
    out.print(table)


@contextmanager
def transfer_progress(label: str, total: int | None) -> Iterator[Any]:
    """A progress bar on a terminal (None when output is piped): call it with bytes
    done; its `phase(what, total)` starts a step of its own — a bar again when the step
    counts bytes, a spinner and the time when it only waits (the server converting)."""
    if not err.is_terminal:
        yield None
        return
    with TransferBar(label, total, err) as bar:
        yield bar


def build_table(builds: list[dict[str, Any]], total: int | None = None) -> None:
    table = Table(show_edge=False, header_style="bold")
    for col in ("ID", "STATUS", "PHASE", "PROGRESS", "IMAGE", "REBUILD OF", "OWNER", "CREATED"):
        table.add_column(col, overflow="fold")
    for b in builds:
        status = b["status"] + (" (template hit)" if b.get("cached") else "")
        table.add_row(b["id"][:8], status, b.get("phase") or "",
                      f"{100 * float(b.get('progress') or 0):.0f}%",
                      (b.get("image_id") or "")[:8], (b.get("rebuild_of") or "")[:8],
                      b["owner"], (b.get("created") or "")[:16].replace("T", " "))
    out.print(table)
    if total is not None and total > len(builds):
        out.print(f"[dim]{len(builds)} of {total} shown; use --limit/--offset for more[/dim]")
