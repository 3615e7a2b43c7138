"""Purge, rebuild and pedigree: the repository side of images built from templates.

A built image keeps its template, so its content can be dropped (*purged*)
and made again on demand. Purging clears the image's manifest: its chunks go
at the next `gc` unless another image still references them (dedup). The
record — metadata, template, packages, usage — stays, with status `purged`.

The repository cannot build (that is `rain.build`, a room above it), so it
asks a `Rebuilder` — the build queue, plugged in by the server — to rebuild
a purged image when someone pulls it, and the builder hands the new content
back through `restore_file`, which keeps the image id.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from rain.catalog import Catalog, ImageQuery
from rain.model import (
    Conflict,
    DiskFormat,
    Forbidden,
    Image,
    ImageRebuilding,
    ImageStatus,
    InvalidRequest,
    NotFound,
    RainError,
    Unsupported,
    User,
)
from rain.repo.access import can_modify, require_modify, require_user

if TYPE_CHECKING:
    from rain.repo.upload import UploadResult, UploadSession

PREVIOUS_SHA256 = "rain.previous_sha256"


class Rebuilder(Protocol):
    """Starts (or joins) the rebuild of a purged image; returns the build id."""

    retry_after: int

    def rebuild_purged(self, image: Image) -> str: ...


class PurgeAndRebuild:
    """Mixed into `Repository` (which provides what is declared here)."""

    catalog: Catalog
    rebuilder: Rebuilder | None

    if TYPE_CHECKING:
        def run_activation_hooks(self, image: Image) -> None: ...
        def _require_read(self, viewer: User | None) -> None: ...
        def _upload_session(self, image: Image, declared: DiskFormat | None,
                            interrupt: Callable[[], None] | None = None) -> UploadSession: ...

    # -- purge ---------------------------------------------------------------
    def purge(self, viewer: User | None, ref: str) -> Image:
        """Drop the content, keep the record and the template (owner or admin)."""
        image = self.catalog.resolve(ref, require_user(viewer))
        require_modify(viewer, image, "purge")
        if image.status == ImageStatus.PURGED:
            return image
        if image.protected:
            raise Forbidden(f"image {image.id} is protected; unprotect it before purging")
        if not image.template:
            raise Conflict(f"image {image.id} has no template (it was pushed, not built), so "
                           "it could not be rebuilt after a purge; delete it instead if you no "
                           "longer need it")
        if image.status != ImageStatus.ACTIVE or not self.catalog.transition(
                image.id, [ImageStatus.ACTIVE], ImageStatus.PURGED, manifest_id=None,
                stored_bytes=0):
            raise Conflict(f"image {image.id} is {image.status}; only active images can be "
                           "purged")
        self.catalog.drop_variants(image.id)
        return self.catalog.get_image(image.id)

    def _purge_candidates(self, viewer: User | None, unused_for: timedelta) -> list[Image]:
        """Active built images not pulled (or, never pulled, created) for `unused_for`:
        the caller's own, or everyone's for an admin. Protected images are left out."""
        me = require_user(viewer)
        found: list[Image] = []
        offset = 0
        while True:
            page, total = self.catalog.search(ImageQuery(
                status=[str(ImageStatus.ACTIVE)], unused_for=unused_for,
                owner=None if me.is_admin else me.name, sort="last_access", descending=False,
                limit=1000, offset=offset), me)
            found += [i for i in page if i.template and not i.protected and can_modify(me, i)]
            offset += len(page)
            if not page or offset >= total:
                return found

    def purge_unused(self, viewer: User | None, unused_for: timedelta, *,
                     dry_run: bool = False) -> list[Image]:
        """Purge every candidate (see `_purge_candidates`); returns what was (or would be)
        purged. An image that changes meanwhile (pulled, protected, deleted) is skipped."""
        candidates = self._purge_candidates(viewer, unused_for)
        if dry_run:
            return candidates
        purged = []
        for image in candidates:
            try:
                purged.append(self.purge(viewer, image.id))
            except (Conflict, Forbidden, NotFound):
                continue
        return purged

    # -- pedigree ------------------------------------------------------------
    def pedigree(self, viewer: User | None, ref: str) -> tuple[list[Image], str | None]:
        """The image, its parent, the parent's parent … as far as the viewer may see.

        Returns the visible chain — deleted ancestors the viewer could see before
        included, with status `deleted` — and, if it stops at an image the viewer
        may not see, that image's id (which the last visible image shows as its
        `parent` anyway, so naming it reveals nothing more). A cycle ends the chain.
        """
        self._require_read(viewer)
        image = self.catalog.resolve(ref, viewer)
        chain, seen = [image], {image.id}
        following = image.parent
        while following and following not in seen:
            parent = self.catalog.visible_image(following, viewer) or \
                self.catalog.deleted_image(following, viewer)
            if parent is None:
                return chain, following
            chain.append(parent)
            seen.add(parent.id)
            following = parent.parent
        return chain, None

    # -- rebuild ---------------------------------------------------------------
    def purged_for_rebuild(self, viewer: User | None, ref: str) -> Image:
        """The purged image `ref`, if the viewer may have it rebuilt (owner or admin)."""
        image = self.catalog.resolve(ref, require_user(viewer))
        require_modify(viewer, image, "rebuild")
        if image.status != ImageStatus.PURGED:
            raise Conflict(f"image {image.id} is {image.status}, not purged: only purged images "
                           "are rebuilt (images are immutable; build a changed template for a "
                           "new image)")
        return image

    def rebuild_base(self, viewer: User | None, ref: str) -> Image:
        """The image a purged image `ref` is rebuilt on: its parent, as it was built the
        first time (whether or not the viewer may still see it: the owner made it there)."""
        image = self.purged_for_rebuild(viewer, ref)
        if image.parent is None:
            raise InvalidRequest(f"image {image.id} has no parent to rebuild it on")
        return self.catalog.get_image(image.parent)

    # -- template digests ------------------------------------------------------
    def image_with_template(self, viewer: User | None, digest: str,
                            status: ImageStatus = ImageStatus.ACTIVE) -> Image | None:
        """The image with this template digest the viewer reaches first (own, shared,
        public): a *template hit*, which a build need not make again."""
        self._require_read(viewer)
        return self.catalog.image_with_template(digest, viewer, status)

    def record_template(self, viewer: User | None, ref: str, digest: str, *,
                        text: str | None = None, parents: list[str] | None = None) -> Image:
        """Mark an image the viewer built (owner or admin) as made from this template."""
        image = self.catalog.resolve(ref, require_user(viewer))
        require_modify(viewer, image, "record the template of")
        fields: dict[str, object] = {"template_digest": digest}
        if text is not None:
            fields.update(template_text=text, template_parents=parents or None)
        return self.catalog.update_image(image.id, **fields)

    def _rebuilding(self, image: Image) -> RainError:
        """The error a pull of a purged image answers with, having started its rebuild."""
        if self.rebuilder is None:
            return Unsupported(f"image {image.id} was purged and this server cannot rebuild "
                               "it (no build queue)")
        build_id = self.rebuilder.rebuild_purged(image)
        return ImageRebuilding(f"image {image.id} was purged and is being rebuilt by build "
                               f"{build_id}; pull it again once that build has finished",
                               build_id=build_id, retry_after=self.rebuilder.retry_after)

    def restore_file(self, viewer: User | None, ref: str, path: Path,
                     declared: DiskFormat | None = None,
                     properties: dict[str, str] | None = None,
                     drop: tuple[str, ...] = ()) -> Image:
        """New content for a purged image (a rebuild): same id and record, purged → active.

        The content differs byte for byte from what was purged (timestamps, …);
        the sha256 it had before is appended to the `rain.previous_sha256`
        property (space-separated, oldest first). Quotas apply as for uploads.
        `properties` (the server's own, e.g. this build's `rain.boot_seconds`) replace
        those of the earlier content, and `drop` names those that no longer hold.
        """
        image = self.purged_for_rebuild(viewer, ref)
        session = self._upload_session(image, declared or image.disk_format)
        result = feed_file(session, path)
        # The old content's torrent must not describe the new content, even for the time
        # the activation hooks take to make the new one.
        self.catalog.drop_torrent(image.id)
        ok = self.catalog.transition(
            image.id, [ImageStatus.PURGED], ImageStatus.ACTIVE, sha256=result.manifest.sha256,
            size=result.manifest.size, virtual_size=result.virtual_size,
            disk_format=str(result.disk_format), stored_bytes=result.stored_bytes,
            manifest_id=result.manifest_id)
        if not ok:  # its chunks are left to gc
            raise Conflict(f"image {image.id} changed state while it was being rebuilt")
        changed = dict(properties or {})
        if image.sha256:
            changed[PREVIOUS_SHA256] = " ".join(
                x for x in (image.properties.get(PREVIOUS_SHA256), image.sha256) if x)
        if changed or drop:
            self.catalog.edit_properties(image.id, changed, remove=drop)
        active = self.catalog.get_image(image.id)
        self.run_activation_hooks(active)
        return active


def feed_file(session: UploadSession, path: Path) -> UploadResult:
    """Read a local file into an upload session (the builders' path into the store)."""
    try:
        with open(path, "rb") as f:
            session.expect_size(os.fstat(f.fileno()).st_size)
            while session.wants_header:
                piece = f.read(session.header_missing)
                if not piece:
                    break
                session.feed(piece)
            if not session.wants_header:
                while n := f.readinto(session.buffer()):
                    session.commit(n)
        return session.finish()
    except OSError as exc:
        session.abort()
        raise InvalidRequest(f"cannot read {path}: {exc.strerror or exc}") from None
    except BaseException:
        session.abort()
        raise
