"""`/v1/builds` (build jobs) and the image routes that belong to building:
purge, purge of unused images, rebuild, pedigree."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from rain.api.deps import repo, viewer
from rain.build.jobs import BuildQueue
from rain.build.template import parse_template
from rain.model import Build, Image, ImageStatus, InvalidRequest, RainError, User
from rain.model.units import parse_duration
from rain.repo import Repository

router = APIRouter(prefix="/v1")
Repo = Annotated[Repository, Depends(repo)]
Viewer = Annotated[User | None, Depends(viewer)]
MAX_TEMPLATE_BYTES = 1024 * 1024


def builds(request: Request) -> BuildQueue:
    queue: BuildQueue = request.app.state.builds
    return queue


Builds = Annotated[BuildQueue, Depends(builds)]


def _accepted(build: Build) -> JSONResponse:
    """200 for a build that is already over (a template hit), 202 while it is to run."""
    return JSONResponse(build.to_dict(), status_code=200 if build.status.finished else 202)


TEMPLATE_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {
        "type": "object", "required": ["template"],
        "properties": {"template": {"type": "string"},
                       "parents": {"type": "array", "items": {"type": "string"}},
                       "sources": {"type": "array", "items": {"type": "string"}}}}},
    "application/yaml": {"schema": {"type": "string"}}}}}


@router.post("/builds", tags=["builds"], status_code=202, openapi_extra=TEMPLATE_BODY)
async def submit_build(request: Request, queue: Builds, user: Viewer) -> JSONResponse:
    """Build an image from a template.

    Body: `{"template": TEXT, "parents": [TEXT, ...], "sources": [NAME, ...]}`
    (parents: the templates it extends through `from: template:...`, nearest
    first; sources: file names for error messages), or the template text itself
    as `application/yaml`. A bad template is a 400 naming the line.
    """
    body = await request.body()
    if len(body) > MAX_TEMPLATE_BYTES:
        raise InvalidRequest(f"a template may be at most {MAX_TEMPLATE_BYTES} bytes")
    text, parents, sources = _template_body(request.headers.get("content-type") or "", body)
    build = queue.submit(user, text, parents, sources)
    return _accepted(build)


def _template_body(content_type: str, body: bytes) -> tuple[str, list[str], list[str]]:
    try:
        raw = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("the template must be UTF-8 text") from None
    if not content_type.startswith("application/json"):
        return raw, [], []
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest(f"invalid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("template"), str):
        raise InvalidRequest('expected {"template": TEXT, "parents": [TEXT, ...]}')
    unknown = set(data) - {"template", "parents", "sources"}
    if unknown:
        raise InvalidRequest(f"unknown fields: {', '.join(sorted(unknown))}")
    lists = {}
    for key in ("parents", "sources"):
        value = data.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidRequest(f"{key} must be a list of strings")
        lists[key] = value
    return data["template"], lists["parents"], lists["sources"]


@router.get("/builds", tags=["builds"])
def list_builds(queue: Builds, user: Viewer,
                status: Annotated[list[str] | None, Query()] = None,
                image: str | None = None, limit: int = 50, offset: int = 0) -> dict[str, Any]:
    """Your builds, newest first (admins: everyone's); `image=REF`: the builds that made
    or remake that image. Logs are left out (`log_size` says how long they are)."""
    try:
        found, total = queue.list_builds(user, image=image, statuses=status or [],
                                         limit=limit, offset=offset)
    except ValueError as exc:
        raise InvalidRequest(f"bad status: {exc}") from None
    return {"builds": [b.to_dict(with_log=False) for b in found], "total": total,
            "limit": limit, "offset": offset}


@router.get("/builds/{build_id}", tags=["builds"])
def show_build(build_id: str, queue: Builds, user: Viewer,
               log_offset: int = 0) -> dict[str, Any]:
    """Status, phase, progress, timings, image id, error, and the log from `log_offset`
    (characters) on; a follower passes the last `log_size` to get only what is new.
    `phase_timeout_s`: how long the current phase may take at most, when it has a
    limit (the boot test), so a client can show the time left."""
    if log_offset < 0:
        raise InvalidRequest("log_offset must be >= 0")
    build = queue.get(user, build_id, log_offset=log_offset)
    limit = queue.config.boot_timeout if build.phase == "boot-test" and \
        not build.status.finished else None
    return {**build.to_dict(), "phase_timeout_s": limit}


@router.post("/builds/{build_id}/cancel", tags=["builds"])
def cancel_build(build_id: str, queue: Builds, user: Viewer) -> dict[str, Any]:
    """Cancel a build (owner or admin): a queued one is `cancelled` at once, a running
    one `cancelling` until its worker has stopped it (then `cancelled`, no image left,
    its temporary files removed); a build that is over is a 409."""
    return queue.cancel(user, build_id).to_dict()


# -- images --------------------------------------------------------------------
@router.post("/images/purge", tags=["images"])
def purge_unused(r: Repo, user: Viewer, unused_for: str,
                 dry_run: bool = False) -> dict[str, Any]:
    """Purge your built images not pulled for `unused_for` (e.g. `90d`; admins: everyone's).
    Protected images and images without a template are left alone."""
    images = r.purge_unused(user, parse_duration(unused_for), dry_run=dry_run)
    return {"images": [i.to_dict() for i in images], "count": len(images), "dry_run": dry_run}


@router.post("/images/{ref}/purge", tags=["images"])
def purge_image(ref: str, r: Repo, user: Viewer) -> dict[str, Any]:
    """Drop the content, keep the metadata and the template (status `purged`)."""
    return r.purge(user, ref).to_dict()


@router.post("/images/{ref}/rebuild", tags=["images"], status_code=202)
def rebuild_image(ref: str, queue: Builds, user: Viewer) -> JSONResponse:
    """Rebuild a purged image now (owner or admin); returns the build (shared if running)."""
    return _accepted(queue.rebuild(user, ref))


@router.get("/images/{ref}/pedigree", tags=["images"])
def pedigree(ref: str, r: Repo, user: Viewer) -> dict[str, Any]:
    """The image, its parent, … as far as you may see; an image you may not see ends the
    chain as `{"id", "hidden": true}`, a deleted one is shown with `"deleted": true`.
    Each entry says what its template starts `from`."""
    chain, hidden = r.pedigree(user, ref)
    entries = [{**image.to_dict(), "from": _template_from(image), "hidden": False,
                "deleted": image.status == ImageStatus.DELETED} for image in chain]
    if hidden:
        entries.append({"id": hidden, "hidden": True})
    return {"pedigree": entries}


def _template_from(image: Image) -> str | None:
    if not image.template:
        return None
    try:
        return str(parse_template(image.template).base)
    except RainError:
        return None
