"""The content-addressed chunk store over a backend.

Chunk objects are keyed `chunks/ab/cd/<sha256 hex>`; the object is a one-byte
encoding tag followed by the payload (raw, or zstd when that saves at least an
eighth). Every read is decompressed and re-hashed: a mismatch raises
`StoreCorruption` naming the chunk, never returns bad bytes.
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

RAW, ZSTD = b"\x00", b"\x01"
DEFAULT_CHUNK_SIZE = 256 * 1024


@dataclass
class StoreConfig:
    """How images are cut and kept; chunk size is fixed per store (see docs/architecture.md)."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    compress: bool = False
    zstd_level: int = 3
    # "commit": one filesystem barrier when an image commits; "chunk": fsync every chunk.
    fsync: str = "commit"


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
        info = self.backend.stat(key)
        if info is not None and info.size > 1:
            self.backend.touch(key)
            return 0
        parts: list[bytes | memoryview] = [RAW, data]
        if self.config.compress:
            packed = self._compressor().compress(data)
            if len(packed) < len(data) - len(data) // 8:
                parts = [ZSTD, packed]
        self.backend.put(key, parts, sync=self.config.fsync == "chunk")
        return len(parts[1])

    def get_chunk(self, digest: bytes, length: int, *, image: str = "") -> bytes:
        key = chunk_key(digest)
        name = f"chunk {digest.hex()}" + (f" of image {image}" if image else "")
        try:
            payload = self.backend.get(key)
        except KeyError:
            raise StoreCorruption(f"{name} is missing from the store") from None
        tag, body = payload[:1], payload[1:]
        if tag == ZSTD:
            try:
                data = self._decompressor().decompress(body, max_output_size=length)
            except zstandard.ZstdError:
                raise StoreCorruption(f"{name} is corrupt (bad zstd)") from None
        elif tag == RAW:
            data = body
        else:
            raise StoreCorruption(f"{name} is corrupt (bad tag)")
        if len(data) != length or hashlib.sha256(data).digest() != digest:
            raise StoreCorruption(f"{name} is corrupt (digest mismatch)")
        return data

    def has_chunk(self, digest: bytes) -> bool:
        return self.backend.stat(chunk_key(digest)) is not None

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
            name = info.key.rsplit("/", 1)[-1]
            if len(name) == 64 and not name.startswith("."):
                yield bytes.fromhex(name), info

    def delete_chunk(self, digest: bytes) -> None:
        self.backend.delete(chunk_key(digest))

    def delete_manifest(self, manifest_id: str) -> None:
        self.backend.delete(manifest_key(manifest_id))
