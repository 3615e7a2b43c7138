"""The Linux calls the sandbox needs that Python 3.11's `os` module lacks.

`os.unshare`/`os.setns` arrived in 3.12 and the new mount API (`open_tree`,
`move_mount`, `mount_setattr`) and `openat2` have no wrapper at all, so they
are called through libc with ctypes. Syscall numbers are the x86_64 ones
(the only architecture rain builds on); `SYSCALLS_KNOWN` says so, and every
wrapper raises `OSError` with the errno and the name of the call, like `os`.
"""

from __future__ import annotations

import ctypes
import os
import platform

SYSCALLS_KNOWN = platform.machine() in ("x86_64", "amd64")

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_IDMAP = 0x00100000

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4

_SYS_PIVOT_ROOT = 155
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_OPENAT2 = 437
_SYS_MOUNT_SETATTR = 442

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def _check(result: int, call: str, path: str | None = None) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        if path is None:
            raise OSError(errno, f"{call}: {os.strerror(errno)}")
        raise OSError(errno, f"{call}: {os.strerror(errno)}", path)
    return result


def _b(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), "mount", target)


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), "umount2", target)


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(_SYS_PIVOT_ROOT, _b(new_root), _b(put_old)), "pivot_root", new_root)


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, arg, 0, 0, 0), "prctl")


def open_tree(path: str, flags: int, *, dirfd: int = AT_FDCWD) -> int:
    """A file descriptor for a detached copy (`OPEN_TREE_CLONE`) of the mount at `path`."""
    return _check(_libc.syscall(_SYS_OPEN_TREE, ctypes.c_int(dirfd), _b(path),
                                ctypes.c_uint(flags | os.O_CLOEXEC)), "open_tree", path)


def mount_setattr(fd: int, *, attr_set: int = 0, attr_clr: int = 0, userns_fd: int = 0,
                  recursive: bool = True) -> None:
    """Change the attributes of the mount `fd` (and its children): read-only, idmapped, ..."""
    attr = _MountAttr(attr_set, attr_clr, 0, userns_fd)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    _check(_libc.syscall(_SYS_MOUNT_SETATTR, ctypes.c_int(fd), b"", ctypes.c_uint(flags),
                         ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))),
           "mount_setattr")


def move_mount(from_fd: int, to_path: str, *, to_dirfd: int = AT_FDCWD) -> None:
    """Attach the detached mount `from_fd` at `to_path` (or on `to_dirfd` itself when empty)."""
    flags = MOVE_MOUNT_F_EMPTY_PATH | (MOVE_MOUNT_T_EMPTY_PATH if not to_path else 0)
    _check(_libc.syscall(_SYS_MOVE_MOUNT, ctypes.c_int(from_fd), b"", ctypes.c_int(to_dirfd),
                         _b(to_path), ctypes.c_uint(flags)), "move_mount", to_path or None)


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """`openat2(2)`: open `path` below `dirfd` under the `resolve` rules (`RESOLVE_IN_ROOT` ...)."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    return _check(_libc.syscall(_SYS_OPENAT2, ctypes.c_int(dirfd), _b(path), ctypes.byref(how),
                                ctypes.c_size_t(ctypes.sizeof(how))), "openat2", path)
