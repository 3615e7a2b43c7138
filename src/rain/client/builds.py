"""Client calls for builds, purge, rebuild and pedigree (mixed into `Client`).

Templates that extend other template files (`from: template:PATH`) travel
with their parents: `template_chain` reads the file, then the file its `from`
names (relative to the file that names it), and so on; the server gets the
texts nearest first and the file names for its error messages. The server
parses and validates everything; this side only follows `from`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from rain.model.errors import RainError

BuildUpdate = Callable[[dict[str, Any]], None]
FINISHED = ("succeeded", "failed", "cancelled")
MAX_CHAIN = 32


def template_chain(path: Path) -> tuple[str, list[str], list[str]]:
    """(template text, parent texts nearest first, file names) for a template file."""
    texts: list[str] = []
    names: list[str] = []
    seen: list[Path] = []
    current = Path(path)
    while True:
        resolved = current.resolve()
        if resolved in seen:
            loop = " → ".join(p.name for p in [*seen, resolved])
            raise RainError(f"templates extend each other in a loop: {loop}")
        if len(seen) >= MAX_CHAIN:
            raise RainError(f"{path}: more than {MAX_CHAIN} templates extend each other")
        seen.append(resolved)
        try:
            text = current.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise RainError(f"cannot read template {current}: {reason}") from None
        texts.append(text)
        names.append(current.name)
        parent = _parent_path(text)
        if parent is None:
            return texts[0], texts[1:], names
        current = parent if parent.is_absolute() else resolved.parent / parent


def _parent_path(text: str) -> Path | None:
    """The path in `from: template:PATH`, if the text says so (else the server judges it)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    base = data.get("from") if isinstance(data, dict) else None
    if not isinstance(base, str):
        return None
    kind, sep, rest = base.strip().partition(":")
    return Path(rest) if sep and kind == "template" and rest else None


class BuildCalls:
    def _request(self, method: str, path: str, **kw: Any) -> Any:
        raise NotImplementedError

    def build(self, template: str, parents: Sequence[str] = (),
              sources: Sequence[str] = ()) -> dict[str, Any]:
        """Submit a template (and the texts of the templates it extends); returns the build.

        A template hit comes back already `succeeded` with `cached: true`.
        """
        body: dict[str, Any] = {"template": template, "parents": list(parents)}
        if sources:
            body["sources"] = list(sources)
        return dict(self._request("POST", "/v1/builds", json=body))

    def build_file(self, path: str | Path) -> dict[str, Any]:
        """Submit a template file, with the template files it extends."""
        text, parents, names = template_chain(Path(path))
        return self.build(text, parents, names)

    def build_status(self, build_id: str, *, log_offset: int = 0) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/builds/{build_id}",
                                  params={"log_offset": log_offset}))

    def builds(self, *, status: Sequence[str] = (), image: str | None = None,
               limit: int = 50, offset: int = 0) -> dict[str, Any]:
        params: dict[str, Any] = {"status": list(status), "limit": limit, "offset": offset}
        if image:
            params["image"] = image
        return dict(self._request("GET", "/v1/builds", params=params))

    def cancel_build(self, build_id: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/v1/builds/{build_id}/cancel"))

    def follow_build(self, build_id: str, on_update: BuildUpdate | None = None, *,
                     interval: float = 1.0, timeout: float | None = None) -> dict[str, Any]:
        """Poll (every `interval` seconds at most) until the build is over; returns it
        with its whole log. `on_update` gets every poll's answer, whose `log` holds
        only the text that is new since the previous one.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        offset, log = 0, []
        wait = min(0.1, interval)  # short builds (and hits) answer fast; then back off
        while True:
            build = self.build_status(build_id, log_offset=offset)
            build_id = build["id"]  # a prefix is resolved once: new builds cannot shadow it
            log.append(build["log"])
            offset = build["log_size"]
            if on_update is not None:
                on_update(build)
            if build["status"] in FINISHED:
                return {**build, "log": "".join(log), "log_offset": 0}
            if deadline is not None and time.monotonic() > deadline:
                raise RainError(f"build {build_id} is still {build['status']} after "
                                f"{timeout:.0f} s")
            time.sleep(wait)
            wait = min(wait * 1.5, interval)

    def purge(self, ref: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/v1/images/{ref}/purge"))

    def purge_unused(self, unused_for: str, *, dry_run: bool = False) -> dict[str, Any]:
        return dict(self._request("POST", "/v1/images/purge",
                                  params={"unused_for": unused_for,
                                          "dry_run": str(dry_run).lower()}))

    def rebuild(self, ref: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/v1/images/{ref}/rebuild"))

    def pedigree(self, ref: str) -> list[dict[str, Any]]:
        return list(self._request("GET", f"/v1/images/{ref}/pedigree")["pedigree"])

    def rebuild_build_id(self, ref: str) -> str | None:
        """The queued or running build that remakes a purged image, if any."""
        found = self.builds(image=ref, status=["queued", "running"], limit=1)["builds"]
        return str(found[0]["id"]) if found else None
