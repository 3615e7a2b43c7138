"""Bootable raw disk images from a root filesystem, and reopening them for later builds.

Layout: an MBR partition table with one bootable Linux partition starting at
1 MiB and filling the disk, holding an ext4 root filesystem. The filesystem is
made directly in the image file with ``mke2fs -d ROOTDIR -E offset=...``: no
copy through a mounted filesystem, and its features come from rain's own
mke2fs configuration, not the build host's ``/etc/mke2fs.conf`` (a newer host
must not produce a filesystem an older guest kernel cannot mount).

Bootloader: EXTLINUX (syslinux), installed by the *host's* ``extlinux``
(the Debian package, trusted like the rest of the host; never a binary from
the image, which would run as host root with the loop device) onto a
``/boot/extlinux`` checked to be a real directory of the image, plus the
image's syslinux ``mbr.bin`` (440 bytes of data copied into the disk's
first sector, never run on the host). It was picked over GRUB
because its configuration never needs regenerating: ``extlinux.conf`` loads
``/vmlinuz`` and ``/initrd.img``, the symlinks Debian's kernel packages keep
pointing at the newest kernel and initramfs, so a kernel installed by a later
build boots with no update-grub (which, run in a build chroot, would write the
loop device's name instead of the root UUID). The root filesystem is named by
UUID in ``/etc/fstab`` and on the kernel command line; the serial console is
ttyS0 at 115200 for EXTLINUX and the kernel alike.

Installing EXTLINUX needs the filesystem mounted, which is the only reason
`make_disk` attaches a loop device. `open_disk` reuses a disk as the starting
point of a later build (the base-image cache): it grows the file, the
partition (sfdisk) and the filesystem (e2fsck + resize2fs), loop-mounts it and
always unmounts and detaches it when the block ends, on error too. The root
UUID never changes, so the boot configuration stays valid.

A disk may be a stranger's (a pushed image built on with ``from: image:``):
it is checked with ``e2fsck -f -p`` before every read-write mount (the host
kernel parses the filesystem; a checked one is a smaller attack surface),
mounted ``nodev,nosuid`` (a device node planted in it opens nothing on the
host), and every file rain touches in it goes through `ImageTree`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from rain.build.phases import LogFn, log_command, log_output
from rain.formats.tool import ToolExitError, run_tool
from rain.model.errors import InvalidImage, InvalidRequest, ToolFailed
from rain.sandbox import ImageTree
from rain.sandbox.syscalls import RESOLVE_IN_ROOT, RESOLVE_NO_SYMLINKS, RESOLVE_NO_XDEV, openat2

SECTOR = 512
PARTITION_START = 2048  # sectors: 1 MiB, aligned
MIB = 1024**2
MIN_DISK_SIZE = 64 * MIB
MBR_CODE_SIZE = 440  # boot code before the disk signature and partition table
BOOT_DIR = "/boot/extlinux"
KERNEL = "/vmlinuz"
INITRD = "/initrd.img"
DEFAULT_KERNEL_ARGS: tuple[str, ...] = ("ro", "console=tty0", "console=ttyS0,115200n8")
MBR_CANDIDATES: tuple[str, ...] = (
    "/usr/lib/EXTLINUX/mbr.bin",  # Debian, Ubuntu
    "/usr/lib/syslinux/mbr/mbr.bin",
    "/usr/share/syslinux/mbr.bin",  # Fedora
)
EXTLINUX_CANDIDATES: tuple[str, ...] = ("/usr/bin/extlinux", "/usr/sbin/extlinux", "/sbin/extlinux")
HOST_TOOLS = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TOOL_TIMEOUT = 600.0
# Ext4 as Debian 12 makes it: mountable by Linux >= 3.18, e2fsprogs >= 1.43 and
# every bootloader in use (no orphan_file or metadata_csum_seed of newer hosts).
MKE2FS_CONF = """\
[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384

[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
"""
_HOST_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


@dataclass(frozen=True)
class DiskInfo:
    """Where the root filesystem is in a raw disk image and what it is called."""

    path: Path
    size: int  # bytes of the whole disk
    root_uuid: str
    partition_offset: int  # bytes from the start of the disk
    partition_size: int  # bytes


def make_disk(
    rootfs: Path,
    out: Path,
    size: int,
    *,
    root_uuid: str | None = None,
    kernel_args: Sequence[str] = DEFAULT_KERNEL_ARGS,
    log: LogFn | None = None,
) -> DiskInfo:
    """Write a BIOS-bootable raw disk of `size` bytes holding the tree `rootfs`.

    `rootfs` must contain a kernel and initramfs (``/vmlinuz``,
    ``/initrd.img``) and EXTLINUX (the distribution's boot packages). Writes
    ``/etc/fstab`` and ``/boot/extlinux/extlinux.conf`` into `rootfs` first.
    `out` appears only when complete.
    """
    rootfs = Path(rootfs)
    out = Path(out)
    check_bootable(rootfs)
    size = _round_down(size, MIB)
    used = _tree_bytes(rootfs)
    needed = PARTITION_START * SECTOR + int(used * 1.15) + 64 * MIB
    if size < max(needed, MIN_DISK_SIZE):
        raise InvalidRequest(
            f"disk size {size >> 20} MiB is too small for a root filesystem of "
            f"{used >> 20} MiB (at least {needed >> 20} MiB)"
        )
    root_uuid = str(uuidlib.UUID(root_uuid)) if root_uuid else str(uuidlib.uuid4())
    write_boot_config(rootfs, root_uuid, kernel_args=kernel_args)
    with ImageTree(rootfs) as tree:
        mbr = _mbr_code(tree)

    tmp = out.with_name(f".{out.name}.part")
    tmp.unlink(missing_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.truncate(size)
        _tool(
            ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(tmp)],
            log,
            input=f"label: dos\nunit: sectors\n\nstart={PARTITION_START}, type=83, bootable\n",
        )
        start, sectors = partition_extent(tmp)
        with tempfile.TemporaryDirectory(prefix="rain-mke2fs-") as conf_dir:
            conf = Path(conf_dir) / "mke2fs.conf"
            conf.write_text(MKE2FS_CONF)
            _tool(
                [
                    "mke2fs",
                    "-F",
                    "-q",
                    "-t",
                    "ext4",
                    "-L",
                    "root",
                    "-U",
                    root_uuid,
                    "-d",
                    str(rootfs.absolute()),
                    "-E",
                    f"offset={start * SECTOR}",
                    str(tmp),
                    f"{sectors * SECTOR // 1024}k",
                ],
                log,
                env={**_HOST_ENV, "MKE2FS_CONFIG": str(conf)},
            )
        with sigterm_raises(), attach_loop(tmp, log=log) as loop:
            part = _partition_device(loop)
            with _mounted(part, readonly=False, log=log) as mnt:
                install_extlinux(mnt, log=log)
        with open(tmp, "r+b") as f:
            f.write(mbr)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return disk_info(out)


@contextlib.contextmanager
def open_disk(
    raw: Path,
    *,
    grow_to: int | None = None,
    readonly: bool = False,
    log: LogFn | None = None,
) -> Iterator[Path]:
    """Mount the root filesystem of a disk made by `make_disk`; yield the mount point.

    With `grow_to` (bytes, not smaller than the disk), the file, its partition
    and the filesystem are grown first. The filesystem is unmounted and the
    loop device detached when the block ends, whatever happens in it; on a
    normal end the tree must still hold a kernel and initramfs (a build that
    removed them would leave an unbootable disk).
    """
    raw = Path(raw)
    if grow_to is not None and readonly:
        raise InvalidRequest("a disk opened read-only cannot be grown")
    grown = grow_to is not None and _grow(raw, grow_to, log)
    with sigterm_raises(), attach_loop(raw, readonly=readonly, log=log) as loop:
        part = _partition_device(loop)
        if grown:
            # Offline resize wants a freshly checked filesystem.
            _check_filesystem(raw, part, log)
            _tool(["resize2fs", part], log)
        if not readonly and not grown:
            _check_filesystem(raw, part, log)
        with _mounted(part, readonly=readonly, log=log) as mnt:
            yield mnt
            if not readonly:
                check_bootable(mnt)


def disk_info(raw: Path) -> DiskInfo:
    """Partition extent and root filesystem UUID of a disk made by `make_disk`."""
    raw = Path(raw)
    start, sectors = partition_extent(raw)
    offset = start * SECTOR
    return DiskInfo(
        path=raw,
        size=raw.stat().st_size,
        root_uuid=ext_uuid(raw, offset),
        partition_offset=offset,
        partition_size=sectors * SECTOR,
    )


def partition_extent(raw: Path) -> tuple[int, int]:
    """(start, size) in sectors of the disk's first partition (``sfdisk --json``)."""
    out = _tool(["sfdisk", "--json", str(raw)], None).stdout
    try:
        parts = json.loads(out)["partitiontable"]["partitions"]
        return int(parts[0]["start"]), int(parts[0]["size"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise InvalidImage(f"{raw} has no partition table with a root partition") from None


def ext_uuid(raw: Path, offset: int) -> str:
    """UUID of the ext2/3/4 filesystem at `offset` in `raw`, read from its superblock."""
    with open(raw, "rb") as f:
        f.seek(offset + 1024)
        sb = f.read(0x78)
    if len(sb) < 0x78 or struct.unpack_from("<H", sb, 0x38)[0] != 0xEF53:
        raise InvalidImage(f"{raw}: no ext2/3/4 filesystem at offset {offset}")
    return str(uuidlib.UUID(bytes=sb[0x68:0x78]))


def write_boot_config(
    root: Path, root_uuid: str, *, kernel_args: Sequence[str] = DEFAULT_KERNEL_ARGS
) -> None:
    """Write ``/etc/fstab`` (root by UUID, other entries kept) and ``extlinux.conf``."""
    for arg in kernel_args:
        if not arg or any(c.isspace() for c in arg):
            raise InvalidRequest(f"invalid kernel argument {arg!r}")
    with ImageTree(root) as tree:
        kept: list[str] = []
        if tree.is_file("/etc/fstab"):
            for line in tree.read_text("/etc/fstab", limit=1024**2).splitlines():
                fields = line.split()
                if fields and not fields[0].startswith("#") and len(fields) > 1 \
                        and fields[1] == "/":
                    continue
                if line.strip() and not line.startswith("# UNCONFIGURED FSTAB"):
                    kept.append(line)
        root_line = f"UUID={root_uuid} / ext4 errors=remount-ro 0 1"
        tree.write_text("/etc/fstab", "\n".join([root_line, *kept]) + "\n")
        append = " ".join([f"root=UUID={root_uuid}", *kernel_args])
        tree.write_text(
            f"{BOOT_DIR}/extlinux.conf",
            "# Written by rain: /vmlinuz and /initrd.img follow kernel upgrades.\n"
            "SERIAL 0 115200\n"
            "DEFAULT linux\n"
            "PROMPT 0\n"
            "TIMEOUT 10\n"
            "LABEL linux\n"
            f"  LINUX {KERNEL}\n"
            f"  INITRD {INITRD}\n"
            f"  APPEND {append}\n",
        )


def check_bootable(root: Path) -> None:
    """Raise `InvalidImage` unless `root` holds a kernel, an initramfs and EXTLINUX.

    Links are followed as the booted system follows them: inside the image.
    """
    with ImageTree(root) as tree:
        for link, what in ((KERNEL, "kernel"), (INITRD, "initramfs")):
            if not tree.is_file(link):
                raise InvalidImage(
                    f"the image has no {what} at {link}; install the distribution's boot "
                    "packages"
                )
        if not any(tree.is_file(p) for p in EXTLINUX_CANDIDATES):
            raise InvalidImage(
                "the image has no extlinux; install the distribution's boot packages")
        _mbr_code(tree)


def install_extlinux(mnt: Path, *, log: LogFn | None = None) -> None:
    """The host's ``extlinux --install`` into the mounted image's /boot/extlinux.

    The directory is checked to be the image's own (no symlink on the way,
    no mount crossed) right before: nothing else runs on the tree then, and
    extlinux writes only inside it and to the partition's boot sector.
    """
    extlinux = shutil.which("extlinux", path=HOST_TOOLS)
    if extlinux is None:
        raise ToolFailed("extlinux is not installed on this host (apt-get install extlinux)",
                         tool="extlinux")
    with ImageTree(mnt) as tree:
        tree.mkdir(BOOT_DIR)
    root = os.open(mnt, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        boot = openat2(root, BOOT_DIR.lstrip("/"), os.O_PATH | os.O_DIRECTORY,
                       RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)
        os.close(boot)
    except OSError as exc:
        raise InvalidImage(f"{BOOT_DIR} in the image must be a plain directory "
                           f"({exc.strerror})") from None
    finally:
        os.close(root)
    _tool([extlinux, "--install", str(Path(mnt) / BOOT_DIR.lstrip("/"))], log)


def copy_disk(src: Path, dst: Path, *, log: LogFn | None = None) -> None:
    """Copy a raw disk keeping it sparse (reflinked where the filesystem can)."""
    _tool(["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)], log)


@contextlib.contextmanager
def attach_loop(raw: Path, *, readonly: bool = False, log: LogFn | None = None) -> Iterator[str]:
    """Attach `raw` to a free loop device with partitions scanned; always detached after."""
    argv = ["losetup", "--find", "--show", "--partscan"]
    if readonly:
        argv.append("--read-only")
    loop = _tool([*argv, str(Path(raw).absolute())], log).stdout.decode().strip()
    if not loop.startswith("/dev/loop"):
        raise ToolFailed(f"losetup returned an unexpected device {loop!r}", tool="losetup")
    try:
        _scan_partitions(loop, log)
        yield loop
    finally:
        _detach(loop, log)


def _scan_partitions(loop: str, log: LogFn | None) -> None:
    """Make sure the first partition has a device node.

    ``--partscan`` has the kernel's partition parsers read the table, but a
    kernel built without MSDOS partition support (minimal VM kernels) finds
    nothing; then ``partx --add`` declares the partitions explicitly (BLKPG),
    which works everywhere and goes away with the loop device.
    """
    part = f"{loop}p1"
    deadline = time.monotonic() + 0.5
    while not os.path.exists(part) and time.monotonic() < deadline:
        time.sleep(0.02)
    if not os.path.exists(part):
        _tool(["partx", "--add", loop], log)


def _detach(loop: str, log: LogFn | None) -> None:
    for attempt in range(20):
        try:
            _tool(["losetup", "--detach", loop], log)
            return
        except ToolExitError:
            if attempt == 19:
                raise
            time.sleep(0.25)


@contextlib.contextmanager
def _mounted(device: str, *, readonly: bool, log: LogFn | None) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="rain-disk-") as tmp:
        mnt = Path(tmp)
        options = "ro,noload,nodev,nosuid" if readonly else "rw,nodev,nosuid"
        _tool(["mount", "-t", "ext4", "-o", options, device, str(mnt)], log)
        try:
            yield mnt
        finally:
            _unmount(mnt, log)


def _unmount(mnt: Path, log: LogFn | None) -> None:
    """Unmount, retrying while busy; lazily as a last resort (then raise)."""
    for _ in range(40):
        try:
            _tool(["umount", str(mnt)], log)
            return
        except ToolExitError:
            time.sleep(0.25)
    with contextlib.suppress(ToolFailed):
        _tool(["umount", "--lazy", str(mnt)], log)
    raise ToolFailed(f"{mnt} stayed busy and was unmounted lazily", tool="umount")


def _grow(raw: Path, size: int, log: LogFn | None) -> bool:
    """Grow the file and its partition to `size` bytes; False when already that big.

    The filesystem is grown later, on the loop device.
    """
    size = _round_down(size, MIB)
    current = raw.stat().st_size
    if size < current:
        raise InvalidRequest(f"cannot shrink {raw.name} from {current} to {size} bytes")
    if size == current:
        return False
    with open(raw, "r+b") as f:
        f.truncate(size)
    _tool(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "-N", "1", str(raw)],
        log,
        input=", +\n",
    )
    return True


def _partition_device(loop: str, timeout: float = 10.0) -> str:
    """The loop device's first partition (its node appears once the kernel scanned it)."""
    part = f"{loop}p1"
    deadline = time.monotonic() + timeout
    while not os.path.exists(part):
        if time.monotonic() > deadline:
            raise ToolFailed(f"{part} did not appear after losetup --partscan", tool="losetup")
        time.sleep(0.02)
    return part


def _mbr_code(tree: ImageTree) -> bytes:
    for candidate in MBR_CANDIDATES:
        if tree.is_file(candidate):
            code = tree.read_bytes(candidate, limit=MBR_CODE_SIZE)
            if 0 < len(code) <= MBR_CODE_SIZE:
                return code
    raise InvalidImage("the image has no syslinux mbr.bin; install the boot packages")


def _check_filesystem(raw: Path, part: str, log: LogFn | None) -> None:
    """``e2fsck -f -p`` before the host kernel mounts it read-write; exit 1 = fixed."""
    result = _tool(["e2fsck", "-f", "-p", part], log, check=False)
    if result.returncode not in (0, 1):
        raise InvalidImage(
            f"{raw.name}: e2fsck found errors it could not fix (exit {result.returncode})"
        )


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises `SystemExit(143)` so cleanup code runs.

    Only in the main thread and only when no one else handles SIGTERM (a
    server's own handler is left alone); otherwise a no-op.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def _round_down(value: int, unit: int) -> int:
    return value - value % unit


def _tool(
    argv: list[str],
    log: LogFn | None,
    *,
    input: str | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    log_command(log, argv)
    result = run_tool(
        argv,
        timeout=TOOL_TIMEOUT,
        input=input.encode() if input is not None else None,
        env=env or _HOST_ENV,
        check=check,
    )
    if argv[0] not in ("sfdisk",):
        log_output(log, result.stdout)
    return result
