"""The node cache: verified images by image id, bounded in size.

Layout under `root`: `images/<id>.<fmt>` for the image files and `index.json`
for their records. An image enters only after its SHA-256 matches the digest
the repository gave (temp file in `images/`, hash while copying, rename), and
the index is rewritten atomically after every change, so a crash leaves either
the old state or the new one plus a stray file that the next start removes.

Eviction: LFU with dynamic aging (LFU-DA, the GDSF family as in Squid's
`heap LFUDA`). Every image has a priority

    H = L + use_count

computed when it is added or used, where L (the cache's *age*) is set to the
H of the last image evicted. The image with the lowest H goes first; ties go
to the least recently used. GDSF's general form is H = L + freq * cost / size;
refetching an image costs time proportional to its size, so cost/size is a
constant and drops out, which leaves popularity weighted by recency: a
popular image stays while it keeps being used, but since L rises with each
eviction, images used recently enter with a higher H than ones whose uses lie
long in the past, so an image that was popular once cannot hold its place
forever.

Images backing a live instance disk are pinned (`pin`/`unpin`, a reference
count held by `rain.agent.instances.Instances`, which re-pins from its
own records on start) and are never evicted.

Capacity counts allocated bytes (what the images really take on the node's
disk), so a sparse raw image counts for its data, not its virtual size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rain.model import DiskFormat
from rain.model.errors import (
    Conflict,
    InvalidImage,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
)
from rain.model.units import plural
from rain.store.manifest import ImageManifest

INDEX = "index.json"
TMP_PREFIX = ".tmp-"
_BLOCK = 1 << 20
_ZERO_BLOCK = bytes(_BLOCK)
# Image ids become file names: keep them to a safe alphabet.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_id(value: str, what: str = "image id") -> str:
    """`value` if it is safe as a file name, else InvalidRequest."""
    if not _ID.fullmatch(value) or ".." in value:
        raise InvalidRequest(f"{what} {value!r} must be 1-128 of A-Z a-z 0-9 . _ -")
    return value


@dataclass
class CachedImage:
    """One image in the node cache (the index record, plus its path and pin count)."""

    image_id: str
    format: DiskFormat
    size: int  # apparent file size
    allocated: int  # bytes on disk; what capacity counts
    sha256: str
    added: float
    last_used: float
    use_count: int
    priority: float
    path: Path
    pins: int = 0

    def record(self) -> dict[str, Any]:
        data = asdict(self)
        del data["path"], data["pins"]
        data["format"] = str(self.format)
        return data


class NodeCache:
    """Verified images on one node, kept within `capacity` bytes (see module docstring)."""

    def __init__(
        self, root: Path, capacity: int, *, clock: Callable[[], float] = time.time
    ) -> None:
        if capacity <= 0:
            raise InvalidRequest(f"cache capacity must be positive, not {capacity}")
        self.root = Path(root).absolute()
        self.images_dir = self.root / "images"
        # Chunk digests of every cached image: what the `chunks` method and peers look up.
        self.manifests_dir = self.root / "manifests"
        self.capacity = capacity
        self._clock = clock
        self._lock = threading.RLock()
        self._entries: dict[str, CachedImage] = {}
        self._pins: dict[str, int] = {}
        self._age = 0.0  # L in H = L + use_count
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.manifests_dir.mkdir(exist_ok=True)
        self._load()

    # -- queries ---------------------------------------------------------

    @property
    def used(self) -> int:
        """Allocated bytes of all cached images."""
        with self._lock:
            return sum(e.allocated for e in self._entries.values())

    @property
    def pinned(self) -> int:
        """Allocated bytes of the images live disks read through to: what no new image
        can take (everything else can be evicted to make room)."""
        with self._lock:
            return sum(e.allocated for e in self._entries.values()
                       if self._pins.get(e.image_id, 0) > 0)

    def list(self) -> list[CachedImage]:
        """All cached images, next eviction candidate first."""
        with self._lock:
            entries = sorted(self._entries.values(), key=_eviction_key)
            return [self._view(e) for e in entries]

    def entry(self, image_id: str) -> CachedImage | None:
        """The record of one image without counting it as a use."""
        with self._lock:
            e = self._entries.get(image_id)
            return None if e is None else self._view(e)

    def manifest(self, image_id: str) -> ImageManifest | None:
        """The chunk digests of a cached image, when it was admitted with them."""
        path = self.manifests_dir / f"{image_id}.manifest"
        with self._lock:
            if image_id not in self._entries:
                return None
        try:
            return ImageManifest.from_bytes(path.read_bytes(), name=image_id)
        except FileNotFoundError:
            return None

    def partial_path(self, image_id: str) -> Path:
        """Where a download of `image_id` is assembled: inside the cache (same filesystem,
        so admission is a rename) under a temp name the next start removes."""
        check_id(image_id)
        return self.images_dir / f"{TMP_PREFIX}{image_id}.partial"

    def get(self, image_id: str) -> Path | None:
        """Path of a cached image (counted as a use: recency and popularity), or None."""
        with self._lock:
            e = self._entries.get(image_id)
            if e is None:
                return None
            self._touch(e)
            self._save()
            return e.path

    # -- changes ---------------------------------------------------------

    def add(
        self, image_id: str, src: Path, fmt: DiskFormat, sha256: str, *, move: bool = False,
        manifest: ImageManifest | None = None, verified: bool = False,
    ) -> CachedImage:
        """Admit `src` as `image_id` once its SHA-256 matches, evicting others to make room.

        `move=True` renames `src` into the cache (same filesystem) instead of
        copying it, for a download that was written next to the cache. On a
        digest mismatch nothing is kept (with `move`, `src` is gone too: it
        was bad data) and InvalidImage is raised. `verified=True` (with
        `move` and `manifest`) skips the second hash for a file whose every
        chunk was already checked against `manifest` (a PartialImage):
        matching chunks mean a matching whole. `manifest` is kept beside the
        image for chunk lookups.
        """
        check_id(image_id)
        fmt = DiskFormat(fmt)
        want = sha256.lower().removeprefix("sha256:")
        if not re.fullmatch(r"[0-9a-f]{64}", want):
            raise InvalidRequest(f"sha256 {sha256!r} is not a hex SHA-256 digest")
        with self._lock:
            existing = self._entries.get(image_id)
            if existing is not None:
                if existing.sha256 != want:
                    raise Conflict(
                        f"image {image_id} is cached with a different digest ({existing.sha256})"
                    )
                self._touch(existing)
                self._save()
                return self._view(existing)

        if verified and (manifest is None or not move or manifest.sha256 != want):
            raise InvalidRequest("a verified admission needs move=True and the image's manifest")
        tmp = self.images_dir / f"{TMP_PREFIX}{image_id}.{os.getpid()}.{threading.get_ident()}"
        try:
            if verified:
                os.replace(src, tmp)
                got = want
            else:
                got = _move_and_hash(src, tmp) if move else _copy_and_hash(src, tmp)
            if got != want:
                raise InvalidImage(
                    f"image {image_id}: SHA-256 of the received data is {got}, expected {want}"
                )
            st = tmp.stat()
            with self._lock:
                if image_id in self._entries:  # another thread admitted it meanwhile
                    return self._view(self._entries[image_id])
                self._make_room(st.st_blocks * 512, image_id)
                final = self.images_dir / f"{image_id}.{fmt}"
                if manifest is not None:
                    _write_atomic(self.manifests_dir / f"{image_id}.manifest",
                                  manifest.to_bytes())
                os.replace(tmp, final)
                now = self._clock()
                e = CachedImage(
                    image_id=image_id,
                    format=fmt,
                    size=st.st_size,
                    allocated=st.st_blocks * 512,
                    sha256=want,
                    added=now,
                    last_used=now,
                    use_count=0,
                    priority=0.0,
                    path=final,
                )
                self._touch(e)  # being fetched counts as the first use
                self._entries[image_id] = e
                self._save()
                return self._view(e)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def evict(self, image_id: str) -> None:
        """Remove one image now; Conflict while an instance disk uses it."""
        with self._lock:
            e = self._entries.get(image_id)
            if e is None:
                raise NotFound(f"image {image_id} is not in the node cache")
            if self._pins.get(image_id, 0) > 0:
                raise Conflict(
                    f"image {image_id} backs {plural(self._pins[image_id], 'instance disk')}; "
                    "delete them first"
                )
            self._remove(e)
            self._save()

    def pin(self, image_id: str) -> Path:
        """Hold `image_id` in the cache: one more live disk reads through to it."""
        with self._lock:
            e = self._entries.get(image_id)
            if e is None:
                raise NotFound(f"image {image_id} is not in the node cache")
            self._pins[image_id] = self._pins.get(image_id, 0) + 1
            return e.path

    def unpin(self, image_id: str) -> None:
        """Release one hold taken by `pin`."""
        with self._lock:
            n = self._pins.get(image_id, 0) - 1
            if n > 0:
                self._pins[image_id] = n
            else:
                self._pins.pop(image_id, None)

    # -- internals -------------------------------------------------------

    def _touch(self, e: CachedImage) -> None:
        e.use_count += 1
        e.last_used = self._clock()
        e.priority = self._age + e.use_count

    def _make_room(self, need: int, image_id: str) -> None:
        """Evict lowest-priority unpinned images until `need` more bytes fit, or refuse."""
        if need > self.capacity:
            raise QuotaExceeded(
                f"image {image_id} needs {need} bytes, more than the whole cache ({self.capacity})"
            )
        used = sum(e.allocated for e in self._entries.values())
        if used + need <= self.capacity:
            return
        victims: list[CachedImage] = []
        for e in sorted(self._entries.values(), key=_eviction_key):
            if self._pins.get(e.image_id, 0) > 0:
                continue
            victims.append(e)
            used -= e.allocated
            if used + need <= self.capacity:
                break
        else:
            pinned = sorted(i for i, n in self._pins.items() if n > 0)
            raise QuotaExceeded(
                f"node cache full: image {image_id} needs {need} bytes and only "
                f"{self.capacity - used} can be freed; pinned by instances: "
                f"{', '.join(pinned) or 'none'}",
                details={"pinned": pinned, "need": need},
            )
        for e in victims:
            self._age = max(self._age, e.priority)
            self._remove(e)

    def _remove(self, e: CachedImage) -> None:
        with contextlib.suppress(FileNotFoundError):
            e.path.unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.manifests_dir / f"{e.image_id}.manifest").unlink()
        del self._entries[e.image_id]

    def _view(self, e: CachedImage) -> CachedImage:
        return CachedImage(**{**asdict(e), "pins": self._pins.get(e.image_id, 0)})

    def _load(self) -> None:
        index = self.root / INDEX
        if index.exists():
            data = json.loads(index.read_text())
            self._age = float(data.get("age", 0.0))
            for rec in data.get("images", []):
                fmt = DiskFormat(rec["format"])
                path = self.images_dir / f"{rec['image_id']}.{fmt}"
                if path.exists():  # an image deleted by hand is simply gone
                    self._entries[rec["image_id"]] = CachedImage(
                        **{**rec, "format": fmt, "path": path}
                    )
        for p in self.root.glob(f"{TMP_PREFIX}{INDEX}.*"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        known = {e.path.name for e in self._entries.values()}
        for p in self.images_dir.iterdir():
            # Temp files of interrupted adds, and files renamed in just before a
            # crash whose record was never written: unverified as far as we know.
            if p.name not in known:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        for p in self.manifests_dir.iterdir():
            if p.name.removesuffix(".manifest") not in self._entries:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        self._save()

    def _save(self) -> None:
        data = {
            "age": self._age,
            "images": [e.record() for e in self._entries.values()],
        }
        tmp = self.root / f"{TMP_PREFIX}{INDEX}.{os.getpid()}.{threading.get_ident()}"
        with tmp.open("w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / INDEX)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{threading.get_ident()}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _eviction_key(e: CachedImage) -> tuple[float, float, float]:
    return (e.priority, e.last_used, e.added)


def _copy_and_hash(src: Path, dst: Path) -> str:
    """Copy `src` to a new file `dst` in one pass, hashing it; zero blocks stay holes."""
    digest = hashlib.sha256()
    with src.open("rb") as fin, dst.open("xb") as fout:
        while True:
            block = fin.read(_BLOCK)
            if not block:
                break
            digest.update(block)
            if block == _ZERO_BLOCK:
                fout.seek(len(block), os.SEEK_CUR)
            else:
                fout.write(block)
        fout.truncate()  # gives the file its length when it ends in a hole
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest()


def _move_and_hash(src: Path, dst: Path) -> str:
    os.replace(src, dst)
    digest = hashlib.sha256()
    with dst.open("rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()
