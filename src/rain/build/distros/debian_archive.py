"""Debian package indexes and .debs, fetched by rain itself and verified, for offline installs.

Packages are installed inside `rain.sandbox`, which has no network. So rain,
on the host, downloads what apt inside will need, from the mirror the
server is configured with (`rain.build.mirror`), and checks every byte:

1. ``dists/RELEASE/InRelease`` must carry a good signature from the host's
   Debian archive keyring (``gpgv``; `[build] keyring`), name the release
   asked for and not be past its ``Valid-Until``. Only gpgv's verified output
   is parsed.
2. ``main/binary-ARCH/Packages.xz`` (by hash when the archive offers it)
   must match the SHA-256 and size that verified InRelease lists, and so
   must what it decompresses to (bounded by that size).
3. Each ``.deb`` must match the SHA-256 and size in that Packages file, and
   its ``Filename`` must be a plain ``pool/...`` path.

Everything lands in the shared cache (``DATA_DIR/cache/apt``) only after it
is verified (written to a temporary name, renamed), so the cache holds
nothing a build could have chosen or changed, and sandboxes see it only
read-only (`view`): no cache poisoning between users' builds.

What to download is decided by apt inside the sandbox (``apt-get -s
install``, whose ``Inst`` lines are parsed): the image's apt is untrusted,
so its answer is only a request, looked up in the verified index; it can
name nothing that is not in the archive, and the total is capped
(`max_download_bytes`). The image's apt never runs with network, and its
configuration (hooks in ``apt.conf.d``) only ever runs inside the sandbox.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import lzma
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rain.build.phases import LogFn
from rain.formats.tool import ToolExitError, run_tool
from rain.model.errors import InvalidRequest, ToolFailed

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
COMPONENT = "main"  # what debootstrap puts in an image's sources.list
INDEX_MAX_AGE = 6 * 3600.0  # seconds before a cached InRelease is fetched again
DOWNLOAD_TIMEOUT = 120.0
MAX_INDEX_BYTES = 512 * 1024**2
VIEW_TARGET = "/run/rain-apt"
_FILENAME = re.compile(r"pool/[A-Za-z0-9][A-Za-z0-9.+~_/-]*\.u?deb\Z")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_INST = re.compile(r"^Inst (\S+) (?:\[\S+\] )?\((\S+) .*\[([a-z0-9-]+)\]\)", re.MULTILINE)


@dataclass(frozen=True)
class PackageFile:
    """One .deb as the verified index describes it."""

    name: str
    version: str
    arch: str
    filename: str
    size: int
    sha256: str


@dataclass
class ArchiveIndex:
    """The verified InRelease and Packages of one release and architecture, in the cache."""

    release: str
    arch: str
    in_release: Path
    packages: Path
    packages_sha256: str
    files: dict[tuple[str, str, str], PackageFile]


class DebianArchive:
    """The mirror seen through verified downloads kept in `cache` (see the module doc)."""

    def __init__(self, mirror: str, cache: Path, *, keyring: str = KEYRING,
                 max_download_bytes: int = 4 * 1024**3) -> None:
        self.mirror = mirror.rstrip("/")
        self.cache = Path(cache).absolute()
        self.keyring = keyring
        self.max_download_bytes = max_download_bytes
        key = hashlib.sha256(self.mirror.encode()).hexdigest()[:16]
        self._dists = self.cache / "dists" / key
        self._pool = self.cache / "pool" / key
        self._lock = threading.Lock()
        self._parsed: dict[tuple[str, str], tuple[str, ArchiveIndex]] = {}

    # -- indexes ----------------------------------------------------------

    def index(self, release: str, arch: str, *, refresh: bool = False,
              log: LogFn | None = None) -> ArchiveIndex:
        """The release's verified index, fetched when missing, old, or `refresh` is asked."""
        with self._lock:
            folder = self._dists / release / arch
            in_release = folder / "InRelease"
            stale = (not in_release.is_file()
                     or time.time() - in_release.stat().st_mtime > INDEX_MAX_AGE)
            if refresh or stale:
                self._fetch_index(release, arch, folder, log)
            signed = self._verify(in_release)
            entry = _release_entry(signed, release, f"{COMPONENT}/binary-{arch}/Packages")
            cached = self._parsed.get((release, arch))
            if cached is not None and cached[0] == entry[0]:
                return cached[1]
            packages = folder / "Packages"
            if (not packages.is_file() or not (folder / "Packages.xz").is_file()
                    or _sha256_of(packages) != entry[0]):
                self._fetch_index(release, arch, folder, log)
                signed = self._verify(in_release)
                entry = _release_entry(signed, release, f"{COMPONENT}/binary-{arch}/Packages")
            index = ArchiveIndex(release, arch, in_release, packages, entry[0],
                                 _parse_packages(packages))
            self._parsed[(release, arch)] = (entry[0], index)
            return index

    def _fetch_index(self, release: str, arch: str, folder: Path, log: LogFn | None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        base = f"{self.mirror}/dists/{release}"
        if log is not None:
            log(f"package index: {base}/InRelease (verified with {self.keyring})")
        in_release = _download(f"{base}/InRelease", folder, max_bytes=16 * 1024**2)
        packed: Path | None = None
        try:
            signed = self._verify(in_release)
            target = f"{COMPONENT}/binary-{arch}/Packages"
            sha, size = _release_entry(signed, release, target)
            xz_sha, xz_size = _release_entry(signed, release, target + ".xz")
            if size > MAX_INDEX_BYTES:
                raise ToolFailed(f"the index {target} of {release} is larger than "
                                 f"{MAX_INDEX_BYTES >> 20} MiB", tool="apt")
            by_hash = "Acquire-By-Hash: yes" in signed
            url = (f"{base}/{COMPONENT}/binary-{arch}/by-hash/SHA256/{xz_sha}" if by_hash
                   else f"{base}/{target}.xz")
            # Mirrors publish the compressed index only; it is checked before it is
            # decompressed, and what comes out is checked again (size bounded first).
            packed = _download(url, folder, max_bytes=xz_size, sha256=xz_sha, size=xz_size)
            packages = _decompress(packed, folder, sha256=sha, size=size)
        except BaseException:
            in_release.unlink(missing_ok=True)
            if packed is not None:
                packed.unlink(missing_ok=True)
            raise
        # apt inside reads the .xz (it insists on the first type InRelease lists); rain
        # parses the decompressed copy.
        os.replace(packed, folder / "Packages.xz")
        os.replace(packages, folder / "Packages")
        os.replace(in_release, folder / "InRelease")

    def _verify(self, in_release: Path) -> str:
        """gpgv's verified text of InRelease (never the raw file)."""
        try:
            result = run_tool(["gpgv", "--quiet", "--keyring", self.keyring, "--output", "-",
                               str(in_release)], timeout=60)
        except ToolExitError as exc:
            raise ToolFailed(f"the mirror's InRelease has no good signature from "
                             f"{self.keyring}: {exc.message}", tool="gpgv") from None
        return result.stdout.decode("utf-8", "replace")

    # -- packages ---------------------------------------------------------

    def lookup(self, index: ArchiveIndex, simulated: str) -> list[PackageFile]:
        """The index entries for apt's ``Inst`` lines (`InvalidRequest` for anything else)."""
        wanted: list[PackageFile] = []
        for name, version, arch in _INST.findall(simulated):
            found = index.files.get((name, version, arch))
            if found is None:
                raise InvalidRequest(f"apt in the image wants {name} {version} ({arch}), "
                                     "which the mirror's index does not list")
            wanted.append(found)
        return wanted

    def fetch(self, files: Iterable[PackageFile], *, log: LogFn | None = None) -> list[Path]:
        """Download (once, verified) every file; their paths in the cache."""
        files = list(files)
        missing = [f for f in files if not self._cached(f)]
        total = sum(f.size for f in missing)
        if total > self.max_download_bytes:
            raise InvalidRequest(f"the packages need {total >> 20} MiB of downloads, more than "
                                 f"the limit of {self.max_download_bytes >> 20} MiB")
        if missing and log is not None:
            log(f"downloading {len(missing)} packages ({total / 1024**2:.1f} MiB) from "
                "the mirror on the host, each checked against the signed index")
        for f in missing:
            target = self._pool / f.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            got = _download(f"{self.mirror}/{f.filename}", target.parent, max_bytes=f.size,
                            sha256=f.sha256, size=f.size)
            os.replace(got, target)
        return [self._pool / f.filename for f in files]

    def _cached(self, f: PackageFile) -> bool:
        path = self._pool / f.filename
        try:
            return path.stat().st_size == f.size
        except FileNotFoundError:
            return False

    @contextlib.contextmanager
    def view(self, index: ArchiveIndex) -> Iterator[Path]:
        """A read-only ``file:`` repository for apt in the sandbox (bind it at `VIEW_TARGET`).

        Hard links into the cache (the same verified inodes, never copies a
        build could change); `add` puts downloaded .debs into its pool.
        """
        root = Path(tempfile.mkdtemp(prefix="view-", dir=self.cache))
        try:
            os.chmod(root, 0o755)
            dists = root / "repo" / "dists" / index.release
            binary = dists / COMPONENT / f"binary-{index.arch}"
            binary.mkdir(parents=True)
            _link(index.in_release, dists / "InRelease")
            _link(index.packages.with_name("Packages.xz"), binary / "Packages.xz")
            (root / "sources.list").write_text(
                f"deb [trusted=yes] file:{VIEW_TARGET}/repo {index.release} {COMPONENT}\n")
            _world_readable(root)
            yield root
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def add(self, view: Path, files: Iterable[PackageFile]) -> None:
        for f in files:
            target = view / "repo" / f.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                _link(self._pool / f.filename, target)
        _world_readable(view)


def apt_options() -> list[str]:
    """apt options that make it use the view (and nothing of the image's own sources)."""
    return ["-o", f"Dir::Etc::SourceList={VIEW_TARGET}/sources.list",
            "-o", "Dir::Etc::SourceParts=-",
            "-o", "Dir::State::Lists=/var/lib/rain-apt/lists",
            "-o", "Acquire::Languages=none",
            "-o", "Acquire::By-Hash=no"]


def _release_entry(signed: str, release: str, target: str) -> tuple[str, int]:
    """(sha256, size) of `target` in the verified Release text; checks release and validity."""
    fields = _fields(signed)
    names = {fields.get("codename", ""), fields.get("suite", "")}
    if release not in names:
        raise ToolFailed(f"the mirror's InRelease is for {sorted(names - {''})}, not {release}",
                         tool="apt")
    valid_until = fields.get("valid-until")
    if valid_until:
        try:
            expiry = email.utils.parsedate_to_datetime(valid_until)
        except (TypeError, ValueError):
            expiry = None
        if expiry is None or expiry < datetime.now(UTC):
            raise ToolFailed(f"the mirror's InRelease for {release} expired ({valid_until})",
                             tool="apt")
    in_sha256 = False
    for line in signed.splitlines():
        if not line.startswith(" "):
            in_sha256 = line.strip() == "SHA256:"
            continue
        parts = line.split()
        if in_sha256 and len(parts) == 3 and parts[2] == target and _HEX64.match(parts[0]):
            return parts[0], int(parts[1])
    raise ToolFailed(f"the mirror's InRelease for {release} lists no {target}", tool="apt")


def _fields(text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in text.splitlines():
        if line and not line[0].isspace() and ":" in line:
            key, _, value = line.partition(":")
            found.setdefault(key.strip().lower(), value.strip())
    return found


def _parse_packages(path: Path) -> dict[tuple[str, str, str], PackageFile]:
    files: dict[tuple[str, str, str], PackageFile] = {}
    stanza: dict[str, str] = {}

    def flush() -> None:
        name, version, arch = stanza.get("Package"), stanza.get("Version"), stanza.get(
            "Architecture")
        filename, size, sha = stanza.get("Filename", ""), stanza.get("Size", ""), stanza.get(
            "SHA256", "")
        if (name and version and arch and _FILENAME.match(filename) and ".." not in filename
                and size.isdigit() and _HEX64.match(sha)):
            files[(name, version, arch)] = PackageFile(name, version, arch, filename,
                                                       int(size), sha)

    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line == "\n":
                flush()
                stanza = {}
            elif line[0] not in " \t":
                key, _, value = line.partition(":")
                if key in ("Package", "Version", "Architecture", "Filename", "Size", "SHA256"):
                    stanza[key] = value.strip()
    flush()
    return files


def _download(url: str, folder: Path, *, max_bytes: int, sha256: str | None = None,
              size: int | None = None) -> Path:
    """`url` into a temporary file in `folder`, checked against `sha256`/`size` when given."""
    fd, name = tempfile.mkstemp(prefix=".part-", dir=folder)
    path = Path(name)
    digest = hashlib.sha256()
    got = 0
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(
                url, timeout=DOWNLOAD_TIMEOUT) as response:
            while chunk := response.read(1 << 20):
                got += len(chunk)
                if got > max_bytes:
                    raise ToolFailed(f"{url} is larger than expected ({max_bytes} bytes)",
                                     tool="download")
                digest.update(chunk)
                out.write(chunk)
        if size is not None and got != size:
            raise ToolFailed(f"{url}: {got} bytes, the signed index says {size}",
                             tool="download")
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ToolFailed(f"{url}: SHA-256 does not match the signed index",
                             tool="download")
        os.chmod(path, 0o644)
        return path
    except urllib.error.HTTPError as exc:
        path.unlink(missing_ok=True)
        raise ToolFailed(f"{url}: HTTP {exc.code} from the mirror", tool="download") from None
    except (urllib.error.URLError, OSError) as exc:
        path.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise ToolFailed(f"{url}: {reason}", tool="download") from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _decompress(packed: Path, folder: Path, *, sha256: str, size: int) -> Path:
    """The verified .xz `packed`, decompressed and checked against the uncompressed entry."""
    fd, name = tempfile.mkstemp(prefix=".part-", dir=folder)
    path = Path(name)
    digest = hashlib.sha256()
    got = 0
    try:
        with os.fdopen(fd, "wb") as out, lzma.open(packed) as source:
            while chunk := source.read(1 << 20):
                got += len(chunk)
                if got > size:
                    raise ToolFailed(f"{packed.name} decompresses to more than the signed "
                                     f"index says ({size} bytes)", tool="apt")
                digest.update(chunk)
                out.write(chunk)
        if got != size or digest.hexdigest() != sha256:
            raise ToolFailed("the decompressed package index does not match the signed "
                             "InRelease", tool="apt")
        os.chmod(path, 0o644)
        return path
    except lzma.LZMAError as exc:
        path.unlink(missing_ok=True)
        raise ToolFailed(f"the package index does not decompress: {exc}", tool="apt") from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _world_readable(root: Path) -> None:
    """The sandbox's root is not the host's: it reads the view through 'other' permissions."""
    for dirpath, dirnames, _filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)
