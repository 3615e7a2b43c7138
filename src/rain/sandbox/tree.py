"""Host-side access to an image's files, resolved as the image itself would resolve them.

An image tree is a stranger's: any path in it may be a symlink to ``/etc``,
a ``..`` chain, a FIFO or a device node. Code running as host root that
reads or writes such a tree with ordinary path functions follows those links
onto the host (``var/cache/apt/archives -> /etc`` and a glob-and-unlink
empties the host's /etc). `ImageTree` resolves every path with
``openat2(RESOLVE_IN_ROOT)`` from a descriptor of the tree's root: absolute
symlinks and ``..`` stay inside the tree, exactly as in a chroot, and the
kernel guarantees it even against concurrent renames. Mount points are not
crossed (``RESOLVE_NO_XDEV``) and /proc magic links are refused.

Only regular files are read or written: a device node, FIFO or socket at the
path is an `InvalidImage` (it is opened ``O_PATH`` first, which has no side
effects, and checked before being reopened). Writes replace whatever entry is
at the path (a symlink is replaced, never followed), atomically by rename.
Files are written as the host's root, i.e. owned by uid 0 inside the image.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import stat
import uuid
from pathlib import Path
from types import TracebackType

from rain.model.errors import InvalidImage
from rain.sandbox import syscalls

_RESOLVE = syscalls.RESOLVE_IN_ROOT | syscalls.RESOLVE_NO_MAGICLINKS | syscalls.RESOLVE_NO_XDEV
READ_LIMIT = 256 * 1024**2  # bytes read from one file at most (dpkg's status is a few MiB)


class ImageTree:
    """A root filesystem directory whose paths are resolved inside it (see the module doc)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(os.path.realpath(root))
        try:
            self._fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise InvalidImage(f"{self.root} is not a root filesystem directory "
                               f"({exc.strerror})") from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ImageTree:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # -- queries ----------------------------------------------------------

    def lstat(self, path: str) -> os.stat_result | None:
        """The entry at `path` itself (a symlink is not followed), or None when absent."""
        try:
            parent, name = self._parent(path)
        except FileNotFoundError:
            return None
        try:
            return os.stat(name, dir_fd=parent, follow_symlinks=False) if name else os.fstat(parent)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _image_error(exc, path) from None
        finally:
            os.close(parent)

    def stat(self, path: str) -> os.stat_result | None:
        """What `path` leads to inside the tree (symlinks followed inside it), or None."""
        try:
            fd = self._open(path, os.O_PATH)
        except FileNotFoundError:
            return None
        except InvalidImage:
            return None  # a loop or a link through a file: it leads nowhere
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def exists(self, path: str) -> bool:
        return self.stat(path) is not None

    def is_file(self, path: str) -> bool:
        found = self.stat(path)
        return found is not None and stat.S_ISREG(found.st_mode)

    def is_dir(self, path: str) -> bool:
        found = self.stat(path)
        return found is not None and stat.S_ISDIR(found.st_mode)

    def is_symlink(self, path: str) -> bool:
        found = self.lstat(path)
        return found is not None and stat.S_ISLNK(found.st_mode)

    def readlink(self, path: str) -> str:
        parent, name = self._parent(path)
        try:
            return os.readlink(name, dir_fd=parent)
        except OSError as exc:
            raise _image_error(exc, path) from None
        finally:
            os.close(parent)

    def listdir(self, path: str) -> list[str]:
        """Names in the directory `path`; [] when it does not exist."""
        try:
            fd = self._open(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return []
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    def glob(self, directory: str, pattern: str) -> list[str]:
        """Paths (inside the image) of the entries of `directory` whose name matches `pattern`."""
        base = "/" + directory.strip("/")
        return [f"{base.rstrip('/')}/{name}" for name in self.listdir(directory)
                if fnmatch.fnmatchcase(name, pattern)]

    # -- reading ------------------------------------------------------------

    def read_bytes(self, path: str, *, limit: int = READ_LIMIT) -> bytes:
        """The content of the regular file `path`; `InvalidImage` beyond `limit` bytes."""
        fd = self._open_regular(path, os.O_RDONLY)
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise InvalidImage(f"{path} in the image is larger than {limit} bytes")
        return data

    def read_text(self, path: str, *, limit: int = READ_LIMIT) -> str:
        return self.read_bytes(path, limit=limit).decode("utf-8", "replace")

    # -- writing ------------------------------------------------------------

    def write_bytes(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        """Make `path` a regular file holding `data` (parents created, any other entry replaced)."""
        parent, name = self._parent(path, create=True)
        if not name:
            os.close(parent)
            raise InvalidImage(f"cannot write to {path!r}: it is the image's root")
        temp = f".rain-{uuid.uuid4().hex[:12]}"
        try:
            existing = _lstat_at(parent, name)
            if existing is not None and stat.S_ISDIR(existing.st_mode):
                raise InvalidImage(f"{path} in the image is a directory")
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         mode, dir_fd=parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    os.fchmod(f.fileno(), mode)
                os.rename(temp, name, src_dir_fd=parent, dst_dir_fd=parent)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=parent)
                raise
        except OSError as exc:
            raise _image_error(exc, path) from None
        finally:
            os.close(parent)

    def write_text(self, path: str, text: str, *, mode: int = 0o644) -> None:
        self.write_bytes(path, text.encode(), mode=mode)

    def unlink(self, path: str, *, missing_ok: bool = True) -> None:
        """Remove the entry at `path` (a symlink itself, not its target); not directories."""
        try:
            parent, name = self._parent(path)
        except FileNotFoundError:
            if missing_ok:
                return
            raise
        try:
            os.unlink(name, dir_fd=parent)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except OSError as exc:
            raise _image_error(exc, path) from None
        finally:
            os.close(parent)

    def symlink(self, path: str, target: str) -> None:
        """Make `path` a symlink to `target` (not resolved); an entry already there is replaced."""
        parent, name = self._parent(path, create=True)
        try:
            existing = _lstat_at(parent, name)
            if existing is not None:
                if stat.S_ISDIR(existing.st_mode):
                    raise InvalidImage(f"{path} in the image is a directory")
                os.unlink(name, dir_fd=parent)
            os.symlink(target, name, dir_fd=parent)
        except OSError as exc:
            raise _image_error(exc, path) from None
        finally:
            os.close(parent)

    def mkdir(self, path: str, *, mode: int = 0o755) -> None:
        """Make the directory `path` and its missing parents (inside the tree)."""
        fd = self._directory(path, create=True, mode=mode)
        os.close(fd)

    def chmod(self, path: str, mode: int) -> None:
        fd = self._open_regular(path, os.O_RDONLY)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    def empty_dir(self, path: str) -> None:
        """Remove everything inside the directory `path`, following no symlink (absent: no-op)."""
        try:
            fd = self._open(path, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, InvalidImage):
            return
        try:
            _remove_contents(fd)
        finally:
            os.close(fd)

    # -- resolution -----------------------------------------------------------

    def _open(self, path: str, flags: int, resolve: int = 0) -> int:
        try:
            return syscalls.openat2(self._fd, _relative(path), flags, _RESOLVE | resolve)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise _image_error(exc, path) from None

    def _open_regular(self, path: str, flags: int) -> int:
        """Open a regular file: resolved `O_PATH` first (no side effects), checked, reopened."""
        probe = self._open(path, os.O_PATH)
        try:
            info = os.fstat(probe)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidImage(f"{path} in the image is not a regular file")
            return os.open(f"/proc/self/fd/{probe}", flags | os.O_CLOEXEC | os.O_NOCTTY)
        finally:
            os.close(probe)

    def _directory(self, path: str, *, create: bool, mode: int = 0o755) -> int:
        """An `O_PATH` descriptor of the directory `path`, made (with parents) when `create`."""
        parts = _parts(path)
        try:
            return self._open("/".join(parts), os.O_PATH | os.O_DIRECTORY)
        except FileNotFoundError:
            if not create:
                raise
        current = os.dup(self._fd)
        try:
            for i, part in enumerate(parts):
                sub = "/".join(parts[: i + 1])
                try:
                    nxt = self._open(sub, os.O_PATH | os.O_DIRECTORY)
                except FileNotFoundError:
                    try:
                        os.mkdir(part, mode, dir_fd=current)
                    except FileExistsError:
                        raise InvalidImage(f"/{sub} in the image is a symlink to nowhere; "
                                           "it cannot hold files") from None
                    except OSError as exc:
                        raise _image_error(exc, "/" + sub) from None
                    nxt = self._open(sub, os.O_PATH | os.O_DIRECTORY)
                os.close(current)
                current = nxt
            return current
        except BaseException:
            os.close(current)
            raise

    def _parent(self, path: str, *, create: bool = False) -> tuple[int, str]:
        """(descriptor of the directory holding `path`, last component); '' for the root."""
        parts = _parts(path)
        if not parts:
            return os.dup(self._fd), ""
        return self._directory("/".join(parts[:-1]), create=create), parts[-1]


def _relative(path: str) -> str:
    return "/".join(_parts(path)) or "."


def _parts(path: str) -> list[str]:
    """Components of an image path; ``..`` is resolved by the kernel only inside the root,
    but a last component of ``..`` would name a directory above the one given: refused."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if parts and parts[-1] == "..":
        raise InvalidImage(f"path {path!r} must not end in '..'")
    return parts


def _lstat_at(dirfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove_contents(dirfd: int) -> None:
    for name in os.listdir(dirfd):
        info = _lstat_at(dirfd, name)
        if info is None:
            continue
        if stat.S_ISDIR(info.st_mode):
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=dirfd)
            try:
                if os.fstat(sub).st_dev != info.st_dev:
                    continue  # a mount point: not ours to empty
                _remove_contents(sub)
            finally:
                os.close(sub)
            with contextlib.suppress(OSError):
                os.rmdir(name, dir_fd=dirfd)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dirfd)


def _image_error(exc: OSError, path: str) -> InvalidImage | OSError:
    """Structural surprises (loops, links through files, mount points) are `InvalidImage`."""
    known = {errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.EXDEV, errno.ENAMETOOLONG,
             errno.EACCES, errno.EPERM}
    if exc.errno in known:
        return InvalidImage(f"{path} in the image: {os.strerror(exc.errno or 0)}")
    return exc
