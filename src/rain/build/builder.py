"""The image builder: template → bootable qcow2 image in the repository.

`make_runner(repo, config)` is what the build queue (`rain.build.jobs`) runs.
A build walks the template's pedigree from its root:

1. **base** — the root starts from a distribution (`debian/bookworm`): the
   matching *base image* (bootstrapped, kernel, EXTLINUX, DHCP, boot marker;
   `is_base`, public) is found in the repository by its base digest, or made
   once (phase `bootstrap`) and stored there. Or the root starts from an
   image (`image:NAME`): that image is the base.
2. **restore** — the base's content becomes a local raw disk. Raw copies of
   base images are kept in ``DATA_DIR/cache/disks`` (sparse, copied with
   reflinks where the filesystem can), so later builds skip the export.
3. every template of the chain in turn (each parent template becomes an image
   of its own, so the pedigree is a chain of `parent` links and a later build
   of a sibling template starts from it — a *template hit* on the parent):
   **install** (grow the disk, packages, files, services, `run:` lines,
   clean-up, every command in a `rain.sandbox.Sandbox`: an unprivileged
   user namespace with no network, its own /proc and /dev, and limits;
   files written through its symlink-safe `ImageTree`), **compress** (raw →
   qcow2), **boot-test** (QEMU, no network, the boot marker on ttyS0 within
   the time limit; a failed boot fails the build and its console log goes to
   the build log), **upload**.

Every phase is timed and reported (`BuildProgress.timing`): that is the
breakdown of the FutureGrid paper's figures 6 and 7. Package downloads are
made on the host, verified against the signed index, cached in
``DATA_DIR/cache/apt`` (sandboxes see them read-only) and debootstrap's in
``DATA_DIR/cache/debootstrap``, shared by all builds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

from rain.build.boot import ACCEL_SETTINGS, AccelSetting, boot_test
from rain.build.disk import copy_disk, make_disk, open_disk
from rain.build.distros import DistroInstaller, unmount_under
from rain.build.distros.debian import DebianInstaller, installed_packages
from rain.build.jobs import BuildProgress
from rain.build.request import BuildRequest, chain_digests, resolve_digest
from rain.build.template import BaseRef, Template
from rain.formats.inspect import convert_file
from rain.model import DiskFormat, Image, ImageStatus, InvalidRequest, RainError, User, Visibility
from rain.model.errors import Unsupported
from rain.repo import Repository
from rain.repo.builds import BuilderRepository
from rain.sandbox import Sandbox, SandboxConfig

if TYPE_CHECKING:
    from rain.config import Config

# Bump when what a base image contains changes: a new digest makes new bases.
BASE_RECIPE = 1
BASE_SIZE = 2 * 1024**3
CONSOLE_LINES = 40  # of a failed boot, copied into the build log


class BuildFailed(RainError):
    status = 500
    code = "build_failed"


def make_runner(repo: Repository, config: Config) -> ImageBuilder:
    """The build queue's runner (`[build] runner`); Unsupported when this host cannot build."""
    if config.build.accel not in ACCEL_SETTINGS:
        raise InvalidRequest(f"[build] accel = {config.build.accel!r}: use "
                             f"{', '.join(ACCEL_SETTINGS)}")
    for tool in ("debootstrap", "mke2fs", "sfdisk", "losetup", "qemu-img", "extlinux", "gpgv"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            raise Unsupported(f"image builds need {tool}, which is not installed")
    b = config.build
    return ImageBuilder(repo, Path(config.data_dir), boot_test=b.boot_test,
                        boot_timeout=b.boot_timeout, sandbox=config.sandbox,
                        keyring=b.keyring, max_download_bytes=b.max_download_bytes,
                        accel=cast(AccelSetting, b.accel))


class ImageBuilder:
    """`BuildRunner` for Debian templates (one installer per distribution)."""

    def __init__(self, repo: BuilderRepository, data_dir: Path, *, boot_test: bool = True,
                 boot_timeout: float = 180.0, sandbox: SandboxConfig | None = None,
                 keyring: str | None = None, max_download_bytes: int = 4 * 1024**3,
                 accel: AccelSetting = "auto") -> None:
        self.repo = repo
        self.boot_test = boot_test
        self.boot_timeout = boot_timeout
        self.accel: AccelSetting = accel
        self.sandbox = sandbox or SandboxConfig()
        cache = Path(data_dir).absolute() / "cache"
        self.apt_cache = cache / "apt"
        self.installers: dict[str, DistroInstaller] = {"debian": DebianInstaller(
            cache=self.apt_cache, keyring=keyring, max_download_bytes=max_download_bytes)}
        self.debootstrap_cache = cache / "debootstrap"
        self.disk_cache = cache / "disks"
        self.work = Path(data_dir).absolute() / "tmp" / "builds"
        for d in (self.apt_cache, self.debootstrap_cache, self.disk_cache, self.work):
            d.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # -- BuildRunner -------------------------------------------------------------
    def resolve(self, viewer: User, request: BuildRequest) -> str:
        root = request.root
        if root.base.kind == "distro":
            self._installer(root.base.distro)
        return resolve_digest(request, lambda base: self.repo.get(viewer, base.image).id)

    def run(self, viewer: User, request: BuildRequest, progress: BuildProgress, *,
            rebuild_of: str | None) -> str:
        chain = [*reversed(request.parents), request.template]  # root first
        root = chain[0]
        with tempfile.TemporaryDirectory(dir=self.work, prefix="build-") as tmp:
            work = Path(tmp)
            if rebuild_of is not None:
                # The same template on the same parent as the first time (the digest
                # is the image's; nothing is resolved again).
                on = self.repo.rebuild_base(viewer, rebuild_of)
                return self._build_one(viewer, request.template, on, request.digest,
                                       progress, work, rebuild_of=rebuild_of,
                                       parents=request.parent_texts).id
            if root.base.kind == "distro":
                current = self._base(viewer, root, progress, work)
                resolved = ""
            else:
                current = self.repo.get(viewer, root.base.image)
                resolved = current.id
            digests = chain_digests(request, resolved)
            for i, template in enumerate(chain[:-1]):
                hit = self.repo.image_with_template(viewer, digests[i])
                if hit is not None:
                    progress.log(f"parent template {template.name}: image {hit.id} "
                                 "(template hit)")
                    current = hit
                    continue
                current = self._build_one(viewer, template, current, digests[i], progress,
                                          work, rebuild_of=None,
                                          parents=[t.text for t in reversed(chain[:i])])
            return self._build_one(viewer, request.template, current, digests[-1], progress,
                                   work, rebuild_of=None, parents=request.parent_texts).id

    # -- one template on top of an image ------------------------------------------
    def _build_one(self, viewer: User, template: Template, base: Image, digest: str,
                   progress: BuildProgress, work: Path, *, rebuild_of: str | None,
                   parents: list[str]) -> Image:
        distro, release = base.os_distro or "", base.os_release or ""
        installer = self._installer(distro)
        raw = work / f"{template.name}.raw"
        progress.log(f"building {template.name} on image {base.id} ({base.name}"
                     f"{':' + base.version if base.version else ''})")
        with self._phase(progress, "restore"):
            self._restore(viewer, base, raw, progress)
        size = max(template.size, raw.stat().st_size)
        with (self._phase(progress, "install"),
              open_disk(raw, grow_to=size, log=progress.log) as root,
              Sandbox(root, config=self.sandbox, log=progress.log,
                      cancel=progress.cancelled) as sandbox):
            try:
                installer.install(sandbox, list(template.packages), release=release,
                                  arch=template.arch)
            except InvalidRequest as exc:
                raise InvalidRequest(_at_line(template, exc.message)) from None
            for path, content in template.files:
                # A regular file at that path inside the image (a symlink there is replaced).
                sandbox.tree.write_text(path, content)
            installer.enable_services(sandbox, list(template.services_enable),
                                      list(template.services_disable))
            for line in template.run:
                progress.log(f"run: {line}")
                sandbox.shell(line)
            installer.clean(sandbox)
            packages = installed_packages(sandbox.tree)
        qcow2, boot = self._finish_disk(raw, progress, work)
        with self._phase(progress, "upload"):
            if rebuild_of is not None:
                return self.repo.restore_file(
                    viewer, rebuild_of, qcow2, DiskFormat.QCOW2,
                    properties={"rain.boot_seconds": f"{boot:.1f}"} if boot else None,
                    drop=() if boot else ("rain.boot_seconds",))  # not boot-tested now
            image = self.repo.create(viewer, {
                "name": template.name, "version": template.version or None,
                "description": template.description or None,
                "os_distro": distro, "os_release": release, "arch": template.arch,
                "parent": base.id, "packages": packages, "disk_format": "qcow2",
                "properties": {"rain.boot_seconds": f"{boot:.1f}"} if boot else {},
            }, internal=True)
            image = self.repo.upload_file(viewer, image.id, qcow2, DiskFormat.QCOW2)
            return self.repo.record_template(viewer, image.id, digest, text=template.text,
                                             parents=parents)

    def _finish_disk(self, raw: Path, progress: BuildProgress,
                     work: Path) -> tuple[Path, float | None]:
        """raw → qcow2, then the boot test (unless off): (qcow2 path, boot seconds)."""
        qcow2 = raw.with_suffix(".qcow2")
        with self._phase(progress, "compress"):
            convert_file(raw, DiskFormat.RAW, qcow2, DiskFormat.QCOW2)
        raw.unlink()
        if not self.boot_test:
            return qcow2, None
        with self._phase(progress, "boot-test"):
            result = boot_test(qcow2, fmt="qcow2", timeout=self.boot_timeout,
                               log_path=work / "console.log", accel=self.accel,
                               log=progress.log, cancel=progress.cancelled)
        if not result.ok:
            for line in result.console_log.splitlines()[-CONSOLE_LINES:]:
                progress.log(f"console: {line}")
            raise BuildFailed(f"boot test failed after {result.seconds:.0f} s "
                              f"({result.accel}): {result.reason}")
        progress.timing("boot", result.seconds)
        return qcow2, result.seconds

    # -- base images ---------------------------------------------------------------
    def _base(self, viewer: User, root: Template, progress: BuildProgress,
              work: Path) -> Image:
        """The base image for the root template's distro/release/arch; made once."""
        ref = root.base
        digest = base_digest(ref, root.arch)
        with self._lock(digest):
            found = self.repo.image_with_template(viewer, digest)
            if found is not None:
                progress.log(f"base image {found.id} ({found.name}) for {ref}/{root.arch}")
                return found
            progress.log(f"no base image for {ref}/{root.arch} yet: bootstrapping one")
            installer = self._installer(ref.distro)
            tree = work / "bootstrap"
            raw = work / "base.raw"
            try:
                with self._phase(progress, "bootstrap"):
                    progress.log(f"{installer.name}: bootstrapping {ref.release} {root.arch} "
                                 "(minbase) from the mirror apt is configured with")
                    installer.bootstrap(tree, ref.release, root.arch,
                                        cache_dir=self.debootstrap_cache)
                    with Sandbox(tree, config=self.sandbox, log=progress.log,
                                 cancel=progress.cancelled) as sandbox:
                        installer.install(sandbox, installer.boot_packages(
                            root.arch, release=ref.release), release=ref.release,
                            arch=root.arch)
                        installer.configure_boot(sandbox)
                        installer.clean(sandbox)
                    packages = installer.installed_packages(tree)
                with self._phase(progress, "disk"):
                    make_disk(tree, raw, BASE_SIZE, log=progress.log)
            finally:
                unmount_under(tree)
                shutil.rmtree(tree, ignore_errors=True)
            copy_disk(raw, self.disk_cache / f"{digest}.raw")  # the next build's starting point
            qcow2, boot = self._finish_disk(raw, progress, work)
            with self._phase(progress, "upload"):
                image = self.repo.create(viewer, {
                    "name": f"{ref.distro}-{ref.release}-{root.arch}-base",
                    "version": time.strftime("%Y%m%d%H%M%S"),
                    "description": f"rain base image: {ref.distro} {ref.release} {root.arch}, "
                                   "minimal, bootable",
                    "os_distro": ref.distro, "os_release": ref.release, "arch": root.arch,
                    "packages": packages, "base": True, "visibility": str(Visibility.PUBLIC),
                    "disk_format": "qcow2",
                    "properties": {"rain.boot_seconds": f"{boot:.1f}"} if boot else {},
                }, internal=True)
                image = self.repo.upload_file(viewer, image.id, qcow2, DiskFormat.QCOW2)
                image = self.repo.record_template(viewer, image.id, digest)
            (self.disk_cache / f"{digest}.raw").rename(self.disk_cache / f"{image.id}.raw")
            (self.disk_cache / f"{image.id}.sha256").write_text(image.sha256 or "")
            return image

    def _restore(self, viewer: User, image: Image, raw: Path, progress: BuildProgress) -> None:
        """`image` as a raw disk at `raw`: from the local cache, else exported once."""
        cached = self.disk_cache / f"{image.id}.raw"
        sha = self.disk_cache / f"{image.id}.sha256"
        if not (cached.is_file() and sha.is_file() and sha.read_text() == image.sha256):
            progress.log(f"exporting image {image.id} to the local disk cache")
            if image.status != ImageStatus.ACTIVE:
                raise InvalidRequest(f"image {image.id} is {image.status}: it cannot be a base")
            d = self.repo.open_download(viewer, image.id)
            with tempfile.TemporaryDirectory(dir=self.disk_cache) as tmp:
                exported = Path(tmp) / f"image.{d.disk_format}"
                d.save(exported)
                if d.disk_format == DiskFormat.RAW:
                    exported.rename(cached)
                else:
                    convert_file(exported, d.disk_format, cached, DiskFormat.RAW)
            sha.write_text(image.sha256 or "")
        copy_disk(cached, raw, log=progress.log)

    # -- helpers -----------------------------------------------------------------
    def _installer(self, distro: str) -> DistroInstaller:
        installer = self.installers.get(distro)
        if installer is None:
            raise InvalidRequest(f"building {distro!r} images is not supported yet "
                                 f"(supported: {', '.join(sorted(self.installers))})")
        return installer

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    @contextlib.contextmanager
    def _phase(self, progress: BuildProgress, name: str) -> Iterator[None]:
        progress.phase(name)
        started = time.monotonic()
        try:
            yield
        finally:
            progress.timing(name, time.monotonic() - started)


def _at_line(template: Template, message: str) -> str:
    """Prefix an unknown-package message with the template line that names the package."""
    for package in template.packages:
        if repr(package) not in message and repr(package.split("=")[0]) not in message:
            continue
        pattern = re.compile(rf"(?<![\w.+-]){re.escape(package)}(?![\w.+-])")
        for number, line in enumerate(template.text.splitlines(), 1):
            if pattern.search(line):
                return f"template {template.name} line {number}: {message}"
    return f"template {template.name}: {message}"


def base_digest(ref: BaseRef, arch: str) -> str:
    """What identifies a base image: distribution, release, architecture and recipe."""
    text = json.dumps({"rain-base": BASE_RECIPE, "distro": ref.distro, "release": ref.release,
                       "arch": arch, "variant": "minbase"}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
