"""OS, release, arch and packages read from a stored image that did not say them.

Runs when an upload ends (before the image's activation hooks) and on demand
for images already stored (`Repository.rescan`). It reads the *stored* image
— random access over its manifest's verified chunks — so push and rescan are
one path, and the upload's spool (which raw uploads never have) is not
needed. What the uploader said wins: only empty fields are filled, and the
filled ones are listed in the `rain.detected` property (with `rain.detected_from`
saying where they were read); a field the owner later sets with `rain set`
leaves that list, so a rescan never overwrites a correction. When detection
fails, `rain.detect_failed` says why in one line and the image is still
active: detection never fails an upload.

Cost: one `ReadBudget` (bytes and reads of the virtual disk, CPU seconds of
this thread) and a cap on the chunks fetched from the store.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from rain.catalog import Catalog
from rain.formats.budget import BudgetExceeded, ReadBudget
from rain.formats.rootfs import SystemInfo, detect_system
from rain.model import DiskFormat, Image
from rain.model.errors import RainError
from rain.store import ChunkStore, ImageManifest
from rain.store.manifest import ZERO_DIGEST

log = logging.getLogger(__name__)

DETECTED = "rain.detected"
DETECTED_FROM = "rain.detected_from"
DETECT_FAILED = "rain.detect_failed"
FIELDS = ("os_distro", "os_release", "arch", "packages")
MAX_CHUNK_FETCHES = 256  # 64 MiB at the default 256 KiB chunks
CACHED_CHUNKS = 16


def detection_budget() -> ReadBudget:
    return ReadBudget(max_bytes=64 << 20, max_reads=20_000, cpu_seconds=5.0)


class ManifestReader:
    """`read_at(offset, length)` over a stored image, chunk by verified chunk."""

    def __init__(self, store: ChunkStore, manifest: ImageManifest, image_id: str) -> None:
        self.store = store
        self.manifest = manifest
        self.image_id = image_id
        self.fetches = 0
        self.fetched_bytes = 0
        self._cache: OrderedDict[int, bytes] = OrderedDict()

    def read_at(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.manifest.size)
        out = bytearray()
        size = self.manifest.chunk_size
        while offset + len(out) < end:
            pos = offset + len(out)
            index, within = divmod(pos, size)
            chunk = self._chunk(index)
            out += chunk[within : within + end - pos]
        return bytes(out)

    def _chunk(self, index: int) -> bytes:
        cached = self._cache.get(index)
        if cached is not None:
            self._cache.move_to_end(index)
            return cached
        length = self.manifest.chunk_length(index)
        digest = self.manifest.chunks[index]
        if digest == ZERO_DIGEST:
            return bytes(length)
        self.fetches += 1
        if self.fetches > MAX_CHUNK_FETCHES:
            raise BudgetExceeded(f"reading the image would fetch more than {MAX_CHUNK_FETCHES}"
                                 " chunks")
        data = self.store.get_chunk(digest, length, image=self.image_id)
        self.fetched_bytes += len(data)
        self._cache[index] = data
        if len(self._cache) > CACHED_CHUNKS:
            self._cache.popitem(last=False)
        return data


def missing_fields(image: Image) -> list[str]:
    """The fields detection may fill: empty ones, and ones an earlier detection filled."""
    earlier = set(image.properties.get(DETECTED, "").split(","))
    return [f for f in FIELDS if not getattr(image, f) or f in earlier]


def detect_and_record(catalog: Catalog, store: ChunkStore, image: Image,
                      manifest: ImageManifest) -> Image:
    """Fill what the image's metadata lacks from its root filesystem; never raises."""
    wanted = missing_fields(image)
    if not wanted or image.disk_format is None:
        return image
    try:
        info, reader, budget = read_stored_system(store, image, manifest)
    except RainError as exc:
        catalog.edit_properties(image.id, {DETECT_FAILED: _one_line(exc.message)})
        return catalog.get_image(image.id)
    except Exception:  # a bug must not fail the upload that triggered it
        log.exception("detecting the system in image %s failed", image.id)
        catalog.edit_properties(image.id, {DETECT_FAILED: "internal error while reading"})
        return catalog.get_image(image.id)
    log.info("image %s: read %s from %s (%d bytes in %d reads, %d chunks, %.2f s CPU)",
             image.id, ",".join(wanted), info.source, budget.spent_bytes, budget.spent_reads,
             reader.fetches, budget.cpu_spent)
    record(catalog, image, info, wanted)
    return catalog.get_image(image.id)


def read_stored_system(store: ChunkStore, image: Image, manifest: ImageManifest,
                       budget: ReadBudget | None = None,
                       ) -> tuple[SystemInfo, ManifestReader, ReadBudget]:
    budget = budget or detection_budget()
    reader = ManifestReader(store, manifest, image.id)
    fmt = DiskFormat(image.disk_format) if image.disk_format else DiskFormat.RAW
    return detect_system(fmt, reader.read_at, manifest.size, budget), reader, budget


def record(catalog: Catalog, image: Image, info: SystemInfo, wanted: list[str]) -> None:
    found = {"os_distro": info.os_distro, "os_release": info.os_release, "arch": info.arch}
    fields = {k: v for k, v in found.items() if k in wanted and v}
    if fields:
        catalog.update_image(image.id, **fields)
    filled = list(fields)
    if "packages" in wanted and info.packages:
        catalog.set_packages(image.id, info.packages)
        filled.append("packages")
    earlier = [f for f in image.properties.get(DETECTED, "").split(",") if f in FIELDS]
    listed = [f for f in FIELDS if f in filled or (f in earlier and f in wanted)]
    props = {DETECTED_FROM: info.source}
    if listed:
        props[DETECTED] = ",".join(listed)
    catalog.edit_properties(image.id, props, [DETECT_FAILED])


def forget_detected(catalog: Catalog, image: Image, changed: set[str]) -> None:
    """The owner set these fields: they are no longer detection's to change."""
    earlier = [f for f in image.properties.get(DETECTED, "").split(",") if f in FIELDS]
    left = [f for f in earlier if f not in changed]
    if left == earlier:
        return
    if left:
        catalog.edit_properties(image.id, {DETECTED: ",".join(left)})
    else:
        catalog.edit_properties(image.id, {}, [DETECTED])


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 300 else line[:299] + "…"
