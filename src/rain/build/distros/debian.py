"""Debian: bootstrap with debootstrap from the mirror apt is configured with,
then make the tree bootable, install packages and clean it in a `Sandbox`.

debootstrap runs on the host through `run_tool` (argv list, wall-clock
timeout that kills its whole process group): it installs only Debian's
signed packages from the configured mirror, verified against the host's
keyring, so it is trusted like rain itself (docs/sandbox.md says what runs
where). Downloaded .debs stay in ``cache_dir`` (``--cache-dir``, which must
be absolute) so later bootstraps of the same release download nothing.
debootstrap mounts /proc and /sys inside the target for its second stage and
unmounts them itself on a normal exit; when it is killed (timeout) or fails,
`unmount_under` undoes whatever it left.

Everything after the bootstrap runs on a tree that may be a stranger's
(``from: image:``): commands in the sandbox, host-side file work through the
sandbox's `ImageTree` (symlinks resolved inside the tree). The package list
is read from ``var/lib/dpkg/status`` the same way, without running anything.

Packages: the sandbox has no network, so the host fetches and verifies
(`DebianArchive`) and apt inside installs offline from a read-only
``file:`` view of the verified cache: ``apt-get update`` from the view,
``apt-cache policy`` to confirm every name (an unknown name is one
`InvalidRequest` line naming it, before anything is installed), ``apt-get
-s install`` to learn which .debs are needed, the host downloads them, then
``apt-get install --no-install-recommends``. ``policy-rc.d`` keeps package
scripts from starting daemons meanwhile. The index is fetched again when a
name is unknown or a download is refused (it may be stale).

Booting: Debian's cloud kernel (virtio built in, small), initramfs-tools,
systemd with systemd-networkd doing DHCP on every ``en*``/``eth*`` interface
(no MAC address pinned, so a copy boots on any VM), systemd-resolved for DNS
and EXTLINUX as the bootloader (see `rain.build.disk`).

`clean` removes what must not be shared by every VM started from an image
(machine-id, SSH host keys, the build host's name and DNS servers) and locks
root's password. It keeps apt's package lists by default (the image's own
and the ones rain's installs used, so a later build on top of the image
skips ``apt-get update`` when the index is the same), at the price of about
50 MB in the image; `keep_apt_lists=False` drops them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rain.build.boot import install_boot_marker
from rain.build.distros import unmount_under
from rain.build.distros.debian_archive import (
    VIEW_TARGET,
    ArchiveIndex,
    DebianArchive,
    apt_options,
)
from rain.build.mirror import debian_mirror
from rain.formats.tool import ToolExitError, run_tool
from rain.model.errors import InvalidImage, InvalidRequest, ToolFailed
from rain.sandbox import Bind, ImageTree

if TYPE_CHECKING:
    from rain.sandbox import Sandbox

BOOTSTRAP_TIMEOUT = 900.0
VARIANTS: tuple[str, ...] = ("minbase", "buildd", "fakechroot")
# Release codenames/suites, architectures and package names: no leading dash,
# so no value can ever be taken for an option.
_NAME = re.compile(r"[a-z0-9][a-z0-9.+-]*\Z")
_NOT_INSTALLED = "debootstrap is not installed (apt-get install debootstrap)"
# debootstrap lives in /usr/sbin, which is not on every user's PATH.
_SBIN = ("/usr/sbin", "/sbin")
# A package as templates write it: NAME or NAME=VERSION.
_PACKAGE_SPEC = re.compile(r"([a-z0-9][a-z0-9.+-]*)(?:=([0-9][A-Za-z0-9.+~:-]*))?\Z")
_UNIT = re.compile(r"[A-Za-z0-9@._:\\-]+\Z")
_UNIT_TYPES = frozenset(
    {"service", "socket", "timer", "target", "mount", "automount", "path", "swap", "slice"}
)
INSTALL_TIMEOUT = 1800.0
POLICY_RC_D = b"#!/bin/sh\n# Written by rain while the image is built: start no daemon.\nexit 101\n"
APT_ENV = {
    "DEBIAN_FRONTEND": "noninteractive",
    "DEBCONF_NONINTERACTIVE_SEEN": "true",
    "APT_LISTCHANGES_FRONTEND": "none",
}
_APT_OPTIONS = (
    "-q",
    "-o",
    "Acquire::Retries=3",
    "-o",
    "Acquire::Languages=none",
    "-o",
    "Dpkg::Options::=--force-confdef",
    "-o",
    "Dpkg::Options::=--force-confold",
)
# Kernel flavours per architecture that rain can boot (BIOS + EXTLINUX: x86 only).
_KERNELS = {"amd64": "linux-image-cloud-amd64"}
# Releases where systemd-resolved is still part of the systemd package.
_RESOLVED_IN_SYSTEMD = frozenset({"buster", "bullseye"})
DHCP_NETWORK_FILE = "/etc/systemd/network/80-rain-dhcp.network"
DHCP_NETWORK = """\
# Written by rain: DHCP on every Ethernet interface, whatever its MAC address.
[Match]
Name=en* eth*

[Network]
DHCP=yes
"""
SSH_KEYS_UNIT = "rain-ssh-host-keys.service"
_SSH_KEYS_UNIT_TEXT = """\
[Unit]
Description=Generate this machine's SSH host keys (removed from the image by rain)
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target ssh.service
"""
DEFAULT_HOSTS = """\
127.0.0.1\tlocalhost
::1\t\tlocalhost ip6-localhost ip6-loopback
ff02::1\t\tip6-allnodes
ff02::2\t\tip6-allrouters
"""


class DebianInstaller:
    """`DistroInstaller` for Debian releases (bookworm, trixie, ...)."""

    name = "debian"

    def __init__(self, mirror: str | None = None, *, timeout: float = BOOTSTRAP_TIMEOUT,
                 cache: Path | None = None, keyring: str | None = None,
                 max_download_bytes: int = 4 * 1024**3) -> None:
        self._mirror = mirror.rstrip("/") if mirror else None
        self.timeout = timeout
        self._cache = cache
        self._keyring = keyring
        self._max_download_bytes = max_download_bytes
        self._archive: DebianArchive | None = None

    @property
    def mirror(self) -> str:
        """The mirror given, else the one apt on this machine uses."""
        if self._mirror is None:
            self._mirror = debian_mirror()
        return self._mirror

    @property
    def archive(self) -> DebianArchive:
        """Verified downloads from the mirror, cached in `cache` (needed to install packages)."""
        if self._archive is None:
            if self._cache is None:
                raise ToolFailed("DebianInstaller needs a cache directory to install packages",
                                 tool="apt")
            extra = {"keyring": self._keyring} if self._keyring else {}
            self._archive = DebianArchive(self.mirror, self._cache,
                                          max_download_bytes=self._max_download_bytes, **extra)
        return self._archive

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

    # -- on a tree, in a Sandbox -------------------------------------------------

    def boot_packages(self, arch: str, *, release: str = "bookworm") -> list[str]:
        """What makes a bootstrapped tree a bootable VM image (kernel, init, DHCP, EXTLINUX)."""
        kernel = _KERNELS.get(arch)
        if kernel is None:
            raise InvalidRequest(
                f"bootable {arch} images are not supported yet ({', '.join(_KERNELS)} only)"
            )
        packages = [
            kernel,
            "initramfs-tools",
            "zstd",  # initramfs-tools compresses with it; gzip otherwise, with a warning
            "systemd-sysv",
            "udev",
            "dbus",
            "iproute2",
            "extlinux",
        ]
        if release not in _RESOLVED_IN_SYSTEMD:
            packages.append("systemd-resolved")
        return packages

    def install(self, sandbox: Sandbox, packages: Sequence[str], *, release: str,
                arch: str) -> None:
        """Install `packages` (NAME or NAME=VERSION) and their dependencies, not recommends.

        Raises `InvalidRequest` naming every package apt does not know, before
        installing anything. `release` and `arch` choose the index fetched
        (the image's own, as the catalog records it).
        """
        specs = [_check_spec(p) for p in packages]
        if not specs:
            return
        if not release:
            raise InvalidRequest("cannot install packages: the image's Debian release is "
                                 "unknown (set its os_release)")
        _check_name("release", release)
        _check_name("architecture", arch)
        names = [f"{name}={version}" if version else name for name, version in specs]
        log = sandbox.log
        refreshed = False
        index = self.archive.index(release, arch, log=log)
        with _no_daemons(sandbox.tree):
            while True:
                with self.archive.view(index) as view:
                    apt = sandbox.with_binds(Bind(view, VIEW_TARGET))
                    try:
                        self._install_from(apt, view, index, specs, names)
                        return
                    except _Stale as stale:
                        if refreshed:
                            raise stale.error from None
                refreshed = True
                index = self.archive.index(release, arch, refresh=True, log=log)

    def _install_from(self, apt: Sandbox, view: Path, index: ArchiveIndex,
                      specs: Sequence[tuple[str, str]], names: Sequence[str]) -> None:
        _update_lists(apt, index)
        missing = _unavailable(apt, specs)
        if missing:
            raise _Stale(InvalidRequest(_unknown_message(missing)))
        options = ["apt-get", *_APT_OPTIONS, *apt_options(), "install", "--no-install-recommends"]
        plan = apt.run([*options, "-s", *names], env=APT_ENV, timeout=INSTALL_TIMEOUT)
        try:
            files = self.archive.lookup(index, plan)
            self.archive.fetch(files, log=apt.log)
        except ToolFailed as exc:
            raise _Stale(exc) from None
        self.archive.add(view, files)
        apt.run([*options, "-y", *names], env=APT_ENV, timeout=INSTALL_TIMEOUT)

    def configure_boot(self, sandbox: Sandbox) -> None:
        """Network by DHCP (systemd-networkd + resolved) and the boot-test marker unit.

        Run after `install(sandbox, boot_packages(...))`, on a base image's own tree.
        """
        tree = sandbox.tree
        tree.write_text(DHCP_NETWORK_FILE, DHCP_NETWORK)
        self.enable_services(sandbox, ["systemd-networkd", "systemd-resolved"], [])
        if not tree.is_symlink("/etc/resolv.conf"):
            # Where resolved ships inside systemd (bullseye), nothing links it.
            tree.symlink("/etc/resolv.conf", "../run/systemd/resolve/stub-resolv.conf")
        install_boot_marker(tree)

    def enable_services(
        self, sandbox: Sandbox, enable: Sequence[str], disable: Sequence[str]
    ) -> None:
        """``systemctl enable``/``disable`` in the image; an unknown unit is an `InvalidRequest`."""
        enable = [_unit_name(u) for u in enable]
        disable = [_unit_name(u) for u in disable]
        if not enable and not disable:
            return
        listing = sandbox.run(
            ["systemctl", "--root=/", "list-unit-files", "--no-legend", "--no-pager"]
        )
        known = {line.split()[0] for line in listing.splitlines() if line.split()}
        unknown = [u for u in [*enable, *disable] if not _unit_known(u, known)]
        if unknown:
            names = ", ".join(repr(u) for u in unknown)
            raise InvalidRequest(
                f"unknown service{'s' if len(unknown) > 1 else ''} {names}"
                " (no such unit file in the image)"
            )
        if enable:
            sandbox.run(["systemctl", "--root=/", "enable", *enable])
        if disable:
            sandbox.run(["systemctl", "--root=/", "disable", *disable])

    def clean(self, sandbox: Sandbox, *, keep_apt_lists: bool = True) -> None:
        """Remove per-machine identity and build leftovers; lock root's password.

        Run last in a build (after files and commands): machine-id emptied
        (systemd makes a new one at first boot), SSH host keys removed (a unit
        regenerates them at first boot when sshd is installed), the build
        host's hostname, hosts and DNS servers that debootstrap copied in
        replaced, downloaded .debs and /tmp removed, apt lists kept unless
        `keep_apt_lists` is false. Every path goes through the sandbox's
        `ImageTree`: a symlink planted in the image cannot point this at the host.
        """
        tree = sandbox.tree
        if tree.lstat("/etc/machine-id") is not None:
            tree.write_bytes("/etc/machine-id", b"", mode=0o444)
        tree.unlink("/var/lib/dbus/machine-id")
        for key in tree.glob("/etc/ssh", "ssh_host_*"):
            tree.unlink(key)
        if tree.exists("/usr/sbin/sshd"):
            _install_ssh_keys_unit(tree)
        if tree.exists("/usr/bin/passwd"):
            sandbox.run(["passwd", "--lock", "root"])
        _unleak_host_files(tree)
        for directory, pattern in (("/var/cache/apt/archives", "*.deb"),
                                   ("/var/cache/apt/archives/partial", "*"),
                                   ("/var/cache/apt", "*.bin")):
            for path in tree.glob(directory, pattern):
                if _is_regular(tree, path):
                    tree.unlink(path)
        if not keep_apt_lists:
            for directory in ("/var/lib/apt/lists", "/var/lib/rain-apt/lists"):
                for path in tree.glob(directory, "*"):
                    if _is_regular(tree, path) and not path.endswith("/lock"):
                        tree.unlink(path)
        for tmp in ("/tmp", "/var/tmp"):
            tree.empty_dir(tmp)


class _Stale(Exception):
    """An install step failed in a way a fresher index may fix; `error` is what to report."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def installed_packages(root: Path | ImageTree) -> dict[str, str]:
    """{package: version} for every package dpkg in the tree records as installed.

    Read through `ImageTree` (a stranger's ``var/lib/dpkg`` may be a symlink
    to the host's), never by running the image's dpkg.
    """
    tree = root if isinstance(root, ImageTree) else ImageTree(root)
    try:
        text = tree.read_text("/var/lib/dpkg/status")
    except FileNotFoundError:
        raise InvalidRequest(f"{tree.root} has no dpkg database (var/lib/dpkg/status)") from None
    finally:
        if tree is not root:
            tree.close()
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


def _check_spec(spec: str) -> tuple[str, str]:
    match = _PACKAGE_SPEC.match(spec)
    if not match:
        raise InvalidRequest(f"invalid package name {spec!r}")
    return match.group(1), match.group(2) or ""


LISTS_STAMP = "/var/lib/rain-apt/index.sha256"


def _update_lists(apt: Sandbox, index: ArchiveIndex) -> None:
    """``apt-get update`` from the view, unless the image's lists come from the same index."""
    tree = apt.tree
    stamp = f"{index.release} {index.arch} {index.packages_sha256}"
    with contextlib.suppress(FileNotFoundError, InvalidImage):
        if tree.read_text(LISTS_STAMP, limit=4096).strip() == stamp:
            return
    tree.mkdir("/var/lib/rain-apt/lists/partial")
    apt.run(["apt-get", *_APT_OPTIONS, *apt_options(), "update"], env=APT_ENV,
            timeout=INSTALL_TIMEOUT)
    tree.write_text(LISTS_STAMP, stamp + "\n")


def _unavailable(apt: Sandbox, specs: Sequence[tuple[str, str]]) -> list[str]:
    """Specs apt cannot install: unknown names, no candidate, or a version it lacks."""
    names = sorted({name for name, _ in specs})
    policy = _parse_policy(apt.run(["apt-cache", *apt_options(), "policy", *names],
                                   env=APT_ENV))
    missing = []
    for name, version in specs:
        known = policy.get(name)
        if known is None or (not version and known[0] in ("", "(none)")):
            missing.append(name)
        elif version and version not in known[1]:
            missing.append(f"{name}={version}")
    return missing


def _parse_policy(text: str) -> dict[str, tuple[str, set[str]]]:
    """``apt-cache policy`` output → {package: (candidate, versions in its table)}."""
    found: dict[str, tuple[str, set[str]]] = {}
    name = ""
    candidate = ""
    versions: set[str] = set()
    for line in text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            if name:
                found[name] = (candidate, versions)
            name, candidate, versions = line[:-1], "", set()
        elif line.strip().startswith("Candidate:"):
            candidate = line.split(":", 1)[1].strip()
        elif line.startswith("     ") and not line.startswith("        "):
            versions.add(line.replace("***", " ").split()[0])
        elif line.startswith(" *** "):
            versions.add(line.split()[1])
    if name:
        found[name] = (candidate, versions)
    return found


def _unknown_message(missing: Sequence[str]) -> str:
    names = ", ".join(repr(m) for m in missing)
    plural = "s" if len(missing) > 1 else ""
    return f"unknown package{plural} {names}: not available from the image's apt sources"


def _unit_name(unit: str) -> str:
    """``ssh`` → ``ssh.service``; names with a unit type suffix are kept."""
    if not _UNIT.match(unit) or unit.startswith("-"):
        raise InvalidRequest(f"invalid service name {unit!r}")
    return unit if unit.rsplit(".", 1)[-1] in _UNIT_TYPES else unit + ".service"


def _unit_known(unit: str, known: set[str]) -> bool:
    if unit in known:
        return True
    prefix, at, rest = unit.partition("@")
    if at and "." in rest:
        return f"{prefix}@.{rest.rsplit('.', 1)[1]}" in known
    return False


def _install_ssh_keys_unit(tree: ImageTree) -> None:
    units = "/etc/systemd/system"
    tree.write_text(f"{units}/{SSH_KEYS_UNIT}", _SSH_KEYS_UNIT_TEXT)
    for target in ("multi-user.target", "ssh.service"):
        tree.symlink(f"{units}/{target}.wants/{SSH_KEYS_UNIT}", f"{units}/{SSH_KEYS_UNIT}")


def _unleak_host_files(tree: ImageTree) -> None:
    """debootstrap copies the build host's hostname and resolv.conf; hosts may be missing."""
    if _read_or_empty(tree, "/etc/hostname").strip() in ("", socket.gethostname()):
        tree.write_text("/etc/hostname", "localhost\n")
    hosts = _read_or_empty(tree, "/etc/hosts")
    if not hosts or hosts == _host_file("/etc/hosts"):
        tree.write_text("/etc/hosts", DEFAULT_HOSTS)
    if not tree.is_symlink("/etc/resolv.conf") and tree.is_file("/etc/resolv.conf") and (
            _read_or_empty(tree, "/etc/resolv.conf") == _host_file("/etc/resolv.conf")):
        tree.write_text("/etc/resolv.conf", "")


def _read_or_empty(tree: ImageTree, path: str) -> str:
    """An image file's text, '' when it is missing or not a regular file."""
    try:
        return tree.read_text(path, limit=1024**2)
    except (OSError, InvalidImage):
        return ""


def _host_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _is_regular(tree: ImageTree, path: str) -> bool:
    found = tree.lstat(path)
    return found is not None and stat.S_ISREG(found.st_mode)


@contextlib.contextmanager
def _no_daemons(tree: ImageTree) -> Iterator[None]:
    """``policy-rc.d`` refusing every start for the block; the image's own put back after."""
    path = "/usr/sbin/policy-rc.d"
    original: bytes | None = None
    mode = 0o755
    found = tree.lstat(path)
    if found is not None and stat.S_ISREG(found.st_mode):
        original = tree.read_bytes(path)
        mode = stat.S_IMODE(found.st_mode)
        if original == POLICY_RC_D:
            original = None  # left by an interrupted build of ours
    tree.write_bytes(path, POLICY_RC_D, mode=0o755)
    try:
        yield
    finally:
        if original is None:
            tree.unlink(path)
        else:
            tree.write_bytes(path, original, mode=mode)


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
