"""The storage backend protocol: a flat key → bytes space.

Manifests (and the loose chunk objects of stores written before packs) are
small whole objects: `put`/`get`. Chunks go into pack objects, which are
written in ranges while an upload runs and read back in ranges: `open_writer`
and `read_range`. A filesystem backend ships now; an S3 backend can implement
the same protocol (a pack writer as a multipart upload, `read_range` as a
ranged GET).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float


class RangeWriter(Protocol):
    """One object written piecewise at chosen offsets, by several threads at once.

    `align` is what the offsets and the lengths and addresses of the parts must
    be multiples of (4096 while writing with O_DIRECT, else 1); it may drop to 1
    during the life of the writer, never rise.
    """

    key: str
    align: int

    def write_at(self, offset: int, parts: Sequence[bytes | memoryview]) -> None:
        """Write the concatenation of `parts` at `offset` (thread-safe, no ordering)."""

    def keepalive(self) -> None:
        """Show gc that the object is still being written (refresh its mtime)."""

    def commit(self) -> None:
        """Make everything written durable (and visible, for object stores)."""

    def alive(self) -> bool:
        """False if the object was deleted behind the writer's back (by gc)."""

    def close(self) -> None:
        """Release the handle; the object stays."""

    def discard(self) -> None:
        """Close and delete the object."""


class Backend(Protocol):
    def put(self, key: str, data: bytes | memoryview | Sequence[bytes | memoryview], *,
            sync: bool = False, direct: bool = False) -> None:
        """Store `data` (or the concatenation of its parts) atomically under `key`.

        `direct` is a hint: bypass caches where possible (data written once).
        """

    def get(self, key: str) -> bytes:
        """Return the object; raise KeyError when absent."""

    def open_writer(self, key: str, *, direct: bool = False, sync_each: bool = False
                    ) -> RangeWriter:
        """Create a new object to be written in ranges (see `RangeWriter`)."""

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` (fewer if the object is shorter); KeyError when absent."""

    def local_path(self, key: str) -> Path | None:
        """A local file for the store's private state (its chunk index), None if remote."""

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
