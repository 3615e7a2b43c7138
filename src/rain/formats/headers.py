"""Pure-Python header checks: refuse what is unsafe before qemu-img opens anything.

qemu-img is the authority on whether an image is well formed, but it must
never be asked to open a file that points at *other* files (qcow2 backing and
external data files, VMDK extents, differencing VHD/VHDX/VDI parents): opening
those reads host files named by an attacker (CVE-2024-32498 / OSSA-2024-001).
These parsers read just the fixed headers, refuse such references, refuse
values qemu would choke on, and spot truncation (tables that lie beyond the
end of the file).

They work on an `ImageBytes` view: while an upload is streaming it holds only
the first `HEADER_BYTES` (checks needing bytes further on are skipped and
happen again on the complete file); on a complete file it can read anywhere.

Every refusal is `InvalidImage` with a one-line message saying what is wrong.
"""

from __future__ import annotations

import re
import struct
import uuid
from collections.abc import Callable

from rain.formats.detect import VDI_SIGNATURE_OFFSET, VMDK3_MAGIC, foreign_format
from rain.model import DiskFormat
from rain.model.errors import InvalidImage
from rain.model.units import format_bytes

SELF_CONTAINED = "images must be self-contained"


class ImageBytes:
    """What can be seen of an image: a prefix, its total size, maybe a reader for the rest."""

    def __init__(
        self,
        prefix: bytes,
        total_size: int | None,
        read_at: Callable[[int, int], bytes] | None = None,
    ) -> None:
        self.prefix = prefix
        self.total_size = total_size
        self._read_at = read_at

    @property
    def complete(self) -> bool:
        """Whether every byte of the image can be read through this view."""
        return self._read_at is not None or len(self.prefix) == self.total_size

    def get(self, offset: int, length: int) -> bytes | None:
        """Bytes at [offset, offset+length), short at end of file; None if not seen yet."""
        if offset + length <= len(self.prefix):
            return self.prefix[offset : offset + length]
        if self.total_size is not None and offset >= self.total_size:
            return b""  # also keeps absurd 64-bit offsets away from pread
        if self._read_at is not None:
            return self._read_at(offset, length)
        if self.complete:
            return self.prefix[offset : offset + length]
        return None

    def require(self, what: str, fmt: DiskFormat, offset: int, length: int) -> None:
        """Refuse when [offset, offset+length) reaches past the end of the file."""
        if self.total_size is not None and offset + length > self.total_size:
            raise InvalidImage(
                f"{fmt} image is truncated: its {what} needs {offset + length} bytes"
                f" but the file has {self.total_size}"
            )


def check_header(fmt: DiskFormat, data: ImageBytes, max_virtual_size: int) -> int | None:
    """Refuse unsafe or broken headers; return the virtual size the header states, if any."""
    refuse_foreign(data.prefix)
    checker = _CHECKERS.get(fmt)
    if checker is None:  # raw, iso: nothing inside refers to anything
        return data.total_size
    return checker(data, max_virtual_size)


def refuse_foreign(header: bytes) -> None:
    """Refuse formats qemu knows but rain does not accept, naming them."""
    name = foreign_format(header)
    if name is not None:
        raise InvalidImage(f"the content is a {name} image, which rain does not accept")


def check_virtual_size(fmt: DiskFormat, size: int, max_virtual_size: int) -> None:
    if size > max_virtual_size:
        raise InvalidImage(
            f"virtual size {format_bytes(size)} exceeds the limit of "
            f"{format_bytes(max_virtual_size)}"
        )
    if size <= 0 and fmt is not DiskFormat.RAW:
        raise InvalidImage(f"{fmt} image declares a virtual size of {size} bytes")


def printable(raw: bytes, limit: int = 120) -> str:
    """A file name from a header, safe to quote in a one-line message."""
    text = raw.rstrip(b"\0").decode("utf-8", "replace")
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[:limit] + "…"


# --- qcow2 -----------------------------------------------------------------

_QCOW2_INCOMPAT_DIRTY = 1 << 0
_QCOW2_INCOMPAT_CORRUPT = 1 << 1
_QCOW2_INCOMPAT_DATA_FILE = 1 << 2
_QCOW2_INCOMPAT_COMPRESSION = 1 << 3
_QCOW2_INCOMPAT_EXTL2 = 1 << 4
_QCOW2_INCOMPAT_KNOWN = (
    _QCOW2_INCOMPAT_DIRTY
    | _QCOW2_INCOMPAT_CORRUPT
    | _QCOW2_INCOMPAT_DATA_FILE
    | _QCOW2_INCOMPAT_COMPRESSION
    | _QCOW2_INCOMPAT_EXTL2
)
_QCOW2_EXT_DATA_FILE = 0x44415441
_QCOW2_MAX_L1_BYTES = 32 << 20  # qemu's QCOW_MAX_L1_SIZE
_QCOW2_MAX_REFTABLE_BYTES = 8 << 20  # qemu's QCOW_MAX_REFTABLE_SIZE
_QCOW2_MAX_SNAPSHOTS = 65536


def _check_qcow2(data: ImageBytes, max_virtual_size: int) -> int:
    fmt = DiskFormat.QCOW2
    head = data.prefix
    if len(head) < 72:
        raise InvalidImage("qcow2 image is truncated: its header is incomplete")
    (
        _magic,
        version,
        backing_offset,
        backing_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_offset,
        refcount_offset,
        refcount_clusters,
        nb_snapshots,
        snapshots_offset,
    ) = struct.unpack_from(">IIQIIQIIQQIIQ", head, 0)
    if version not in (2, 3):
        raise InvalidImage(f"qcow2 version {version} is not supported (only 2 and 3)")
    if backing_offset != 0:
        name = data.get(backing_offset, min(backing_size, 1023))
        shown = f" ('{printable(name)}')" if name else ""
        raise InvalidImage(f"qcow2 image refers to a backing file{shown}; {SELF_CONTAINED}")

    incompatible = 0
    header_length = 72
    if version == 3:
        if len(head) < 104:
            raise InvalidImage("qcow2 image is truncated: its header is incomplete")
        incompatible, _compat, _autoclear, refcount_order, header_length = struct.unpack_from(
            ">QQQII", head, 72
        )
        if refcount_order > 6:
            raise InvalidImage(f"qcow2 refcount order {refcount_order} is out of range (0..6)")
    if incompatible & _QCOW2_INCOMPAT_DATA_FILE:
        raise InvalidImage(f"qcow2 image uses an external data file; {SELF_CONTAINED}")
    if incompatible & _QCOW2_INCOMPAT_CORRUPT:
        raise InvalidImage("qcow2 image is marked corrupt")
    unknown = incompatible & ~_QCOW2_INCOMPAT_KNOWN
    if unknown:
        raise InvalidImage(f"qcow2 image uses unknown incompatible features (0x{unknown:x})")
    if not 9 <= cluster_bits <= 21:
        raise InvalidImage(f"qcow2 cluster_bits {cluster_bits} is out of range (9..21)")
    cluster_size = 1 << cluster_bits
    if crypt_method != 0:
        raise InvalidImage("qcow2 image is encrypted; encrypted images are not supported")

    check_virtual_size(fmt, size, max_virtual_size)

    if version == 3 and not 104 <= header_length <= cluster_size:
        raise InvalidImage(f"qcow2 header length {header_length} is invalid")
    _check_qcow2_extensions(data, header_length, cluster_size)

    # Truncation and table sanity: the same limits qemu applies when opening.
    l2_entry = 16 if incompatible & _QCOW2_INCOMPAT_EXTL2 else 8
    bytes_per_l1_entry = cluster_size * (cluster_size // l2_entry)
    needed_l1 = -(-size // bytes_per_l1_entry)
    if l1_size < needed_l1:
        raise InvalidImage(f"qcow2 L1 table is too small for the virtual size ({l1_size} entries)")
    if l1_size * 8 > _QCOW2_MAX_L1_BYTES:
        raise InvalidImage(f"qcow2 L1 table is too large ({l1_size} entries)")
    if l1_size and l1_offset % cluster_size:
        raise InvalidImage(f"qcow2 L1 table offset {l1_offset} is not cluster-aligned")
    if l1_size:
        data.require("L1 table", fmt, l1_offset, l1_size * 8)
    if refcount_clusters == 0 or refcount_offset % cluster_size:
        raise InvalidImage("qcow2 refcount table is missing or misaligned")
    if refcount_clusters * cluster_size > _QCOW2_MAX_REFTABLE_BYTES:
        raise InvalidImage(f"qcow2 refcount table is too large ({refcount_clusters} clusters)")
    data.require("refcount table", fmt, refcount_offset, refcount_clusters * cluster_size)
    if nb_snapshots > _QCOW2_MAX_SNAPSHOTS:
        raise InvalidImage(f"qcow2 image has too many snapshots ({nb_snapshots})")
    if nb_snapshots:
        if snapshots_offset % cluster_size:
            raise InvalidImage("qcow2 snapshot table is misaligned")
        data.require("snapshot table", fmt, snapshots_offset, 1)
    return int(size)


def _check_qcow2_extensions(data: ImageBytes, offset: int, cluster_size: int) -> None:
    """Walk the header extensions in the first cluster, refusing an external data file name."""
    area = data.get(0, cluster_size)
    if area is None:
        return
    while offset + 8 <= len(area):
        ext_type, ext_len = struct.unpack_from(">II", area, offset)
        if ext_type == 0:
            return
        body = offset + 8
        if body + ext_len > cluster_size:
            raise InvalidImage("qcow2 header extensions run past the first cluster")
        if ext_type == _QCOW2_EXT_DATA_FILE:
            name = printable(area[body : body + ext_len])
            raise InvalidImage(f"qcow2 image refers to a data file ('{name}'); {SELF_CONTAINED}")
        offset = body + ((ext_len + 7) & ~7)


# --- vmdk ------------------------------------------------------------------

_VMDK_GD_AT_END = 0xFFFFFFFFFFFFFFFF
_VMDK_SAFE_CREATE_TYPES = {"monolithicSparse", "streamOptimized"}
_VMDK_EXTENT_LINE = re.compile(r"^(RW|RDONLY|NOACCESS)\s", re.MULTILINE)
_VMDK_MAX_DESCRIPTOR = 64 * 1024


def _check_vmdk(data: ImageBytes, max_virtual_size: int) -> int | None:
    fmt = DiskFormat.VMDK
    head = data.prefix
    if head.startswith(VMDK3_MAGIC):  # foreign_format already refuses it; be explicit
        raise InvalidImage("VMDK3 (COWD) images are not supported")
    if not head.startswith(b"KDMV"):
        raise InvalidImage(
            "vmdk image is a text descriptor, which refers to separate extent files;"
            f" {SELF_CONTAINED} (use a monolithicSparse or streamOptimized vmdk)"
        )
    if len(head) < 77:
        raise InvalidImage("vmdk image is truncated: its header is incomplete")
    (
        _magic,
        version,
        _flags,
        capacity,
        grain_size,
        desc_offset,
        desc_size,
        num_gtes_per_gt,
        _rgd_offset,
        gd_offset,
        overhead,
    ) = struct.unpack_from("<4sIIQQQQIQQQ", head, 0)
    if version not in (1, 2, 3):
        raise InvalidImage(f"vmdk sparse version {version} is not supported")
    if capacity == 0:
        # qemu then ignores this extent and opens the files its descriptor names.
        raise InvalidImage(
            "vmdk sparse header has zero capacity, which makes the descriptor's"
            f" extent files be used instead; {SELF_CONTAINED}"
        )
    size = capacity * 512
    check_virtual_size(fmt, size, max_virtual_size)
    if grain_size == 0 or grain_size & (grain_size - 1) or grain_size > 128 * 2048:
        raise InvalidImage(f"vmdk grain size {grain_size} sectors is invalid")
    if num_gtes_per_gt == 0 or num_gtes_per_gt > 512:
        raise InvalidImage(f"vmdk grain table size {num_gtes_per_gt} is invalid")
    if gd_offset != _VMDK_GD_AT_END:
        data.require("grain directory", fmt, gd_offset * 512, 512)
    data.require("metadata", fmt, 0, overhead * 512)
    if desc_offset:
        if desc_size * 512 > _VMDK_MAX_DESCRIPTOR:
            raise InvalidImage(f"vmdk embedded descriptor is too large ({desc_size} sectors)")
        data.require("descriptor", fmt, desc_offset * 512, desc_size * 512)
        text = data.get(desc_offset * 512, desc_size * 512)
        if text is not None:
            check_vmdk_descriptor(text.split(b"\0", 1)[0].decode("utf-8", "replace"))
    return size


def check_vmdk_descriptor(text: str) -> None:
    """Refuse an embedded VMDK descriptor that is not a single self-contained sparse extent."""
    fields = dict(
        (k.strip(), v.strip().strip('"'))
        for k, sep, v in (line.partition("=") for line in text.splitlines())
        if sep and not k.lstrip().startswith("#")
    )
    create_type = fields.get("createType", "")
    if create_type not in _VMDK_SAFE_CREATE_TYPES:
        raise InvalidImage(
            f"vmdk create type '{printable(create_type.encode())}' is not supported"
            " (only monolithicSparse and streamOptimized)"
        )
    if "parentFileNameHint" in fields or fields.get("parentCID", "ffffffff").lower() != "ffffffff":
        raise InvalidImage(f"vmdk image refers to a parent image; {SELF_CONTAINED}")
    extents = _VMDK_EXTENT_LINE.findall(text)
    if len(extents) > 1:
        raise InvalidImage(f"vmdk image has {len(extents)} extents; {SELF_CONTAINED}")


# --- vpc (VHD) ---------------------------------------------------------------

_VPC_FIXED, _VPC_DYNAMIC, _VPC_DIFFERENCING = 2, 3, 4


def _check_vpc(data: ImageBytes, max_virtual_size: int) -> int | None:
    fmt = DiskFormat.VPC
    head = data.prefix
    if not head.startswith(b"conectix"):
        # A fixed VHD is raw data followed by a footer: only its last 512 bytes say so.
        if not data.complete or data.total_size is None:
            return None
        size = fixed_vhd_size(data.get(data.total_size - 512, 512) or b"")
        if size is None:
            raise InvalidImage("vpc image has no VHD footer")
        check_virtual_size(fmt, size, max_virtual_size)
        return size
    if len(head) < 512:
        raise InvalidImage("vpc image is truncated: its footer is incomplete")
    (data_offset,) = struct.unpack_from(">Q", head, 16)
    current_size, _geometry, disk_type = struct.unpack_from(">QII", head, 48)
    if disk_type == _VPC_DIFFERENCING:
        raise InvalidImage(
            f"vpc image is a differencing disk (it refers to a parent); {SELF_CONTAINED}"
        )
    if disk_type not in (_VPC_FIXED, _VPC_DYNAMIC):
        raise InvalidImage(f"vpc disk type {disk_type} is not supported")
    check_virtual_size(fmt, current_size, max_virtual_size)
    if disk_type == _VPC_DYNAMIC:
        data.require("dynamic header", fmt, data_offset, 1024)
        dyn = data.get(data_offset, 1024)
        if dyn is not None and len(dyn) == 1024:
            if not dyn.startswith(b"cxsparse"):
                raise InvalidImage("vpc dynamic header is missing")
            table_offset, _version, max_entries = struct.unpack_from(">QII", dyn, 16)
            data.require("block allocation table", fmt, table_offset, max_entries * 4)
    return int(current_size)


def fixed_vhd_size(footer: bytes) -> int | None:
    """The virtual size of a fixed VHD, given its last 512 bytes; None if it is not one."""
    if len(footer) != 512 or not footer.startswith(b"conectix"):
        return None
    if struct.unpack_from(">I", footer, 60)[0] != _VPC_FIXED:
        return None
    size: int = struct.unpack_from(">Q", footer, 48)[0]
    return size


# --- vdi -------------------------------------------------------------------

_VDI_DYNAMIC, _VDI_STATIC = 1, 2


def _check_vdi(data: ImageBytes, max_virtual_size: int) -> int:
    fmt = DiskFormat.VDI
    head = data.prefix
    if len(head) < 0x1C8:
        raise InvalidImage("vdi image is truncated: its header is incomplete")
    version, _header_size, image_type = struct.unpack_from("<III", head, VDI_SIGNATURE_OFFSET + 4)
    if version >> 16 != 1:
        raise InvalidImage(f"vdi version 0x{version:08x} is not supported")
    link, parent = head[0x1A8:0x1B8], head[0x1B8:0x1C8]
    if image_type not in (_VDI_DYNAMIC, _VDI_STATIC) or any(link) or any(parent):
        raise InvalidImage(
            f"vdi image is a differencing or undo disk (type {image_type}); {SELF_CONTAINED}"
        )
    offset_bmap, offset_data = struct.unpack_from("<II", head, 0x154)
    disk_size = struct.unpack_from("<Q", head, 0x170)[0]
    block_size, _extra, blocks_in_image, blocks_allocated = struct.unpack_from("<IIII", head, 0x178)
    check_virtual_size(fmt, disk_size, max_virtual_size)
    if blocks_allocated > blocks_in_image:
        raise InvalidImage("vdi image allocates more blocks than it has")
    data.require("block map", fmt, offset_bmap, blocks_in_image * 4)
    data.require("data area", fmt, offset_data, blocks_allocated * block_size)
    return int(disk_size)


# --- vhdx ------------------------------------------------------------------

_VHDX_REGION_TABLE = 192 * 1024
_VHDX_BAT = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08").bytes_le
_VHDX_METADATA = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
_VHDX_FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B").bytes_le
_VHDX_VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8").bytes_le
_VHDX_PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C").bytes_le
_VHDX_HAS_PARENT = 1 << 1
_VHDX_MAX_METADATA = 1 << 20
_VHDX_DIFFERENCING = f"vhdx image is a differencing disk (it refers to a parent); {SELF_CONTAINED}"


def _check_vhdx(data: ImageBytes, max_virtual_size: int) -> int | None:
    fmt = DiskFormat.VHDX
    table = data.get(_VHDX_REGION_TABLE, 64 * 1024)
    data.require("region table", fmt, _VHDX_REGION_TABLE, 64 * 1024)
    if table is None or len(table) < 16 or not table.startswith(b"regi"):
        raise InvalidImage("vhdx region table is missing or invalid")
    count = struct.unpack_from("<I", table, 8)[0]
    if count > 2047:
        raise InvalidImage(f"vhdx region table has too many entries ({count})")
    metadata: tuple[int, int] | None = None
    for i in range(count):
        guid, offset, length, required = struct.unpack_from("<16sQII", table, 16 + 32 * i)
        if guid == _VHDX_METADATA:
            metadata = (offset, length)
        elif guid != _VHDX_BAT and required & 1:
            raise InvalidImage("vhdx image requires an unknown region")
        data.require("BAT" if guid == _VHDX_BAT else "metadata region", fmt, offset, length)
    if metadata is None:
        raise InvalidImage("vhdx image has no metadata region")
    region = data.get(metadata[0], min(metadata[1], _VHDX_MAX_METADATA))
    if region is None:
        return None  # beyond what has arrived: checked again on the complete file
    return _check_vhdx_metadata(region, max_virtual_size)


def _check_vhdx_metadata(region: bytes, max_virtual_size: int) -> int:
    if len(region) < 32 or not region.startswith(b"metadata"):
        raise InvalidImage("vhdx metadata region is invalid")
    count = struct.unpack_from("<H", region, 10)[0]
    size: int | None = None
    for i in range(count):
        entry = 32 + 32 * i
        if entry + 32 > len(region):
            raise InvalidImage("vhdx metadata table is truncated")
        item, offset, length = struct.unpack_from("<16sII", region, entry)
        if item == _VHDX_PARENT_LOCATOR:
            raise InvalidImage(_VHDX_DIFFERENCING)
        if offset + length > len(region):
            continue  # qemu will refuse it; nothing here names another file
        if item == _VHDX_FILE_PARAMETERS and length >= 8:
            flags = struct.unpack_from("<I", region, offset + 4)[0]
            if flags & _VHDX_HAS_PARENT:
                raise InvalidImage(_VHDX_DIFFERENCING)
        elif item == _VHDX_VIRTUAL_DISK_SIZE and length >= 8:
            size = struct.unpack_from("<Q", region, offset)[0]
    if size is None:
        raise InvalidImage("vhdx image does not state its virtual size")
    check_virtual_size(DiskFormat.VHDX, size, max_virtual_size)
    return size


_CHECKERS: dict[DiskFormat, Callable[[ImageBytes, int], int | None]] = {
    DiskFormat.QCOW2: _check_qcow2,
    DiskFormat.VMDK: _check_vmdk,
    DiskFormat.VPC: _check_vpc,
    DiskFormat.VDI: _check_vdi,
    DiskFormat.VHDX: _check_vhdx,
}
