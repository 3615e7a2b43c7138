"""What an image's own root filesystem says it is: OS, release, architecture, packages.

For images rain did not build. Nothing is mounted or run: the virtual disk
(raw or qcow2) is read through a budget, its partition table (MBR, GPT or
none) names candidate filesystems, and the first ext2/3/4 filesystem that
has `/etc/os-release` (usually a symlink to `../usr/lib/os-release`) or
`/var/lib/dpkg/status` is the root. From it:

- OS and release: os-release's `ID` and `VERSION_CODENAME` (else
  `VERSION_ID`), the way rain's builder records them (`debian`, `bookworm`);
- packages: dpkg's status file, installed packages only (`Status: … installed`);
- architecture: `/var/lib/dpkg/arch` (dpkg's native architecture first), else
  the `Architecture` of the `dpkg` package itself, else the ELF machine of
  `/bin/sh`, named as Debian names architectures.

Any failure is one `InvalidImage` line saying why (the caller records it).
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from dataclasses import dataclass, field

from rain.formats.budget import BoundedReader, ReadAt, ReadBudget
from rain.formats.ext4 import Ext4, Ext4Error
from rain.formats.partitions import Partition, read_partitions
from rain.formats.vdisk import open_virtual_disk
from rain.model import DiskFormat
from rain.model.errors import InvalidImage

OS_RELEASE_PATHS = ("/etc/os-release", "/usr/lib/os-release")
DPKG_STATUS = "/var/lib/dpkg/status"
DPKG_ARCH = "/var/lib/dpkg/arch"
MAX_OS_RELEASE = 64 << 10
MAX_DPKG_STATUS = 32 << 20
MAX_PACKAGES = 100_000
MAX_PARTITIONS_TRIED = 16

# The catalog's column widths: package names and versions 128, OS fields 64, arch 32.
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]{0,127}$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~:-]{0,127}$")
_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~-]{0,31}$")
# ELF e_machine (and class/endianness where it matters) → Debian architecture.
_ELF_ARCH = {
    (62, 2, 1): "amd64", (183, 2, 1): "arm64", (3, 1, 1): "i386", (40, 1, 1): "armhf",
    (21, 2, 1): "ppc64el", (21, 2, 2): "ppc64", (22, 2, 2): "s390x", (243, 2, 1): "riscv64",
}


@dataclass
class SystemInfo:
    """What was found; empty strings for what was not."""

    os_distro: str = ""
    os_release: str = ""
    arch: str = ""
    packages: dict[str, str] = field(default_factory=dict)
    source: str = ""  # where: "partition 2 (gpt), ext4" or "whole disk, ext4"


def detect_system(fmt: DiskFormat, read_at: ReadAt, size: int,
                  budget: ReadBudget) -> SystemInfo:
    """Read OS, release, arch and packages from an image's root filesystem."""
    disk = open_virtual_disk(fmt, BoundedReader(read_at, size, budget))
    partitions = read_partitions(disk)
    candidates: list[tuple[str, int, int]] = [
        (p.describe(), p.start, p.size) for p in _ordered(partitions)
    ][:MAX_PARTITIONS_TRIED] or [("whole disk", 0, disk.size)]
    problems: list[str] = []
    for where, start, length in candidates:
        try:
            fs = Ext4(disk, start, length, budget)
        except Ext4Error as exc:
            problems.append(f"{where}: {exc.message}")
            continue
        info = read_system(fs)
        if info is not None:
            info.source = f"{where}, {fs.kind}"
            return info
        problems.append(f"{where}: {fs.kind} without {OS_RELEASE_PATHS[0]} or {DPKG_STATUS}")
    table = f"{partitions[0].table} table with {len(partitions)} partitions" if partitions \
        else "no partition table"
    raise InvalidImage(f"no root filesystem found ({table}; {'; '.join(problems[:3])})")


def _ordered(partitions: list[Partition]) -> list[Partition]:
    """Likely roots first: boot-only partitions (EFI, BIOS boot) last."""
    return sorted(partitions, key=lambda p: p.is_boot_only)


def read_system(fs: Ext4) -> SystemInfo | None:
    """The system on one filesystem, or None when it has neither os-release nor dpkg."""
    release = _os_release(fs)
    status = fs.read_path(DPKG_STATUS, MAX_DPKG_STATUS)
    if release is None and status is None:
        return None
    info = SystemInfo()
    if release:
        info.os_distro = _clean(release.get("ID", "").lower())
        info.os_release = _clean(release.get("VERSION_CODENAME") or release.get("VERSION_ID", ""))
    archs: Counter[str] = Counter()
    dpkg_arch = ""
    if status is not None:
        info.packages, archs, dpkg_arch = parse_dpkg_status(status, fs.budget)
    info.arch = _native_arch(fs) or dpkg_arch or _most_common(archs) or _elf_arch(fs)
    return info


def _os_release(fs: Ext4) -> dict[str, str] | None:
    for path in OS_RELEASE_PATHS:
        data = fs.read_path(path, MAX_OS_RELEASE)
        if data is not None:
            return parse_os_release(data.decode("utf-8", "replace"))
    return None


def parse_os_release(text: str) -> dict[str, str]:
    """os-release(5): KEY=value lines, values optionally quoted with shell escapes."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep or not key.isidentifier():
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        fields[key] = value
    return fields


def parse_dpkg_status(data: bytes, budget: ReadBudget) -> tuple[dict[str, str], Counter[str], str]:
    """Installed packages (name → version), their architectures, and dpkg's own."""
    packages: dict[str, str] = {}
    archs: Counter[str] = Counter()
    dpkg_arch = ""
    for n, stanza in enumerate(data.decode("utf-8", "replace").split("\n\n")):
        if n % 1000 == 0:
            budget.check_cpu()
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t"):
                continue  # continuation of a multi-line field (Description, Conffiles …)
            key, sep, value = line.partition(":")
            if sep and key in ("Package", "Status", "Version", "Architecture"):
                fields[key] = value.strip()
        status = fields.get("Status", "").split()
        name, version = fields.get("Package", ""), fields.get("Version", "")
        if status[-1:] != ["installed"] or not _PACKAGE.match(name) or not _VERSION.match(version):
            continue
        arch = _clean(fields.get("Architecture", ""))
        if name == "dpkg" and arch:
            dpkg_arch = arch
        if arch and arch != "all":
            archs[arch] += 1
        if name not in packages:
            if len(packages) >= MAX_PACKAGES:
                raise InvalidImage(f"dpkg status lists more than {MAX_PACKAGES} packages")
            packages[name] = version
    return packages, archs, dpkg_arch


def _native_arch(fs: Ext4) -> str:
    data = fs.read_path(DPKG_ARCH, 4096)
    lines = data.decode("utf-8", "replace").split() if data else []
    return _clean(lines[0]) if lines else ""


def _most_common(archs: Counter[str]) -> str:
    return archs.most_common(1)[0][0] if archs else ""


def _elf_arch(fs: Ext4) -> str:
    node = fs.lookup("/bin/sh")
    if node is None:
        return ""
    head = fs.read_head(node, 64)
    if len(head) < 20 or not head.startswith(b"\x7fELF") or head[5] not in (1, 2):
        return ""
    (machine,) = struct.unpack_from("<H" if head[5] == 1 else ">H", head, 18)
    return _ELF_ARCH.get((machine, head[4], head[5]), "")


def _clean(value: str) -> str:
    """A value fit for the catalog, or "" (an image says what it likes about itself)."""
    return value if _VALUE.match(value) else ""

