"""A read-only ext2/3/4 reader: enough to look up paths and read small files.

It reads the superblock, group descriptors (32- and 64-byte), inodes, extent
trees and old-style block maps, linear and htree directories (an htree's
leaves are ordinary directory blocks), and symlinks, fast and slow. It never
writes, never mounts and trusts nothing: every block number is checked
against the filesystem, every count against what its structure can hold,
extent trees are at most 5 deep, symlinks are followed at most 40 hops, and
every read is charged to the caller's budget through the virtual disk.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

from rain.formats.budget import ReadBudget
from rain.formats.vdisk import VirtualDisk
from rain.model.errors import InvalidImage

MAGIC = 0xEF53
ROOT_INODE = 2
MAX_SYMLINK_HOPS = 40
MAX_DEPTH = 5
_READ_PIECE = 4 << 20  # a long extent is read in pieces, each one bounded read
_INCOMPAT_FILETYPE = 0x2
_INCOMPAT_META_BG = 0x10
_INCOMPAT_EXTENTS = 0x40
_INCOMPAT_64BIT = 0x80
_INCOMPAT_INLINE_DATA = 0x8000
# Features this reader understands (or that do not change how data is found): filetype,
# recover, extents, 64bit, mmp, flex_bg, ea_inode, csum_seed, largedir, inline_data,
# encrypt (refused per inode), casefold (exact names still match).
_INCOMPAT_KNOWN = 0x2 | 0x4 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x2000 | 0x4000 \
    | 0x8000 | 0x10000 | 0x20000
_EXTENTS_FL = 0x80000
_INLINE_DATA_FL = 0x10000000
_ENCRYPT_FL = 0x800
_EXTENT_MAGIC = 0xF30A
S_IFMT, S_IFDIR, S_IFREG, S_IFLNK = 0xF000, 0x4000, 0x8000, 0xA000


class Ext4Error(InvalidImage):
    """The filesystem is not ext2/3/4, uses what this reader does not know, or lies."""


@dataclass(frozen=True)
class Inode:
    number: int
    mode: int
    size: int
    flags: int
    block: bytes  # i_block: extent tree root, block map or inline data / fast symlink

    @property
    def kind(self) -> int:
        return self.mode & S_IFMT


class Ext4:
    """One ext2/3/4 filesystem at `offset` on a virtual disk."""

    def __init__(self, disk: VirtualDisk, offset: int, size: int, budget: ReadBudget) -> None:
        self.disk = disk
        self.offset = offset
        self.budget = budget
        sb = disk.read(offset + 1024, 1024)
        if len(sb) < 1024 or struct.unpack_from("<H", sb, 0x38)[0] != MAGIC:
            raise Ext4Error("no ext2/3/4 superblock")
        (inodes, blocks_lo, _r, _free_b, _free_i, first_data, log_bs) = struct.unpack_from(
            "<7I", sb, 0)
        blocks_per_group, _frags, inodes_per_group = struct.unpack_from("<III", sb, 0x20)
        rev = struct.unpack_from("<I", sb, 0x4C)[0]
        inode_size = struct.unpack_from("<H", sb, 0x58)[0] if rev >= 1 else 128
        incompat = struct.unpack_from("<I", sb, 0x60)[0]
        if log_bs > 6:
            raise Ext4Error(f"ext4 block size 2^{10 + log_bs} is out of range")
        self.block_size = 1024 << log_bs
        if incompat & ~_INCOMPAT_KNOWN or incompat & _INCOMPAT_META_BG:
            raise Ext4Error(f"ext4 features 0x{incompat:x} are not supported")
        blocks = blocks_lo
        desc_size = 32
        if incompat & _INCOMPAT_64BIT:
            blocks |= struct.unpack_from("<I", sb, 0x150)[0] << 32
            desc_size = struct.unpack_from("<H", sb, 0xFE)[0]
            if desc_size < 32 or desc_size > 1024 or desc_size & (desc_size - 1):
                raise Ext4Error(f"ext4 descriptor size {desc_size} is invalid")
        if (inode_size < 128 or inode_size > self.block_size or inode_size & (inode_size - 1)
                or blocks_per_group == 0 or inodes_per_group == 0 or inodes == 0):
            raise Ext4Error("ext4 superblock has impossible geometry")
        self.blocks = min(blocks, size // self.block_size)
        self.inodes = inodes
        self.inodes_per_group = inodes_per_group
        self.inode_size = inode_size
        self.desc_size = desc_size
        self.desc_start = (first_data + 1) * self.block_size
        self.groups = -(-max(blocks - first_data, 1) // blocks_per_group)
        self.filetype = bool(incompat & _INCOMPAT_FILETYPE)
        has_journal = struct.unpack_from("<I", sb, 0x5C)[0] & 0x4
        self.kind = ("ext4" if incompat & ~(_INCOMPAT_FILETYPE | 0x4)
                     else "ext3" if has_journal else "ext2")
        self._inodes: dict[int, Inode] = {}

    # -- blocks and inodes ---------------------------------------------------
    def _blocks(self, block: int, count: int = 1) -> bytes:
        if block <= 0 or count <= 0 or block + count > self.blocks:
            raise Ext4Error(f"ext4 block {block} (+{count}) lies outside the filesystem")
        data = self.disk.read(self.offset + block * self.block_size, count * self.block_size)
        if len(data) != count * self.block_size:
            raise Ext4Error(f"ext4 block {block} lies past the end of the disk")
        return data

    def inode(self, number: int) -> Inode:
        cached = self._inodes.get(number)
        if cached is not None:
            return cached
        if not 1 <= number <= self.inodes:
            raise Ext4Error(f"ext4 inode {number} does not exist")
        group, index = divmod(number - 1, self.inodes_per_group)
        if group >= self.groups:
            raise Ext4Error(f"ext4 inode {number} is in no group")
        desc = self.disk.read(self.offset + self.desc_start + group * self.desc_size,
                              self.desc_size)
        if len(desc) != self.desc_size:
            raise Ext4Error("ext4 group descriptor lies past the end of the disk")
        table = struct.unpack_from("<I", desc, 8)[0]
        if self.desc_size >= 64:
            table |= struct.unpack_from("<I", desc, 0x28)[0] << 32
        at = table * self.block_size + index * self.inode_size
        if table <= 0 or at + self.inode_size > self.blocks * self.block_size:
            raise Ext4Error(f"ext4 inode table of group {group} lies outside the filesystem")
        raw = self.disk.read(self.offset + at, 128)
        if len(raw) != 128:
            raise Ext4Error("ext4 inode lies past the end of the disk")
        mode, _uid, size_lo = struct.unpack_from("<HHI", raw, 0)
        flags = struct.unpack_from("<I", raw, 0x20)[0]
        size_hi = struct.unpack_from("<I", raw, 0x6C)[0]
        inode = Inode(number, mode, size_lo | (size_hi << 32), flags, raw[0x28:0x64])
        if len(self._inodes) < 4096:
            self._inodes[number] = inode
        return inode

    # -- file contents -------------------------------------------------------
    def read_file(self, inode: Inode, limit: int) -> bytes:
        """A regular file's (or directory's, or slow symlink's) bytes; at most `limit`."""
        if inode.flags & _ENCRYPT_FL:
            raise Ext4Error(f"ext4 inode {inode.number} is encrypted")
        if inode.size > limit:
            raise Ext4Error(f"ext4 inode {inode.number} is larger than {limit} bytes")
        if inode.flags & _INLINE_DATA_FL:
            if inode.size > len(inode.block):
                raise Ext4Error("ext4 inline data beyond the inode is not supported")
            return inode.block[: inode.size]
        out = bytearray(inode.size)
        wanted = -(-inode.size // self.block_size)
        for logical, physical, count in self._extents(inode, wanted):
            if logical >= wanted:
                continue
            count = min(count, wanted - logical)
            step = max(1, _READ_PIECE // self.block_size)
            for done in range(0, count, step):
                data = self._blocks(physical + done, min(step, count - done))
                start = (logical + done) * self.block_size
                end = min(start + len(data), inode.size)
                out[start:end] = data[: end - start]
                self.budget.check_cpu()
        return bytes(out)

    def read_head(self, inode: Inode, n: int) -> bytes:
        """The first `n` bytes of a file (fewer if it is shorter)."""
        size = min(inode.size, n)
        return self.read_file(Inode(inode.number, inode.mode, size, inode.flags, inode.block), n)

    def _extents(self, inode: Inode, wanted: int) -> list[tuple[int, int, int]]:
        """(logical block, physical block, count) runs; holes and unwritten extents omitted."""
        if inode.flags & _EXTENTS_FL:
            runs: list[tuple[int, int, int]] = []
            self._walk_extents(inode.block, MAX_DEPTH, runs, wanted)
            return runs
        return self._block_map(inode.block, wanted)

    def _walk_extents(self, node: bytes, depth_left: int, runs: list[tuple[int, int, int]],
                      wanted: int) -> None:
        magic, entries, capacity, depth = struct.unpack_from("<HHHH", node, 0)
        if magic != _EXTENT_MAGIC or entries > capacity or 12 + 12 * entries > len(node):
            raise Ext4Error("ext4 extent tree node is invalid")
        if depth > depth_left:
            raise Ext4Error("ext4 extent tree is too deep")
        for i in range(entries):
            at = 12 + 12 * i
            if depth == 0:
                first, length, start_hi, start_lo = struct.unpack_from("<IHHI", node, at)
                if length > 32768:  # unwritten (preallocated): reads as zeros
                    continue
                runs.append((first, start_lo | (start_hi << 32), length))
                if len(runs) > 65536:
                    raise Ext4Error("ext4 file has too many extents")
            else:
                first, leaf_lo, leaf_hi = struct.unpack_from("<IIH", node, at)
                if first >= wanted:
                    break
                child = self._blocks(leaf_lo | (leaf_hi << 32))
                self._walk_extents(child, depth - 1, runs, wanted)

    def _block_map(self, iblock: bytes, wanted: int) -> list[tuple[int, int, int]]:
        """ext2/3 direct, indirect, double and triple indirect blocks, as far as needed."""
        pointers = struct.unpack_from("<15I", iblock, 0)
        per_block = self.block_size // 4
        runs: list[tuple[int, int, int]] = []
        logical = 0

        def walk(block: int, level: int) -> None:
            nonlocal logical
            if logical >= wanted:
                return
            if level == 0:
                if block:
                    runs.append((logical, block, 1))
                logical += 1
                return
            span = per_block**level
            if block == 0:
                logical += span
                return
            for child in struct.unpack(f"<{per_block}I", self._blocks(block)):
                walk(child, level - 1)
                if logical >= wanted:
                    return

        for i, pointer in enumerate(pointers):
            walk(pointer, 0 if i < 12 else i - 11)
        return runs

    # -- directories and paths -------------------------------------------------
    def entries(self, directory: Inode, limit: int = 4 << 20) -> dict[bytes, int]:
        """Name → inode number of one directory."""
        if directory.kind != S_IFDIR:
            raise Ext4Error(f"ext4 inode {directory.number} is not a directory")
        data = self.read_file(directory, limit)
        if directory.flags & _INLINE_DATA_FL:  # 4 bytes of parent, then entries
            data = data[4:]
        names: dict[bytes, int] = {}
        for block_start in range(0, len(data), self.block_size):
            block = data[block_start : block_start + self.block_size]
            at = 0
            while at + 8 <= len(block):
                ino, rec_len, name_len = struct.unpack_from("<IHB" if self.filetype else "<IHH",
                                                            block, at)
                if rec_len < 8 or rec_len % 4 or at + rec_len > len(block):
                    raise Ext4Error(f"ext4 directory {directory.number} has a bad entry")
                if ino and name_len and 8 + name_len <= rec_len:
                    names[block[at + 8 : at + 8 + name_len]] = ino
                at += rec_len
            self.budget.check_cpu()
        return names

    def lookup(self, path: str, *, follow: bool = True) -> Inode | None:
        """The inode at an absolute path inside this filesystem, following symlinks as the
        kernel would (relative to their directory; absolute ones from this root, so a
        link never leaves the filesystem); None if a component does not exist."""
        parts = deque(path.encode("utf-8", "surrogateescape").split(b"/"))
        trail: list[Inode] = []  # directories walked through, for ".."
        hops = 0
        while parts:
            name = parts.popleft()
            if name in (b"", b"."):
                continue
            if name == b"..":
                if trail:
                    trail.pop()
                continue
            here = trail[-1] if trail else self.inode(ROOT_INODE)
            number = self.entries(here).get(name)
            if number is None:
                return None
            node = self.inode(number)
            if node.kind == S_IFLNK and (parts or follow):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise Ext4Error(f"too many symlinks resolving {path}")
                target = self.read_symlink(node)
                if target.startswith(b"/"):
                    trail = []
                parts.extendleft(reversed(target.split(b"/")))
                continue
            if parts and node.kind != S_IFDIR:
                return None
            trail.append(node)
        return trail[-1] if trail else self.inode(ROOT_INODE)

    def read_symlink(self, node: Inode) -> bytes:
        if node.size > 4096:
            raise Ext4Error(f"ext4 symlink {node.number} is too long")
        if node.flags & (_EXTENTS_FL | _INLINE_DATA_FL) or node.size >= 60:
            return self.read_file(node, 4096)
        return node.block[: node.size]  # a fast symlink: the target is in i_block

    def read_path(self, path: str, limit: int) -> bytes | None:
        """A regular file's contents by path, or None if there is none."""
        node = self.lookup(path)
        if node is None or node.kind != S_IFREG:
            return None
        return self.read_file(node, limit)
