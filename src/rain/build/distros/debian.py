"""Debian: bootstrap with debootstrap from the mirror apt is configured with.

debootstrap runs through `run_tool` (argv list, wall-clock timeout that kills
its whole process group). Downloaded .debs stay in ``cache_dir``
(``--cache-dir``, which must be absolute) so later bootstraps of the same
release download nothing. debootstrap mounts /proc and /sys inside the target
for its second stage and unmounts them itself on a normal exit; when it is
killed (timeout) or fails, `unmount_under` undoes whatever it left.

The package list is read from ``var/lib/dpkg/status`` directly, without
entering the chroot.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from rain.build.distros import unmount_under
from rain.build.mirror import debian_mirror
from rain.formats.tool import ToolExitError, run_tool
from rain.model.errors import InvalidRequest, ToolFailed

BOOTSTRAP_TIMEOUT = 900.0
VARIANTS: tuple[str, ...] = ("minbase", "buildd", "fakechroot")
# Release codenames/suites, architectures and package names: no leading dash,
# so no value can ever be taken for an option.
_NAME = re.compile(r"[a-z0-9][a-z0-9.+-]*\Z")
_NOT_INSTALLED = "debootstrap is not installed (apt-get install debootstrap)"
# debootstrap lives in /usr/sbin, which is not on every user's PATH.
_SBIN = ("/usr/sbin", "/sbin")


class DebianInstaller:
    """`DistroInstaller` for Debian releases (bookworm, trixie, ...)."""

    name = "debian"

    def __init__(self, mirror: str | None = None, *, timeout: float = BOOTSTRAP_TIMEOUT) -> None:
        self._mirror = mirror.rstrip("/") if mirror else None
        self.timeout = timeout

    @property
    def mirror(self) -> str:
        """The mirror given, else the one apt on this machine uses."""
        if self._mirror is None:
            self._mirror = debian_mirror()
        return self._mirror

    def bootstrap_argv(
        self,
        root: Path,
        release: str,
        arch: str,
        *,
        cache_dir: Path,
        variant: str = "minbase",
        include: Sequence[str] = (),
        debootstrap: str = "debootstrap",
    ) -> list[str]:
        """The debootstrap command line (validated; paths made absolute)."""
        _check_name("release", release)
        _check_name("architecture", arch)
        if variant not in VARIANTS:
            raise InvalidRequest(
                f"unknown debootstrap variant {variant!r} (one of {', '.join(VARIANTS)})"
            )
        for package in include:
            _check_name("package name", package)
        argv = [debootstrap, f"--variant={variant}", f"--arch={arch}"]
        if include:
            argv.append("--include=" + ",".join(include))
        argv += [
            f"--cache-dir={Path(cache_dir).absolute()}",
            release,
            str(Path(root).absolute()),
            self.mirror,
        ]
        return argv

    def bootstrap(
        self,
        root: Path,
        release: str,
        arch: str,
        *,
        cache_dir: Path,
        variant: str = "minbase",
        include: Sequence[str] = (),
    ) -> None:
        """Run debootstrap into `root`; raise `ToolFailed` with its complaint on failure."""
        binary = _find_debootstrap()
        argv = self.bootstrap_argv(
            root,
            release,
            arch,
            cache_dir=cache_dir,
            variant=variant,
            include=include,
            debootstrap=binary,
        )
        if variant != "fakechroot" and os.geteuid() != 0:
            raise ToolFailed("debootstrap needs root (or variant 'fakechroot')", tool="debootstrap")
        Path(cache_dir).absolute().mkdir(parents=True, exist_ok=True)
        Path(root).mkdir(parents=True, exist_ok=True)
        try:
            run_tool(argv, timeout=self.timeout)
        except ToolExitError as exc:
            detail = _log_tail(Path(root) / "debootstrap" / "debootstrap.log")
            if not detail:
                raise
            raise ToolFailed(
                f"{exc.message} (log: {detail})", tool=exc.tool, stderr=exc.stderr
            ) from None
        finally:
            unmount_under(Path(root))

    def installed_packages(self, root: Path) -> dict[str, str]:
        return installed_packages(root)


def installed_packages(root: Path) -> dict[str, str]:
    """{package: version} for every package dpkg under `root` records as installed."""
    status = Path(root) / "var" / "lib" / "dpkg" / "status"
    try:
        text = status.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise InvalidRequest(f"{root} has no dpkg database (var/lib/dpkg/status)") from None
    packages: dict[str, str] = {}
    for fields in _stanzas(text):
        name, version = fields.get("package"), fields.get("version")
        if name and version and fields.get("status", "").split() == ["install", "ok", "installed"]:
            packages.setdefault(name, version)
    return packages


def _stanzas(text: str) -> Iterator[dict[str, str]]:
    """deb822 stanzas as {lower-case field: first-line value}; continuation lines dropped."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                yield fields
            fields = {}
        elif line[0] not in " \t#":
            name, sep, value = line.partition(":")
            if sep:
                fields[name.strip().lower()] = value.strip()
    if fields:
        yield fields


def _find_debootstrap() -> str:
    path = os.environ.get("PATH", os.defpath)
    found = shutil.which("debootstrap", path=os.pathsep.join([path, *_SBIN]))
    if found is None:
        raise ToolFailed(_NOT_INSTALLED, tool="debootstrap")
    return found


def _check_name(what: str, value: str) -> None:
    if not _NAME.match(value):
        raise InvalidRequest(f"invalid {what} {value!r}")


def _log_tail(log: Path, lines: int = 3) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " / ".join(kept)[-300:]
