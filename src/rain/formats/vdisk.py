"""Read-only virtual disks: what a guest would read from a raw or qcow2 image.

The qcow2 reader follows L1 → L2 → cluster for each cluster a read touches:
unallocated clusters and subclusters (and v3 "zero" clusters) read as zeros,
compressed clusters are inflated (zlib or zstd) to at most one cluster, and
every host offset is checked against the file before it is read. Tables are
never loaded whole (an L2 entry is read as 8 or 16 bytes), so a huge or
looping table costs only what the budget of the `BoundedReader` allows.
Backing and external data files are refused, never opened.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections import OrderedDict
from typing import Protocol

import zstandard

from rain.formats.budget import BoundedReader
from rain.model import DiskFormat
from rain.model.errors import InvalidImage

_QCOW_MAGIC = b"QFI\xfb"
_INCOMPAT_DATA_FILE = 1 << 2
_INCOMPAT_COMPRESSION = 1 << 3
_INCOMPAT_EXTL2 = 1 << 4
_INCOMPAT_KNOWN = 0x1F
_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_COMPRESSED = 1 << 62
_ZERO_FLAG = 1
_MAX_L1_ENTRIES = (32 << 20) // 8  # qemu's QCOW_MAX_L1_SIZE
_CLUSTER_CACHE = 8


class VirtualDisk(Protocol):
    size: int

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset` (short only past the end of the disk)."""
        ...


class RawDisk:
    """A raw image is its own virtual disk."""

    def __init__(self, source: BoundedReader) -> None:
        self.source = source
        self.size = source.size

    def read(self, offset: int, length: int) -> bytes:
        return self.source.read(offset, length)


class Qcow2Disk:
    """The guest's view of a self-contained qcow2 image (v2 or v3)."""

    def __init__(self, source: BoundedReader) -> None:
        self.source = source
        head = source.read_exact(0, 112 if source.size >= 112 else 72, "the qcow2 header")
        (magic, version, backing, _bsize, cluster_bits, size, crypt, l1_size,
         l1_offset) = struct.unpack_from(">4sIQIIQIIQ", head, 0)
        if magic != _QCOW_MAGIC or version not in (2, 3):
            raise InvalidImage("not a qcow2 v2/v3 image")
        incompatible, header_length, compression = 0, 72, 0
        if version == 3:
            incompatible = struct.unpack_from(">Q", head, 72)[0]
            header_length = struct.unpack_from(">I", head, 100)[0]
            if incompatible & _INCOMPAT_COMPRESSION and header_length > 104:
                compression = head[104]
        if backing or incompatible & _INCOMPAT_DATA_FILE:
            raise InvalidImage("qcow2 image refers to another file")
        if crypt or incompatible & ~_INCOMPAT_KNOWN or compression not in (0, 1):
            raise InvalidImage("qcow2 image uses features this reader does not know")
        if not 9 <= cluster_bits <= 21:
            raise InvalidImage(f"qcow2 cluster_bits {cluster_bits} is out of range")
        if l1_size > _MAX_L1_ENTRIES or l1_offset % (1 << cluster_bits):
            raise InvalidImage("qcow2 L1 table is too large or misaligned")
        self.size = int(size)
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.l1_size = l1_size
        self.l1_offset = l1_offset
        self.extended = bool(incompatible & _INCOMPAT_EXTL2)
        self.l2_entry_size = 16 if self.extended else 8
        self.l2_entries = self.cluster_size // self.l2_entry_size
        self.zstd = compression == 1
        self.csize_shift = 62 - (cluster_bits - 8)
        self.csize_mask = (1 << (cluster_bits - 8)) - 1
        # qemu reads a last cluster that ends past EOF as zeros, and writes files so.
        self.file_end = -(-source.size // self.cluster_size) * self.cluster_size
        self._inflated: OrderedDict[int, bytes] = OrderedDict()

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise InvalidImage("a negative read")
        length = max(0, min(length, self.size - offset))
        out = bytearray()
        while len(out) < length:
            pos = offset + len(out)
            in_cluster = pos % self.cluster_size
            n = min(length - len(out), self.cluster_size - in_cluster)
            out += self._read_in_cluster(pos - in_cluster, in_cluster, n)
        return bytes(out)

    def _read_in_cluster(self, guest_cluster: int, start: int, n: int) -> bytes:
        index = guest_cluster >> self.cluster_bits
        l1_index, l2_index = divmod(index, self.l2_entries)
        if l1_index >= self.l1_size:
            return bytes(n)
        l1 = struct.unpack(">Q", self._host(self.l1_offset + 8 * l1_index, 8, "L1 entry"))[0]
        l2_offset = l1 & _OFFSET_MASK
        if l2_offset == 0:
            return bytes(n)
        if l2_offset % self.cluster_size:
            raise InvalidImage("qcow2 L2 table is misaligned")
        entry = self._host(l2_offset + self.l2_entry_size * l2_index, self.l2_entry_size,
                           "L2 entry")
        l2 = struct.unpack_from(">Q", entry)[0]
        if l2 & _COMPRESSED:
            return self._inflate(l2)[start : start + n]
        if not self.extended:
            host = l2 & _OFFSET_MASK
            if l2 & _ZERO_FLAG or host == 0:
                return bytes(n)
            return self._data(host, start, n)
        return self._read_subclusters(l2 & _OFFSET_MASK, entry, start, n)

    def _read_subclusters(self, host: int, entry: bytes, start: int, n: int) -> bytes:
        bitmap = struct.unpack_from(">Q", entry, 8)[0]
        sub = self.cluster_size // 32
        out = bytearray()
        while len(out) < n:
            pos = start + len(out)
            i, within = divmod(pos, sub)
            take = min(n - len(out), sub - within)
            if bitmap & (1 << (32 + i)) or not bitmap & (1 << i) or host == 0:
                out += bytes(take)
            else:
                out += self._data(host, pos, take)
        return bytes(out)

    def _data(self, host_cluster: int, start: int, n: int) -> bytes:
        if host_cluster % self.cluster_size:
            raise InvalidImage("qcow2 data cluster is misaligned")
        data = self._host(host_cluster + start, n, "data cluster")
        return data

    def _host(self, offset: int, n: int, what: str) -> bytes:
        """Bytes of the image file; zeros for the part of a last cluster past EOF."""
        if offset + n > self.file_end:
            raise InvalidImage(f"qcow2 {what} at {offset} lies past the end of the file")
        data = self.source.read(offset, n)
        return data + bytes(n - len(data))

    def _inflate(self, l2: int) -> bytes:
        host = l2 & ((1 << self.csize_shift) - 1)
        cached = self._inflated.get(host)
        if cached is not None:
            self._inflated.move_to_end(host)
            return cached
        sectors = ((l2 >> self.csize_shift) & self.csize_mask) + 1
        size = sectors * 512 - (host & 511)
        end = min(host + size, self.source.size)
        if host >= self.source.size:
            raise InvalidImage(f"qcow2 compressed cluster at {host} lies past the end of the file")
        raw = self.source.read(host, end - host)
        try:
            # Both bounded to one cluster: a compression bomb inflates no further.
            if self.zstd:
                with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)) as reader:
                    data = reader.read(self.cluster_size)
            else:
                data = zlib.decompressobj(-15).decompress(raw, self.cluster_size)
        except (zlib.error, zstandard.ZstdError):
            raise InvalidImage(f"qcow2 compressed cluster at {host} does not decompress") from None
        data = data + bytes(self.cluster_size - len(data))
        self._inflated[host] = data
        if len(self._inflated) > _CLUSTER_CACHE:
            self._inflated.popitem(last=False)
        return data


def open_virtual_disk(fmt: DiskFormat, source: BoundedReader) -> VirtualDisk:
    """The guest's view of an image; refuses formats this reader does not open."""
    if fmt in (DiskFormat.RAW, DiskFormat.ISO):
        return RawDisk(source)
    if fmt is DiskFormat.QCOW2:
        return Qcow2Disk(source)
    raise InvalidImage(f"reading inside {fmt} images is not supported (raw and qcow2 are)")
