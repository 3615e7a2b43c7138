"""What moving an image needs: its manifest and its torrent, its chunks read verified, and
the hooks run when an image becomes active (the BitTorrent method makes its torrent there).

Manifests and torrents are image data, so reading them takes the same checks as
pulling the image. The deploy side (rain.deploy) and the repository halves of the
transfer methods use the internal methods (no viewer) once the deployment's user
was checked: they name what a deployment needs, so nothing outside rain.repo
reaches for the catalog or the chunk store.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from rain.catalog import Catalog
from rain.model import Image, NotFound, User
from rain.model.clock import utcnow
from rain.repo.convert import materialize
from rain.store import ChunkStore, ImageManifest, ImageReader

log = logging.getLogger("rain.repo")


class ImageDistribution:
    """Mixed into `Repository` (which provides what is declared here)."""

    catalog: Catalog
    store: ChunkStore
    # Called with the image each time one becomes active (an upload or a rebuild ends).
    activation_hooks: list[Callable[[Image], None]]

    if TYPE_CHECKING:
        def readable_image(self, viewer: User | None, ref: str) -> Image: ...

    def image_manifest(self, viewer: User | None, ref: str) -> tuple[Image, ImageManifest]:
        """The stored manifest of an image the viewer may pull (its chunk digests)."""
        image = self.readable_image(viewer, ref)
        manifest_id = self.catalog.manifest_id(image.id)
        assert manifest_id, f"active image {image.id} has no manifest"
        return image, self.store.get_manifest(manifest_id)

    # -- internal: for deployments, whose user was checked already ----------------------
    def manifest_id_of(self, image_id: str) -> str | None:
        """The id of the manifest the image's bytes are stored under (None: no data)."""
        return self.catalog.manifest_id(image_id)

    def load_manifest(self, manifest_id: str) -> ImageManifest:
        return self.store.get_manifest(manifest_id)

    def chunk_reader(self, manifest: ImageManifest, image_id: str = "") -> ImageReader:
        """Reads the chunks `manifest` lists, each verified (any manifest: a method may
        send the image's chunks in an order of its own)."""
        return ImageReader(self.store, manifest, image=image_id)

    def write_sparse(self, manifest: ImageManifest, path: Path, image_id: str) -> None:
        """Write the image to a sparse local file (zero chunks become holes)."""
        materialize(self.store, manifest, path, image_id)

    def chunk_digests(self, image_ids: Iterable[str]) -> set[bytes]:
        """The data chunks of these images (ones without stored data add nothing)."""
        have: set[bytes] = set()
        for image_id in image_ids:
            with contextlib.suppress(Exception):
                manifest_id = self.catalog.manifest_id(image_id)
                if manifest_id:
                    have |= self.store.get_manifest(manifest_id).unique_digests()
        return have

    def record_deploy(self, image_id: str, user: User, nbytes: int) -> None:
        """A node got the image for a deployment of `user`'s: one usage record (its Range
        requests are not logged) and an access."""
        now = utcnow()
        self.catalog.record_usage(image_id, user.id, "deploy", nbytes, now)
        self.catalog.record_access(image_id, now)

    def image_with_owner(self, image_id: str) -> tuple[Image, User]:
        """An image by id and its owner, for work the server does on the owner's behalf
        (a prefetch)."""
        image = self.catalog.get_image(image_id)
        return image, self.catalog.get_user(image.owner)

    def torrent_of(self, image_id: str) -> tuple[str, int, bytes] | None:
        """(info hash, piece size, bencoded torrent) of the image, or None."""
        return self.catalog.get_torrent(image_id)

    def save_torrent(self, image_id: str, info_hash: str, piece_size: int,
                      data: bytes) -> None:
        self.catalog.put_torrent(image_id, info_hash, piece_size, data)

    def torrent_for(self, viewer: User | None, ref: str) -> tuple[Image, str, int, bytes]:
        """(image, info hash, piece size, torrent) of an image the viewer may pull."""
        image = self.readable_image(viewer, ref)
        found = self.catalog.get_torrent(image.id)
        if found is None:
            raise NotFound(f"image {image.id} has no torrent yet")
        return (image, *found)

    def run_activation_hooks(self, image: Image) -> None:
        """Tell every hook that `image` is active; a failing hook is logged, nothing more."""
        for hook in list(self.activation_hooks):
            try:
                hook(image)
            except Exception:
                log.exception("activation hook %r failed for image %s", hook, image.id)
