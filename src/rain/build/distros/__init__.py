"""Distribution installers: one module per distribution behind `DistroInstaller`.

Adding a distribution is adding a module here (``debian.py`` today), not
editing a switch elsewhere. Installers bootstrap a root filesystem into a plain
directory and report what got installed; they never leave mounts behind
(`unmount_under` is the shared clean-up for that). Everything after the
bootstrap (packages, services, boot setup, clean-up) works on a tree that
may be a stranger's: commands run in the `rain.sandbox.Sandbox` the caller
holds open, host-side file work goes through its `ImageTree`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from rain.formats.tool import run_tool
from rain.model.errors import ToolFailed

if TYPE_CHECKING:
    from rain.sandbox import Sandbox


class DistroInstaller(Protocol):
    """Bootstraps one distribution's root filesystem and lists its packages."""

    name: str

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
        """Install a minimal `release` for `arch` into the directory `root`.

        Downloaded packages are kept in `cache_dir` and reused by later builds.
        """
        ...

    def installed_packages(self, root: Path) -> dict[str, str]:
        """{package: version} of what is installed under `root`."""
        ...

    def boot_packages(self, arch: str, *, release: str) -> list[str]:
        """Packages that make a bootstrapped tree boot as a VM (kernel, init, DHCP, bootloader)."""
        ...

    def install(self, sandbox: Sandbox, packages: Sequence[str], *, release: str,
                arch: str) -> None:
        """Install packages (NAME or NAME=VERSION); unknown names are one `InvalidRequest`.

        The sandbox has no network: the installer fetches (and verifies) on the host.
        """
        ...

    def configure_boot(self, sandbox: Sandbox) -> None:
        """After the boot packages: DHCP networking and the boot-test marker."""
        ...

    def enable_services(
        self, sandbox: Sandbox, enable: Sequence[str], disable: Sequence[str]
    ) -> None:
        """Enable/disable units; an unknown unit is an `InvalidRequest`."""
        ...

    def clean(self, sandbox: Sandbox, *, keep_apt_lists: bool = True) -> None:
        """Last step of a build: no machine identity, host leftovers or passwords in the image."""
        ...


def mounts_under(root: Path) -> list[Path]:
    """Mount points at or below `root` (from /proc/mounts), deepest first."""
    base = Path(os.path.realpath(root))
    found: list[Path] = []
    try:
        text = Path("/proc/mounts").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return found
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2:
            continue
        point = Path(_unescape(fields[1]))
        if point == base or base in point.parents:
            found.append(point)
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def unmount_under(root: Path) -> None:
    """Lazily unmount everything mounted at or below `root` (best effort, deepest first)."""
    for point in mounts_under(root):
        with contextlib.suppress(ToolFailed):
            run_tool(["umount", "-l", str(point)], timeout=60)


def _unescape(field: str) -> str:
    """Undo /proc/mounts octal escapes (space is \\040, tab \\011, ...)."""
    out: list[str] = []
    i = 0
    while i < len(field):
        chunk = field[i + 1 : i + 4]
        if field[i] == "\\" and len(chunk) == 3 and all(c in "01234567" for c in chunk):
            out.append(chr(int(chunk, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)
