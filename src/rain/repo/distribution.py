"""What moving an image needs: its manifest and its torrent, and the hooks run when an
image becomes active (the BitTorrent method makes its torrent there).

Manifests and torrents are image data, so reading them takes the same checks as
pulling the image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from rain.catalog import Catalog
from rain.model import Image, NotFound, User
from rain.store import ChunkStore, ImageManifest

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

    def store_torrent(self, image_id: str, info_hash: str, piece_size: int,
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
