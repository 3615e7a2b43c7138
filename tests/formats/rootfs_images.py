"""Disks with a Debian-looking root filesystem, made in the test: sfdisk + mke2fs -d.

The tree has what detection reads and nothing to boot: /usr/lib/os-release
with /etc/os-release a relative symlink to it, dpkg's status (installed and
removed packages) and arch files, and /bin → usr/bin (merged /usr) with a
/usr/bin/sh → dash symlink whose target starts like an x86-64 ELF file.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from .conftest import MiB, qemu_img

OS_RELEASE = """PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
"""

PACKAGES = {"bash": "5.2.15-2+b2", "coreutils": "9.1-1", "dpkg": "1.21.22",
            "libc6": "2.36-9+deb12u4", "openssl": "3.0.11-1~deb12u2", "nginx": "1.22.1-9"}


def dpkg_status(packages: dict[str, str] = PACKAGES) -> str:
    stanzas = [
        f"Package: {name}\nStatus: install ok installed\nPriority: optional\n"
        f"Architecture: {'all' if name == 'coreutils' else 'amd64'}\nVersion: {version}\n"
        f"Description: the {name} package\n a continuation line\n .\n more text\n"
        for name, version in packages.items()
    ]
    stanzas.append("Package: telnet\nStatus: deinstall ok config-files\n"
                   "Architecture: amd64\nVersion: 0.17+2.4-2\n")
    return "\n".join(stanzas)


def elf_header(machine: int = 62) -> bytes:
    return b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HHI", 3, machine, 1) + bytes(40)


def make_tree(root: Path, *, arch_file: bool = True, os_release: str = OS_RELEASE,
              status: str | None = None, tools: int = 300) -> Path:
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "usr/lib/os-release").write_text(os_release)
    (root / "etc/os-release").symlink_to("../usr/lib/os-release")
    (root / "var/lib/dpkg/status").write_text(dpkg_status() if status is None else status)
    if arch_file:
        (root / "var/lib/dpkg/arch").write_text("amd64\ni386\n")
    (root / "bin").symlink_to("usr/bin")
    (root / "usr/bin/dash").write_bytes(elf_header() + bytes(1000))
    (root / "usr/bin/sh").symlink_to("dash")
    for i in range(tools):  # 300: enough entries that /usr/bin spans several directory blocks
        (root / "usr/bin" / f"tool-{i:03d}-with-a-longer-name").write_text("x")
    return root


def mke2fs(tree: Path, path: Path, size: int = 64 * MiB, *options: str) -> Path:
    if shutil.which("mke2fs") is None:
        pytest.skip("mke2fs is not installed")
    if "-t" not in options:
        options = ("-t", "ext4", *options)
    subprocess.run(["mke2fs", "-q", "-F", *options, "-d", str(tree), str(path),
                    str(size // 1024)], check=True, capture_output=True, timeout=60)
    return path


def partitioned(fs: Path, out: Path, table: str = "gpt") -> Path:
    """A disk with a 1 MiB gap, a small boot partition, then `fs` as the last partition."""
    fs_size = fs.stat().st_size
    start = 4 * MiB
    total = start + fs_size + MiB
    with out.open("wb") as f:
        f.truncate(total)
    boot_type = "U" if table == "gpt" else "ef"
    script = (f"label: {table}\nstart=2048, size=4096, type={boot_type}\n"
              f"start={start // 512}, size={fs_size // 512}, type=L\n")
    subprocess.run(["sfdisk", "--quiet", str(out)], input=script.encode(), check=True,
                   capture_output=True, timeout=60)
    with out.open("r+b") as dst, fs.open("rb") as src:
        dst.seek(start)
        shutil.copyfileobj(src, dst)
    return out


def to_qcow2(raw: Path, out: Path, *options: str, compress: bool = False) -> Path:
    qemu_img("convert", "-f", "raw", "-O", "qcow2", *(["-c"] if compress else []),
             *(["-o", ",".join(options)] if options else []), raw, out)
    return out
