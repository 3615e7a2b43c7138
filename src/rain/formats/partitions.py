"""MBR and GPT partition tables, read from a virtual disk without trusting them.

Entries that lie outside the disk are dropped; GPT tables are capped at 1024
entries and MBR extended-partition chains at 64 links (a chain that loops
ends there too), so a hostile table costs a bounded number of reads.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from rain.formats.vdisk import VirtualDisk
from rain.model.errors import InvalidImage

SECTOR = 512
_MAX_GPT_ENTRIES = 1024
_MAX_LOGICAL = 64
_EXTENDED = {0x05, 0x0F, 0x85}
_PROTECTIVE = 0xEE
_ESP = uuid.UUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
_BIOS_BOOT = uuid.UUID("21686148-6449-6E6F-744E-656564454649")


@dataclass(frozen=True)
class Partition:
    number: int  # 1-based, as Linux names them (logical MBR partitions from 5)
    start: int  # bytes
    size: int  # bytes
    table: str  # "gpt" or "mbr"
    type: str  # GPT type GUID or MBR type byte as hex

    @property
    def is_boot_only(self) -> bool:
        """An EFI system or BIOS boot partition: never the root filesystem."""
        return self.type in (str(_ESP).upper(), str(_BIOS_BOOT).upper(), "0xef")

    def describe(self) -> str:
        return f"partition {self.number} ({self.table})"


def read_partitions(disk: VirtualDisk) -> list[Partition]:
    """The partitions of a disk, in table order; [] when it has no partition table."""
    mbr = disk.read(0, SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        return []
    entries = [struct.unpack_from("<B3sB3sII", mbr, 446 + 16 * i) for i in range(4)]
    if any(e[2] == _PROTECTIVE for e in entries):
        gpt = _read_gpt(disk)
        if gpt is not None:
            return gpt
    parts: list[Partition] = []
    for i, (_boot, _chs, kind, _end, start, count) in enumerate(entries, 1):
        if kind == 0 or count == 0:
            continue
        if kind in _EXTENDED:
            parts += _read_logical(disk, start)
            continue
        _add(parts, disk, Partition(i, start * SECTOR, count * SECTOR, "mbr", f"0x{kind:02x}"))
    return parts


def _add(parts: list[Partition], disk: VirtualDisk, part: Partition) -> None:
    if part.start > 0 and part.size > 0 and part.start + part.size <= disk.size:
        parts.append(part)


def _read_gpt(disk: VirtualDisk) -> list[Partition] | None:
    header = disk.read(SECTOR, SECTOR)
    if len(header) < 92 or not header.startswith(b"EFI PART"):
        return None
    entries_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
    if not 128 <= entry_size <= 4096 or entry_size % 8:
        raise InvalidImage(f"GPT entry size {entry_size} is invalid")
    if count > _MAX_GPT_ENTRIES:
        raise InvalidImage(f"GPT has {count} entries (at most {_MAX_GPT_ENTRIES} are read)")
    table = disk.read(entries_lba * SECTOR, count * entry_size)
    parts: list[Partition] = []
    for i in range(min(count, len(table) // entry_size)):
        raw = table[i * entry_size : i * entry_size + 56]
        type_guid = uuid.UUID(bytes_le=raw[:16])
        first, last = struct.unpack_from("<QQ", raw, 32)
        if type_guid.int == 0 or last < first:
            continue
        _add(parts, disk, Partition(i + 1, first * SECTOR, (last - first + 1) * SECTOR, "gpt",
                                    str(type_guid).upper()))
    return parts


def _read_logical(disk: VirtualDisk, extended_start: int) -> list[Partition]:
    """Follow the chain of extended boot records; each names one logical partition."""
    parts: list[Partition] = []
    seen: set[int] = set()
    ebr = extended_start
    for number in range(5, 5 + _MAX_LOGICAL):
        if ebr in seen:
            break
        seen.add(ebr)
        sector = disk.read(ebr * SECTOR, SECTOR)
        if len(sector) < SECTOR or sector[510:512] != b"\x55\xaa":
            break
        _, _, kind, _, start, count = struct.unpack_from("<B3sB3sII", sector, 446)
        if kind and count:
            _add(parts, disk, Partition(number, (ebr + start) * SECTOR, count * SECTOR, "mbr",
                                        f"0x{kind:02x}"))
        _, _, next_kind, _, next_start, _ = struct.unpack_from("<B3sB3sII", sector, 462)
        if next_kind not in _EXTENDED or next_start == 0:
            break
        ebr = extended_start + next_start
    return parts
