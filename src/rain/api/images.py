"""`/v1/images`: create, upload, download (Range, ETag, digest), manifest, list, change,
share."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from rain.api.deps import principal, repo, viewer
from rain.api.errors import error_response
from rain.api.files import DRAIN_LIMIT, download_headers
from rain.api.ranges import parse_range
from rain.catalog import ImageQuery
from rain.model import DiskFormat, InvalidRequest, RainError, User
from rain.model.sparse import MEDIA_TYPE as SPARSE_MEDIA_TYPE
from rain.model.units import parse_duration, parse_size
from rain.repo import Repository

router = APIRouter(prefix="/v1/images", tags=["images"])
Repo = Annotated[Repository, Depends(repo)]
Viewer = Annotated[User | None, Depends(viewer)]
# The routes a node agent reads images with: a node token reads as a deployment's owner.
Reader = Annotated[User | None, Depends(principal)]
DeploymentHeader = Annotated[str | None, Header(alias="x-rain-deployment")]


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        k, sep, val = v.partition("=")
        if not sep or not k:
            raise InvalidRequest(f"bad {what} {v!r}: expected KEY=VALUE")
        out[k] = val
    return out


@router.post("", status_code=201)
def create_image(r: Repo, user: Viewer, meta: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
    """Create an image record (status `queued`); then PUT its data to `/file`."""
    return r.create(user, meta).to_dict()


@router.put("/{ref}/file")
async def upload_image(ref: str, request: Request, r: Repo, user: Viewer,
                       disk_format: DiskFormat | None = None) -> JSONResponse:
    """Stream the image data; the image becomes `active` once stored and vetted."""
    async def body() -> AsyncIterator[bytes]:
        async for piece in request.stream():
            if piece:
                yield piece

    stream = body()
    if (request.headers.get("content-type") or "").startswith(SPARSE_MEDIA_TYPE):
        # The sparse encoding is decoded by the native front end only; a client
        # that gets this answer sends the plain bytes instead.
        with contextlib.suppress(ClientDisconnect):
            await _drain(stream, DRAIN_LIMIT)
        return error_response(415, "unsupported_media_type",
                              "this server takes plain image bytes only")
    length = request.headers.get("content-length")
    declared = int(length) if length and length.isdigit() else None
    try:
        image = await r.upload(user, ref, stream, disk_format, size=declared)
    except ClientDisconnect:
        return error_response(400, "client_disconnect", "upload interrupted")
    except RainError:
        # A client still sending when the error response arrives often loses it
        # to a connection reset; reading (and dropping) a bounded rest of the
        # body first lets it see why its upload was refused — unless the body is
        # larger than what would be read anyway.
        if declared is None or declared <= DRAIN_LIMIT:
            with contextlib.suppress(ClientDisconnect):
                await _drain(stream, DRAIN_LIMIT)
        raise
    return JSONResponse(image.to_dict())



async def _drain(stream: AsyncIterator[bytes], limit: int) -> None:
    seen = 0
    async for piece in stream:
        seen += len(piece)
        if seen > limit:
            break


@router.api_route("/{ref}/file", methods=["GET", "HEAD"], response_model=None)
async def download_image(ref: str, request: Request, r: Repo, user: Reader,
                         format: DiskFormat | None = None,
                         deployment: DeploymentHeader = None) -> Response:
    """Stream the image (converted to `format` if asked); single Range supported."""
    user = r.node_reader(user, ref, deployment)
    d = await r.open_download_async(user, ref, format)
    headers = download_headers(d)
    rng = parse_range(request.headers.get("range"), d.size)
    start, end = rng if rng else (0, d.size)
    headers["Content-Length"] = str(end - start)
    status = 200
    if rng:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{d.size}"
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type="application/octet-stream")
    if_none_match = request.headers.get("if-none-match")
    if if_none_match and if_none_match.strip() in (headers["ETag"], "*"):
        return Response(status_code=304, headers={"ETag": headers["ETag"]})

    reader = d.reader()

    async def stream() -> AsyncIterator[bytes]:
        # Usage is recorded before the last block leaves, so a client that has
        # its whole image also finds the pull in the usage log; a cut-off
        # transfer is recorded with the bytes that did go out.
        sent, recorded = 0, False
        try:
            async for block in reader.aiter_range(start, end):
                sent += len(block)
                if sent == end - start:
                    recorded = True
                    await asyncio.to_thread(r.record_pull, user, d.image, sent, fresh=start == 0)
                yield block
        finally:
            if not recorded:
                await asyncio.to_thread(r.record_pull, user, d.image, sent, fresh=False)

    return StreamingResponse(stream(), status_code=status, headers=headers,
                             media_type="application/octet-stream")


@router.get("/{ref}/manifest")
def image_manifest(ref: str, r: Repo, user: Reader,
                   deployment: DeploymentHeader = None) -> dict[str, Any]:
    """The image's chunk digests (what node caches and the `chunks` method fetch by):
    `chunks` is base64 of `count` 32-byte SHA-256 digests, in order; an all-zero chunk
    is 32 zero bytes. Each chunk is `chunk_size` bytes, the last one the rest of `size`."""
    image, manifest = r.image_manifest(r.node_reader(user, ref, deployment), ref)
    return {"image_id": image.id, "sha256": manifest.sha256, "size": manifest.size,
            "disk_format": str(image.disk_format) if image.disk_format else None,
            "chunk_size": manifest.chunk_size, "count": len(manifest.chunks),
            "chunks": base64.b64encode(b"".join(manifest.chunks)).decode("ascii")}


@router.get("")
def list_images(
    r: Repo, user: Viewer,
    name: str | None = None, q: str | None = None, owner: str | None = None,
    visibility: str | None = None, status: Annotated[list[str] | None, Query()] = None,
    os_distro: str | None = None, os_release: str | None = None, arch: str | None = None,
    disk_format: str | None = None, tag: Annotated[list[str] | None, Query()] = None,
    property: Annotated[list[str] | None, Query()] = None,
    package: Annotated[list[str] | None, Query()] = None,
    min_size: str | None = None, max_size: str | None = None,
    min_virtual_size: str | None = None, max_virtual_size: str | None = None,
    created_after: datetime | None = None, created_before: datetime | None = None,
    unused_for: str | None = None, base: bool | None = None, parent: str | None = None,
    template_digest: str | None = None, sort: str = "-created",
    limit: int = 100, offset: int = 0,
) -> dict[str, Any]:
    """Search images visible to the caller; every filter combines with AND.
    `min_size`/`max_size` compare the image file's bytes (`size`), `min_virtual_size`/
    `max_virtual_size` the disk the guest sees (`virtual_size`)."""
    query = ImageQuery.from_params({
        "name": name, "text": q, "owner": owner, "visibility": visibility,
        "status": status or [], "os_distro": os_distro, "os_release": os_release,
        "arch": arch, "disk_format": disk_format, "tags": tag or [],
        "properties": _pairs(property or [], "property"), "packages": package or [],
        "min_size": parse_size(min_size) if min_size else None,
        "max_size": parse_size(max_size) if max_size else None,
        "min_virtual_size": parse_size(min_virtual_size) if min_virtual_size else None,
        "max_virtual_size": parse_size(max_virtual_size) if max_virtual_size else None,
        "created_after": created_after, "created_before": created_before,
        "unused_for": parse_duration(unused_for) if unused_for else None,
        "base": base, "parent": parent, "template_digest": template_digest,
        "sort": sort, "limit": limit, "offset": offset,
    })
    images, total = r.search(user, query)
    return {"images": [i.to_dict() for i in images], "total": total, "limit": query.limit,
            "offset": query.offset}


@router.get("/{ref}")
def show_image(ref: str, r: Repo, user: Viewer) -> dict[str, Any]:
    return r.get(user, ref).to_dict()


@router.patch("/{ref}")
def update_image(ref: str, r: Repo, user: Viewer,
                 changes: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
    """Change metadata: name, description, visibility, add_tags, remove_tags, properties,
    remove_properties, protected, base, deactivated."""
    return r.update(user, ref, changes).to_dict()


@router.post("/{ref}/rescan")
def rescan_image(ref: str, r: Repo, user: Viewer) -> dict[str, Any]:
    """Read OS, release, arch and packages again from the stored image (owner or admin)."""
    return r.rescan(user, ref).to_dict()


@router.delete("/{ref}")
def delete_image(ref: str, r: Repo, user: Viewer, force: bool = False) -> dict[str, Any]:
    """Delete (refused while protected; 409 while other images derive from it or live
    instance disks use it, unless `force=true`)."""
    return r.delete(user, ref, force=force).to_dict()


@router.post("/{ref}/members")
def share_image(ref: str, r: Repo, user: Viewer,
                member: Annotated[dict[str, str], Body()]) -> dict[str, Any]:
    """Share with `{"user": NAME}` or `{"group": NAME}`."""
    return r.share(user, ref, user=member.get("user"), group=member.get("group")).to_dict()


@router.delete("/{ref}/members")
def unshare_image(ref: str, r: Repo, user: Viewer, member_user: Annotated[
        str | None, Query(alias="user")] = None, group: str | None = None) -> dict[str, Any]:
    return r.unshare(user, ref, user=member_user, group=group).to_dict()
