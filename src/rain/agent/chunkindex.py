"""Where on this node a chunk with a given digest already is: the `chunks` method's
LocalChunks, and what the agent's `GET /v1/peer/chunks/{hex}` reads from.

Two kinds of holder:

- cached images, through the manifests the node cache keeps beside them
  (`NodeCache.manifest`). Their chunks were verified when the image was
  admitted, so `find` returns them without reading them;
- PartialImages in flight (`register`/`unregister`), for the chunks they
  have verified so far: a node can pass on a chunk it received a moment ago.

The index is built on first use and follows the cache in two ways: the agent
tells it what it admits and evicts (`add_image`/`remove_image`), and it
compares its images with the cache's list now and then anyway
(`refresh_seconds`), so an image the agent forgot to announce costs a few
seconds of not being found, never a wrong answer. A file that went away is
a miss. Bytes on disk can rot, so `read` (what the peer endpoint should use)
checks the digest before it hands a chunk out, and a chunk that fails is
reported (`report_damaged`): it is not offered again, and the image is listed
in `damaged` for the agent to evict or re-verify.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from rain.agent.cache import NodeCache
from rain.distribute.partial import PartialImage
from rain.store.manifest import ZERO_DIGEST, ImageManifest

log = logging.getLogger(__name__)

REFRESH_SECONDS = 2.0


class _Cached:
    """One cached image's file and the first index of each of its digests."""

    def __init__(self, path: Path, manifest: ImageManifest) -> None:
        self.path = path
        self.chunk_size = manifest.chunk_size
        self.size = manifest.size
        self.first: dict[bytes, int] = {}
        for i, digest in enumerate(manifest.chunks):
            if digest != ZERO_DIGEST:
                self.first.setdefault(digest, i)


class ChunkIndex:
    """digest -> (file, offset) over a NodeCache's images and the node's PartialImages."""

    def __init__(self, cache: NodeCache | None, *, refresh_seconds: float = REFRESH_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cache = cache
        self.refresh_seconds = refresh_seconds
        self._clock = clock
        self._lock = threading.RLock()
        self._images: dict[str, _Cached] = {}
        self._where: dict[bytes, str] = {}  # digest -> id of a cached image that has it
        self._partials: dict[str, PartialImage] = {}
        self._partial_index: dict[str, dict[bytes, list[int]]] = {}
        self._bad: set[tuple[str, bytes]] = set()  # (cached image, digest) found damaged
        # (transfer, digest) that could not be read (a transfer has the id of the image it
        # becomes, so its marks are kept apart from the cached image's)
        self._bad_partial: set[tuple[str, bytes]] = set()
        self.damaged: set[str] = set()  # cached images with a chunk that failed its digest
        self._built = False
        self._checked = 0.0

    # -- following the cache ---------------------------------------------------------
    def add_image(self, image_id: str) -> bool:
        """Index a cached image (after the cache admitted it); False if it has no manifest."""
        if self.cache is None:
            return False
        entry = self.cache.entry(image_id)
        manifest = self.cache.manifest(image_id)
        if entry is None or manifest is None:
            return False
        held = _Cached(entry.path, manifest)
        with self._lock:
            self._images[image_id] = held
            for digest in held.first:
                if (image_id, digest) not in self._bad:
                    self._where.setdefault(digest, image_id)
        return True

    def remove_image(self, image_id: str) -> None:
        """Forget a cached image (evicted): its digests go to other holders, if any."""
        with self._lock:
            held = self._images.pop(image_id, None)
            if held is None:
                return
            lost = {d for d in held.first if self._where.get(d) == image_id}
            for d in lost:
                del self._where[d]
            # A damaged copy goes with its image; a fresh copy of it may come back later.
            self._bad = {(i, d) for i, d in self._bad if i != image_id}
            for other_id, other in self._images.items():
                if not lost:
                    break
                for d in [d for d in lost if d in other.first]:
                    if (other_id, d) not in self._bad:
                        self._where[d] = other_id
                        lost.discard(d)
            self.damaged.discard(image_id)

    def refresh(self) -> None:
        """Bring the index in line with the cache's current list of images."""
        if self.cache is None:
            return
        now_ids = {e.image_id for e in self.cache.list()}
        with self._lock:
            known = set(self._images)
            self._built = True
            self._checked = self._clock()
        for image_id in known - now_ids:
            self.remove_image(image_id)
        for image_id in now_ids - known:
            self.add_image(image_id)

    def _maybe_refresh(self) -> None:
        if not self._built or self._clock() - self._checked >= self.refresh_seconds:
            self.refresh()

    # -- transfers in flight ---------------------------------------------------------
    def register(self, image_id: str, partial: PartialImage) -> None:
        """Offer the verified chunks of a transfer in flight (until `unregister`)."""
        index: dict[bytes, list[int]] = {}
        for i, digest in enumerate(partial.manifest.chunks):
            if digest != ZERO_DIGEST:
                index.setdefault(digest, []).append(i)
        with self._lock:
            self._partials[image_id] = partial
            self._partial_index[image_id] = index

    def unregister(self, image_id: str) -> None:
        with self._lock:
            self._partials.pop(image_id, None)
            self._partial_index.pop(image_id, None)
            self._bad_partial = {(i, d) for i, d in self._bad_partial if i != image_id}

    # -- lookups ---------------------------------------------------------------------
    def find(self, digest: bytes) -> tuple[Path, int] | None:
        """(file, offset) of a chunk with this digest, or None (LocalChunks)."""
        found = self._locate(digest)
        return None if found is None else (found[1], found[2])

    def read(self, digest: bytes) -> bytes | None:
        """The chunk's bytes, checked against `digest`, or None (what peers are served)."""
        for _ in range(8):  # a damaged or vanished holder is dropped, the next one tried
            found = self._locate(digest)
            if found is None:
                return None
            holder, path, offset, length = found
            try:
                with open(path, "rb", buffering=0) as f:
                    data = os.pread(f.fileno(), length, offset)
            except OSError:
                self._forget(holder, digest, path)
                continue
            if len(data) == length and hashlib.sha256(data).digest() == digest:
                return data
            self.report_damaged(digest, path, offset)
        return None

    def _locate(self, digest: bytes) -> tuple[str, Path, int, int] | None:
        """(holder, file, offset, length) of the chunk, cached images first."""
        self._maybe_refresh()
        with self._lock:
            image_id = self._where.get(digest)
            if image_id is not None:
                held = self._images[image_id]
                offset = held.first[digest] * held.chunk_size
                return image_id, held.path, offset, min(held.chunk_size, held.size - offset)
            for pid, partial in self._partials.items():
                if (pid, digest) in self._bad_partial:
                    continue
                for i in self._partial_index[pid].get(digest, ()):
                    if partial.present(i):
                        return pid, partial.path, i * partial.chunk_size, partial.chunk_length(i)
        return None

    def _forget(self, holder: str, digest: bytes, path: Path) -> None:
        """A holder whose file is gone: a cached image evicted behind our back, or a
        transfer renamed into the cache before it was unregistered."""
        with self._lock:
            cached = self._images.get(holder)
            if cached is not None and cached.path == path:
                self.remove_image(holder)
            elif holder in self._partials:
                self._bad_partial.add((holder, digest))

    def report_damaged(self, digest: bytes, path: Path, offset: int) -> None:
        """A chunk read from `path` at `offset` did not match `digest`: never offer it again
        (LocalChunks users that verify what they read call this)."""
        with self._lock:
            holder = next((i for i, h in self._images.items() if h.path == path), None)
            if holder is None:
                transfer = next((i for i, p in self._partials.items() if p.path == path), None)
                if transfer is not None:
                    self._bad_partial.add((transfer, digest))
                return
            self._bad.add((holder, digest))
            self.damaged.add(holder)
            if self._where.get(digest) == holder:
                del self._where[digest]
                for other_id, other in self._images.items():
                    if digest in other.first and (other_id, digest) not in self._bad:
                        self._where[digest] = other_id
                        break
        log.error("node cache: image %s has a damaged chunk at offset %d (digest %s…)",
                  holder, offset, digest.hex()[:16])
