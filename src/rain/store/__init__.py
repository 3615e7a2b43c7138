"""Content-addressed chunk store: chunking, digests, manifests, backends, gc."""

from rain.store.backend import Backend, ObjectInfo
from rain.store.backends.fs import FilesystemBackend
from rain.store.chunks import DEFAULT_CHUNK_SIZE, ChunkStore, StoreConfig
from rain.store.gc import GcReport, collect
from rain.store.manifest import ZERO_DIGEST, ImageManifest
from rain.store.stream import ImageReader, ImageWriter

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ZERO_DIGEST",
    "Backend",
    "ChunkStore",
    "FilesystemBackend",
    "GcReport",
    "ImageManifest",
    "ImageReader",
    "ImageWriter",
    "ObjectInfo",
    "StoreConfig",
    "collect",
]
