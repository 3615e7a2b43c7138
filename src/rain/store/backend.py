"""The storage backend protocol: a flat key → bytes space.

Chunks and manifests are small objects (at most one chunk each), so the
interface moves whole objects; streaming happens above, one chunk at a time.
A filesystem backend ships now; an S3 backend implements the same protocol.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float


class Backend(Protocol):
    def put(self, key: str, data: bytes | memoryview | Sequence[bytes | memoryview], *,
            sync: bool = False, direct: bool = False) -> None:
        """Store `data` (or the concatenation of its parts) atomically under `key`.

        `direct` is a hint: bypass caches where possible (data written once).
        """

    def get(self, key: str) -> bytes:
        """Return the object; raise KeyError when absent."""

    def stat(self, key: str) -> ObjectInfo | None:
        """Size and modification time, or None when absent."""

    def touch(self, key: str) -> bool:
        """Refresh the modification time (protects against gc); False when absent."""

    def delete(self, key: str) -> None:
        """Remove the object if present."""

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`."""

    def sync(self) -> None:
        """Make every completed put durable (one barrier for many objects)."""
