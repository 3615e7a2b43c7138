"""The content-addressed chunk store over a backend.

Chunk objects are keyed `chunks/ab/<sha256 hex>` and hold exactly the chunk's
bytes — so they can be written with direct I/O from aligned buffers — or, when
compression is on and saves at least an eighth, `chunks/ab/<hex>.zst`. Every
read is decompressed and re-hashed: a mismatch raises `StoreCorruption`
naming the chunk, never returns bad bytes.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import zstandard

from rain.model.errors import StoreCorruption
from rain.store.backend import Backend, ObjectInfo
from rain.store.manifest import ImageManifest

ZSTD_SUFFIX = ".zst"
DEFAULT_CHUNK_SIZE = 256 * 1024


@dataclass
class StoreConfig:
    """How images are cut and kept; chunk size is fixed per store (see docs/architecture.md)."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    compress: bool = False
    zstd_level: int = 3
    # "commit": one filesystem barrier when an image commits; "chunk": fsync every chunk.
    fsync: str = "commit"
    # Write new chunks with O_DIRECT where the backend supports it: no page cache
    # to allocate and dirty for data that is written once and rarely read soon.
    direct_io: bool = True


def chunk_key(digest: bytes) -> str:
    # One level of 256 directories: a deeper fan-out makes a first upload
    # create thousands of directories, which costs more than it saves.
    h = digest.hex()
    return f"chunks/{h[:2]}/{h}"


def manifest_key(manifest_id: str) -> str:
    return f"manifests/{manifest_id[:2]}/{manifest_id}"


class ChunkStore:
    def __init__(self, backend: Backend, config: StoreConfig | None = None) -> None:
        self.backend = backend
        self.config = config or StoreConfig()
        self._local = threading.local()

    # -- zstd contexts are not thread-safe: one per thread
    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self.config.zstd_level)
        return c

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d

    def put_chunk(self, digest: bytes, data: bytes | memoryview) -> int:
        """Store a chunk unless present; returns the bytes this call added (0 on a dedup hit).

        A hit refreshes the object's mtime so a concurrent gc's grace period
        covers chunks that an in-progress upload has just started to reference.
        """
        key = chunk_key(digest)
        for existing in (key, key + ZSTD_SUFFIX):
            info = self.backend.stat(existing)
            if info is not None and info.size > 0:
                self.backend.touch(existing)
                return 0
        if self.config.compress:
            packed = self._compressor().compress(data)
            if len(packed) < len(data) - len(data) // 8:
                self.backend.put(key + ZSTD_SUFFIX, packed, sync=self.config.fsync == "chunk")
                return len(packed)
        self.backend.put(key, data, sync=self.config.fsync == "chunk",
                         direct=self.config.direct_io)
        return len(data)

    def get_chunk(self, digest: bytes, length: int, *, image: str = "") -> bytes:
        key = chunk_key(digest)
        name = f"chunk {digest.hex()}" + (f" of image {image}" if image else "")
        try:
            data = self.backend.get(key)
        except KeyError:
            try:
                packed = self.backend.get(key + ZSTD_SUFFIX)
            except KeyError:
                raise StoreCorruption(f"{name} is missing from the store") from None
            try:
                data = self._decompressor().decompress(packed, max_output_size=length)
            except zstandard.ZstdError:
                raise StoreCorruption(f"{name} is corrupt (bad zstd)") from None
        if len(data) != length or hashlib.sha256(data).digest() != digest:
            raise StoreCorruption(f"{name} is corrupt (digest mismatch)")
        return data

    def has_chunk(self, digest: bytes) -> bool:
        key = chunk_key(digest)
        return any(self.backend.stat(k) is not None for k in (key, key + ZSTD_SUFFIX))

    def put_manifest(self, manifest: ImageManifest) -> str:
        """Make all chunks durable, then the manifest: a manifest never points at lost data."""
        if self.config.fsync != "chunk":
            self.backend.sync()
        mid = manifest.id
        self.backend.put(manifest_key(mid), manifest.to_bytes(), sync=True)
        return mid

    def get_manifest(self, manifest_id: str) -> ImageManifest:
        try:
            data = self.backend.get(manifest_key(manifest_id))
        except KeyError:
            raise StoreCorruption(f"manifest {manifest_id} is missing from the store") from None
        manifest = ImageManifest.from_bytes(data, name=manifest_id)
        if manifest.id != manifest_id:
            raise StoreCorruption(f"manifest {manifest_id} is corrupt (digest mismatch)")
        return manifest

    def list_manifests(self) -> Iterator[tuple[str, ObjectInfo]]:
        for info in self.backend.list("manifests/"):
            name = info.key.rsplit("/", 1)[-1]
            if not name.startswith("."):
                yield name, info

    def list_chunks(self) -> Iterator[tuple[bytes, ObjectInfo]]:
        for info in self.backend.list("chunks/"):
            name = info.key.rsplit("/", 1)[-1].removesuffix(ZSTD_SUFFIX)
            if len(name) == 64 and not name.startswith("."):
                yield bytes.fromhex(name), info

    def delete_chunk(self, digest: bytes) -> None:
        key = chunk_key(digest)
        self.backend.delete(key)
        self.backend.delete(key + ZSTD_SUFFIX)

    def delete_manifest(self, manifest_id: str) -> None:
        self.backend.delete(manifest_key(manifest_id))
