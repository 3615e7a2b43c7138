"""Which disk format some bytes are, from magic numbers only.

Detection never trusts a file name or the uploader's `disk_format`. It
recognises everything `qemu-img` would probe as one of rain's formats, and is
deliberately a little *wider* than qemu where that matters for safety: a VMDK
text descriptor (which names other files to open) is recognised by the same
rule qemu uses (`version=N` after comment/blank lines) and by its usual
`# Disk DescriptorFile` first line.

Formats qemu knows but rain does not accept (QED, LUKS, Parallels, ...) are
named by `foreign_format`, so they are refused by name instead of passing as
raw.
"""

from __future__ import annotations

import re
import struct

from rain.model import DiskFormat

# Enough for every signature and header rain parses before the upload is
# complete: the ISO 9660 volume descriptor at 0x8001 and the VHDX region
# table at 192 KiB both fit.
HEADER_BYTES = 1 << 20

QCOW_MAGIC = b"QFI\xfb"
VMDK_SPARSE_MAGIC = b"KDMV"
VMDK3_MAGIC = b"COWD"
VPC_MAGIC = b"conectix"
VHDX_MAGIC = b"vhdxfile"
VDI_SIGNATURE = 0xBEDA107F
VDI_SIGNATURE_OFFSET = 0x40
ISO_MAGIC_OFFSET = 0x8001
# ISO 9660 primary volume descriptor; UDF-only discs start with "BEA01" there instead.
ISO_MAGICS = (b"CD001", b"BEA01")

# qemu probes the first 2 KiB when it guesses a format.
QEMU_PROBE_BYTES = 2048

_FOREIGN_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"QED\x00", "QED"),
    (b"LUKS\xba\xbe", "LUKS encrypted"),
    (b"WithoutFreeSpace", "Parallels"),
    (b"WithouFreSpacExt", "Parallels"),
    (b"Bochs Virtual HD Image", "Bochs"),
    (b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop", "cloop"),
)
_VERSION_LINE = re.compile(rb"[ \t]*version[ \t]*=")


def detect_format(header: bytes) -> DiskFormat:
    """The format the first bytes of an image show; `raw` when no signature matches."""
    if header.startswith(QCOW_MAGIC):
        return DiskFormat.QCOW2
    if header.startswith((VMDK_SPARSE_MAGIC, VMDK3_MAGIC)) or is_vmdk_descriptor(header):
        return DiskFormat.VMDK
    if header.startswith(VPC_MAGIC):
        return DiskFormat.VPC
    if header.startswith(VHDX_MAGIC):
        return DiskFormat.VHDX
    if _u32le(header, VDI_SIGNATURE_OFFSET) == VDI_SIGNATURE:
        return DiskFormat.VDI
    if header[ISO_MAGIC_OFFSET : ISO_MAGIC_OFFSET + 5] in ISO_MAGICS:
        return DiskFormat.ISO
    return DiskFormat.RAW


def is_vmdk_descriptor(header: bytes) -> bool:
    """Whether the bytes start like a VMDK text descriptor (a file that names extent files).

    qemu's rule: skipping `#` comment lines and blank lines, the first line is
    `version=1|2|3`. rain also accepts spaces around `=` and any version, and
    the standard first line `# Disk DescriptorFile` on its own.
    """
    if header.startswith(b"# Disk DescriptorFile"):
        return True
    for line in header[:QEMU_PROBE_BYTES].split(b"\n"):
        stripped = line.strip(b" \t\r")
        if not stripped or stripped.startswith(b"#"):
            continue
        return _VERSION_LINE.match(line) is not None
    return False


def foreign_format(header: bytes) -> str | None:
    """The name of a format qemu would recognise but rain does not accept, if any."""
    for magic, name in _FOREIGN_MAGICS:
        if header.startswith(magic):
            return name
    if header.startswith(QCOW_MAGIC) and _u32be(header, 4) == 1:
        return "qcow (version 1)"
    if header.startswith(VMDK3_MAGIC):
        return "VMDK3 (COWD)"
    return None


def _u32le(data: bytes, offset: int) -> int | None:
    if len(data) < offset + 4:
        return None
    value: int = struct.unpack_from("<I", data, offset)[0]
    return value


def _u32be(data: bytes, offset: int) -> int | None:
    if len(data) < offset + 4:
        return None
    value: int = struct.unpack_from(">I", data, offset)[0]
    return value
