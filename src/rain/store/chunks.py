"""The content-addressed chunk store over a backend.

New chunks go into pack files (`packs.py`), one per upload, located through
the chunk index (`index.py`, SQLite under the store root). Stores written
before packs keep their loose chunk objects, `chunks/ab/<hex>` or
`chunks/ab/<hex>.zst`: they are still read, deduplicated against and
collected, never written. Every read is decompressed and re-hashed: a
mismatch, a missing or short pack raises `StoreCorruption` naming the chunk
(and image), never returns bad bytes.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import zstandard

from rain.model.errors import StoreCorruption
from rain.store.backend import Backend, ObjectInfo
from rain.store.index import ChunkIndex, Location
from rain.store.manifest import ImageManifest
from rain.store.packs import PackWriter, Piece, pack_key

ZSTD_SUFFIX = ".zst"
DEFAULT_CHUNK_SIZE = 256 * 1024
INDEX_KEY = "index.sqlite"


@dataclass
class StoreConfig:
    """How images are cut and kept; chunk size is fixed per store (see docs/architecture.md)."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    compress: bool = False
    zstd_level: int = 3
    # "commit": packs are fdatasynced when their upload commits; "chunk": after every write.
    fsync: str = "commit"
    # Write new chunks with O_DIRECT where the backend supports it: no page cache
    # to allocate and dirty for data that is written once and rarely read soon.
    direct_io: bool = True


def chunk_key(digest: bytes) -> str:
    """Key of a loose chunk object (stores written before packs)."""
    h = digest.hex()
    return f"chunks/{h[:2]}/{h}"


def manifest_key(manifest_id: str) -> str:
    return f"manifests/{manifest_id[:2]}/{manifest_id}"


class ChunkStore:
    def __init__(self, backend: Backend, config: StoreConfig | None = None, *,
                 index_path: Path | None = None) -> None:
        self.backend = backend
        self.config = config or StoreConfig()
        path = index_path or backend.local_path(INDEX_KEY)
        if path is None:
            raise ValueError("this backend keeps no local files: give the chunk index a path")
        self.index = ChunkIndex(path)
        self._local = threading.local()
        self._shared: PackWriter | None = None  # for bare put_chunk calls
        self._shared_lock = threading.Lock()
        self._loose: bool | None = None

    def close(self) -> None:
        self.index.close()
        closer = getattr(self.backend, "close", None)
        if closer is not None:
            closer()

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

    # -- writing -------------------------------------------------------------
    def open_pack(self) -> PackWriter:
        """A pack for one upload: `store_chunks` into it, then `commit` (or `abort`)."""
        return PackWriter(self.backend, self.index, direct=self.config.direct_io,
                          sync_each=self.config.fsync == "chunk")

    def has_loose_chunks(self) -> bool:
        """Whether this store has chunk objects from before packs (checked once)."""
        if self._loose is None:
            self._loose = next(iter(self.backend.list("chunks/")), None) is not None
        return self._loose

    def _touch_loose(self, digest: bytes) -> bool:
        key = chunk_key(digest)
        return any(self.backend.touch(k) for k in (key, key + ZSTD_SUFFIX))

    def store_chunks(self, pack: PackWriter,
                     items: Sequence[tuple[bytes, bytes | memoryview]]) -> list[int]:
        """Store chunks unless present; returns the bytes each one added (0 on a dedup hit).

        Present means: claimed by this upload's own pack, in the index, or a
        loose object of an old store. Index hits are refreshed (`touched`) in
        one transaction per call, and loose hits get a new mtime, so a
        concurrent gc's grace period covers chunks an in-progress upload has
        just started to reference.
        """
        fresh = pack.unseen([d for d, _ in items])
        candidates = list(dict.fromkeys(d for d, _ in items if d in fresh))
        hits: set[bytes] = set()
        if candidates:
            maybe = self.index.present(candidates)  # read-only probe: no lock on a miss
            if maybe:
                hits = self.index.refresh(list(maybe))
            if self.has_loose_chunks():
                hits.update(d for d in candidates if d not in hits and self._touch_loose(d))
        mine = pack.claim([d for d in candidates if d not in hits])
        pieces: dict[bytes, Piece] = {}
        for digest, data in items:
            if digest in mine and digest not in pieces:
                pieces[digest] = self._piece(digest, data)
        pack.append(list(pieces.values()))
        pack.keepalive()
        out = []
        for digest, _ in items:
            piece = pieces.pop(digest, None)
            out.append(len(piece.data) if piece is not None else 0)
        return out

    def _piece(self, digest: bytes, data: bytes | memoryview) -> Piece:
        if self.config.compress:
            packed = self._compressor().compress(data)
            if len(packed) < len(data) - len(data) // 8:
                return Piece(digest, packed, len(data), True)
        return Piece(digest, data, len(data), False)

    def put_chunk(self, digest: bytes, data: bytes | memoryview) -> int:
        """Store one chunk outside an ImageWriter (it lands in a shared pack that
        `flush` or `put_manifest` commits); returns the bytes added, 0 on a dedup hit."""
        with self._shared_lock:
            if self._shared is None:
                self._shared = self.open_pack()
            pack = self._shared
        return self.store_chunks(pack, [(digest, data)])[0]

    def flush(self) -> None:
        """Commit the chunks of bare `put_chunk` calls (durable and indexed)."""
        with self._shared_lock:
            pack, self._shared = self._shared, None
        if pack is not None:
            pack.commit()

    # -- reading -------------------------------------------------------------
    def get_chunk(self, digest: bytes, length: int, *, image: str = "") -> bytes:
        name = f"chunk {digest.hex()}" + (f" of image {image}" if image else "")
        loc = self.index.lookup(digest)
        if loc is None:
            return self._get_loose(digest, length, name)
        data = self._read_packed(digest, loc, name)
        if loc.compressed:
            try:
                data = self._decompressor().decompress(data, max_output_size=length)
            except zstandard.ZstdError:
                raise StoreCorruption(f"{name} is corrupt (bad zstd)") from None
        if len(data) != length or hashlib.sha256(data).digest() != digest:
            raise StoreCorruption(f"{name} is corrupt (digest mismatch)")
        return data

    def _read_packed(self, digest: bytes, loc: Location, name: str) -> bytes:
        try:
            raw = self.backend.read_range(pack_key(loc.pack), loc.offset, loc.stored)
        except KeyError:
            # gc may have repacked it between our lookup and the read: look again, once.
            again = self.index.lookup(digest)
            if again is None or again.pack == loc.pack:
                raise StoreCorruption(f"{name} is missing from the store "
                                      f"(pack {loc.pack} is gone)") from None
            loc = again
            try:
                raw = self.backend.read_range(pack_key(loc.pack), loc.offset, loc.stored)
            except KeyError:
                raise StoreCorruption(f"{name} is missing from the store "
                                      f"(pack {loc.pack} is gone)") from None
        if len(raw) != loc.stored:
            raise StoreCorruption(f"{name} is corrupt (pack {loc.pack} is truncated)")
        return raw

    def _get_loose(self, digest: bytes, length: int, name: str) -> bytes:
        key = chunk_key(digest)
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
        if self.index.lookup(digest) is not None:
            return True
        key = chunk_key(digest)
        return any(self.backend.stat(k) is not None for k in (key, key + ZSTD_SUFFIX))

    # -- manifests -----------------------------------------------------------
    def put_manifest(self, manifest: ImageManifest) -> str:
        """Save a manifest whose chunks are already committed (`ImageWriter.finish`).

        A pack is made durable and indexed before its writer returns, so no
        filesystem-wide barrier is needed here: a manifest never points at lost data.
        """
        self.flush()
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

    def delete_manifest(self, manifest_id: str) -> None:
        self.backend.delete(manifest_key(manifest_id))

    # -- inventory -----------------------------------------------------------
    def list_chunks(self) -> Iterator[tuple[bytes, ObjectInfo]]:
        """Every stored chunk: index rows (key = their pack, mtime = touched), then loose."""
        for digest, loc, touched in list(self.index.rows()):
            yield digest, ObjectInfo(pack_key(loc.pack), loc.stored, touched)
        yield from self.list_loose_chunks()

    def list_loose_chunks(self) -> Iterator[tuple[bytes, ObjectInfo]]:
        for info in self.backend.list("chunks/"):
            name = info.key.rsplit("/", 1)[-1].removesuffix(ZSTD_SUFFIX)
            if len(name) == 64 and not name.startswith("."):
                yield bytes.fromhex(name), info

    def delete_chunk(self, digest: bytes) -> None:
        """Forget a chunk (its bytes in a pack stay until gc repacks that pack)."""
        self.index.delete(digest)
        key = chunk_key(digest)
        self.backend.delete(key)
        self.backend.delete(key + ZSTD_SUFFIX)
