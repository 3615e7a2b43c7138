"""Image manifests: the ordered list of chunk digests that make up one image.

Binary layout (small: 32 bytes a chunk, 256 KiB for 2 GiB at 256 KiB chunks):
    b"RAINMAN1" | u32 header length | JSON header | N × 32-byte digests
An all-zero chunk is recorded as ZERO_DIGEST and never stored: disk images are
mostly empty and this is the cheapest dedup there is.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field

from rain.model.errors import StoreCorruption

MAGIC = b"RAINMAN1"
DIGEST_LEN = 32
ZERO_DIGEST = b"\x00" * DIGEST_LEN


@dataclass
class ImageManifest:
    chunk_size: int
    size: int
    sha256: str
    chunks: list[bytes] = field(default_factory=list)

    def chunk_length(self, index: int) -> int:
        start = index * self.chunk_size
        return min(self.chunk_size, self.size - start)

    def unique_digests(self) -> set[bytes]:
        return {d for d in self.chunks if d != ZERO_DIGEST}

    def to_bytes(self) -> bytes:
        header = json.dumps(
            {"chunk_size": self.chunk_size, "size": self.size, "sha256": self.sha256,
             "count": len(self.chunks)},
            sort_keys=True,
        ).encode()
        return MAGIC + struct.pack(">I", len(header)) + header + b"".join(self.chunks)

    @property
    def id(self) -> str:
        """Content address of the manifest itself."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes, *, name: str = "") -> ImageManifest:
        try:
            if data[:8] != MAGIC:
                raise ValueError("bad magic")
            (hlen,) = struct.unpack(">I", data[8:12])
            header = json.loads(data[12 : 12 + hlen])
            body = data[12 + hlen :]
            count = int(header["count"])
            if len(body) != count * DIGEST_LEN:
                raise ValueError("digest list truncated")
            chunks = [body[i : i + DIGEST_LEN] for i in range(0, len(body), DIGEST_LEN)]
            manifest = cls(int(header["chunk_size"]), int(header["size"]), str(header["sha256"]),
                           chunks)
        except (ValueError, KeyError, struct.error, json.JSONDecodeError) as exc:
            raise StoreCorruption(f"manifest {name or '?'} is corrupt: {exc}") from None
        expected = -(-manifest.size // manifest.chunk_size) if manifest.size else 0
        if expected != count:
            raise StoreCorruption(f"manifest {name or '?'} is corrupt: {count} chunks for "
                                  f"{manifest.size} bytes")
        return manifest
