"""Debian: bootstrap with debootstrap from the mirror apt is configured with,
then make the tree bootable, install packages and clean it inside a `Chroot`.

debootstrap runs through `run_tool` (argv list, wall-clock timeout that kills
its whole process group). Downloaded .debs stay in ``cache_dir``
(``--cache-dir``, which must be absolute) so later bootstraps of the same
release download nothing. debootstrap mounts /proc and /sys inside the target
for its second stage and unmounts them itself on a normal exit; when it is
killed (timeout) or fails, `unmount_under` undoes whatever it left.

The package list is read from ``var/lib/dpkg/status`` directly, without
entering the chroot.

Packages: ``apt-get install --no-install-recommends`` inside the chroot, after
``apt-cache policy`` has confirmed every name (an unknown name is one
`InvalidRequest` line naming it, before anything is installed). Package lists
are refreshed only when missing or when they turn out stale (a name unknown,
a download answered 404).

Booting: Debian's cloud kernel (virtio built in, small), initramfs-tools,
systemd with systemd-networkd doing DHCP on every ``en*``/``eth*`` interface
(no MAC address pinned, so a copy boots on any VM), systemd-resolved for DNS
and EXTLINUX as the bootloader (see `rain.build.disk`).

`clean` removes what must not be shared by every VM started from an image
(machine-id, SSH host keys, the build host's name and DNS servers) and locks
root's password. It keeps apt's package lists by default: later builds on top
of the image (the base-image cache) then install without downloading the
~50 MB of indexes again, at the price of that much in the image; they are
refreshed automatically once stale. `keep_apt_lists=False` drops them.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rain.build.boot import install_boot_marker
from rain.build.distros import unmount_under
from rain.build.mirror import debian_mirror
from rain.formats.tool import ToolExitError, run_tool
from rain.model.errors import InvalidRequest, ToolFailed

if TYPE_CHECKING:
    from rain.build.chroot import Chroot

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

    # -- inside a Chroot ---------------------------------------------------

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

    def install(self, chroot: Chroot, packages: Sequence[str]) -> None:
        """Install `packages` (NAME or NAME=VERSION) and their dependencies, not recommends.

        Raises `InvalidRequest` naming every package apt does not know, before
        installing anything.
        """
        specs = [_check_spec(p) for p in packages]
        if not specs:
            return
        updated = False
        if not _has_package_lists(chroot.root):
            self._update(chroot)
            updated = True
        missing = _unavailable(chroot, specs)
        if missing and not updated:
            self._update(chroot)  # stale lists may predate the package
            updated = True
            missing = _unavailable(chroot, specs)
        if missing:
            raise InvalidRequest(_unknown_message(missing))
        argv = ["apt-get", *_APT_OPTIONS, "install", "-y", "--no-install-recommends"]
        argv += [f"{name}={version}" if version else name for name, version in specs]
        with chroot.apt_cache_lock():
            try:
                chroot.run(argv, env=APT_ENV, timeout=INSTALL_TIMEOUT)
            except ToolExitError as exc:
                if updated or not _looks_stale(exc.stderr):
                    raise
                self._update(chroot)
                chroot.run(argv, env=APT_ENV, timeout=INSTALL_TIMEOUT)

    def configure_boot(self, chroot: Chroot) -> None:
        """Network by DHCP (systemd-networkd + resolved) and the boot-test marker unit.

        Run after `install(chroot, boot_packages(...))`.
        """
        network = chroot.path(DHCP_NETWORK_FILE)
        network.parent.mkdir(parents=True, exist_ok=True)
        network.write_text(DHCP_NETWORK)
        self.enable_services(chroot, ["systemd-networkd", "systemd-resolved"], [])
        resolv = chroot.path("/etc/resolv.conf")
        if not resolv.is_symlink():
            # Where resolved ships inside systemd (bullseye), nothing links it.
            resolv.unlink(missing_ok=True)
            resolv.symlink_to("../run/systemd/resolve/stub-resolv.conf")
        install_boot_marker(chroot.root)

    def enable_services(
        self, chroot: Chroot, enable: Sequence[str], disable: Sequence[str]
    ) -> None:
        """``systemctl enable``/``disable`` in the image; an unknown unit is an `InvalidRequest`."""
        enable = [_unit_name(u) for u in enable]
        disable = [_unit_name(u) for u in disable]
        if not enable and not disable:
            return
        listing = chroot.run(
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
            chroot.run(["systemctl", "--root=/", "enable", *enable])
        if disable:
            chroot.run(["systemctl", "--root=/", "disable", *disable])

    def clean(self, chroot: Chroot, *, keep_apt_lists: bool = True) -> None:
        """Remove per-machine identity and build leftovers; lock root's password.

        Run last in a build (after files and commands): machine-id emptied
        (systemd makes a new one at first boot), SSH host keys removed (a unit
        regenerates them at first boot when sshd is installed), the build
        host's hostname, hosts and DNS servers that debootstrap copied in
        replaced, downloaded .debs and /tmp removed, apt lists kept unless
        `keep_apt_lists` is false.
        """
        root = chroot.root
        machine_id = chroot.path("/etc/machine-id")
        if machine_id.exists() or machine_id.is_symlink():
            machine_id.unlink()
            machine_id.write_bytes(b"")
            machine_id.chmod(0o444)
        chroot.path("/var/lib/dbus/machine-id").unlink(missing_ok=True)
        ssh = chroot.path("/etc/ssh")
        for key in ssh.glob("ssh_host_*"):
            key.unlink()
        if chroot.path("/usr/sbin/sshd").exists():
            _install_ssh_keys_unit(chroot)
        if chroot.path("/usr/bin/passwd").exists():
            chroot.run(["passwd", "--lock", "root"])
        _unleak_host_files(chroot)
        for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/archives/partial/*",
                        "var/cache/apt/*.bin"):
            for path in root.glob(pattern):
                if path.is_file() and not path.is_symlink():
                    path.unlink()
        if not keep_apt_lists:
            lists = chroot.path("/var/lib/apt/lists")
            for path in lists.glob("*"):
                if path.is_file() and path.name != "lock":
                    path.unlink()
        for tmp in ("/tmp", "/var/tmp"):
            _empty_dir(chroot.path(tmp))

    def _update(self, chroot: Chroot) -> None:
        chroot.run(["apt-get", *_APT_OPTIONS, "update"], env=APT_ENV, timeout=INSTALL_TIMEOUT)


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


def _check_spec(spec: str) -> tuple[str, str]:
    match = _PACKAGE_SPEC.match(spec)
    if not match:
        raise InvalidRequest(f"invalid package name {spec!r}")
    return match.group(1), match.group(2) or ""


def _has_package_lists(root: Path) -> bool:
    return any((Path(root) / "var" / "lib" / "apt" / "lists").glob("*_Packages*"))


def _unavailable(chroot: Chroot, specs: Sequence[tuple[str, str]]) -> list[str]:
    """Specs apt cannot install: unknown names, no candidate, or a version it lacks."""
    names = sorted({name for name, _ in specs})
    policy = _parse_policy(chroot.run(["apt-cache", "policy", *names], env=APT_ENV))
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


def _looks_stale(stderr: str) -> bool:
    return any(s in stderr for s in ("404", "Unable to fetch some archives", "Failed to fetch"))


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


def _install_ssh_keys_unit(chroot: Chroot) -> None:
    units = chroot.path("/etc/systemd/system")
    units.mkdir(parents=True, exist_ok=True)
    (units / SSH_KEYS_UNIT).write_text(_SSH_KEYS_UNIT_TEXT)
    for target in ("multi-user.target", "ssh.service"):
        wants = units / f"{target}.wants"
        wants.mkdir(exist_ok=True)
        link = wants / SSH_KEYS_UNIT
        link.unlink(missing_ok=True)
        link.symlink_to(f"/etc/systemd/system/{SSH_KEYS_UNIT}")


def _unleak_host_files(chroot: Chroot) -> None:
    """debootstrap copies the build host's hostname and resolv.conf; hosts may be missing."""
    hostname = chroot.path("/etc/hostname")
    if not hostname.exists() or hostname.read_text().strip() in ("", socket.gethostname()):
        hostname.write_text("localhost\n")
    hosts = chroot.path("/etc/hosts")
    host_hosts = _read_or_empty(Path("/etc/hosts"))
    if not hosts.exists() or hosts.read_text() == host_hosts:
        hosts.write_text(DEFAULT_HOSTS)
    resolv = chroot.path("/etc/resolv.conf")
    host_resolv = _read_or_empty(Path("/etc/resolv.conf"))
    if not resolv.is_symlink() and resolv.is_file() and resolv.read_text() == host_resolv:
        resolv.write_text("")


def _read_or_empty(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _empty_dir(path: Path) -> None:
    if not path.is_dir() or path.is_symlink():
        return
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


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
