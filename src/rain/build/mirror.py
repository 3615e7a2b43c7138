"""Find the Debian mirror that apt on this machine is configured with.

Builds fetch packages from the same mirror the host already uses (a local
proxy or a nearby mirror), so rain never hard-codes a host name. Both source
formats are read:

- deb822 stanzas in ``sources.list.d/*.sources`` (``Types:``, ``URIs:``,
  ``Suites:``, optional ``Enabled: no``);
- one-line entries in ``sources.list`` and ``sources.list.d/*.list``
  (``deb [options] URI suite components...``).

The first ``deb`` entry whose suite is a Debian release (not a security or
third-party suite) wins. ``RAIN_DEBIAN_MIRROR`` overrides the lookup.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rain.model.errors import InvalidRequest

MIRROR_ENV = "RAIN_DEBIAN_MIRROR"

# Suite names (before any "-updates"/"-backports" suffix) that identify the
# main Debian archive rather than a third-party repository on the same machine.
DEBIAN_SUITES: frozenset[str] = frozenset(
    {
        "buster",
        "bullseye",
        "bookworm",
        "trixie",
        "forky",
        "duke",
        "sid",
        "experimental",
        "stable",
        "testing",
        "unstable",
        "oldstable",
        "oldoldstable",
    }
)


@dataclass(frozen=True)
class AptSource:
    """One ``deb`` source: where it is and which suites it serves."""

    uri: str
    suites: tuple[str, ...]
    origin: Path


def debian_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The main Debian archive URI apt uses (no trailing slash).

    Raises `InvalidRequest` when no such source is configured and
    ``RAIN_DEBIAN_MIRROR`` is not set.
    """
    override = os.environ.get(MIRROR_ENV, "").strip()
    if override:
        return override.rstrip("/")
    for source in apt_sources(sources_dir):
        if is_main_archive(source):
            return source.uri.rstrip("/")
    raise InvalidRequest(
        f"no Debian mirror found in {sources_dir}/sources.list(.d); "
        f"configure apt or set {MIRROR_ENV}"
    )


def is_main_archive(source: AptSource) -> bool:
    """True for the Debian archive itself: not security, not a third-party repository."""
    if "debian-security" in source.uri:
        return False
    for suite in source.suites:
        base, _, suffix = suite.partition("-")
        if suffix == "security" or "/" in suite:
            continue
        if base in DEBIAN_SUITES:
            return True
    return False


def apt_sources(sources_dir: Path) -> Iterator[AptSource]:
    """Every enabled ``deb`` source, in the order apt reads them."""
    classic = sources_dir / "sources.list"
    if classic.is_file():
        yield from _parse_one_line(classic)
    parts = sources_dir / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if not path.is_file():
                continue
            if path.suffix == ".list":
                yield from _parse_one_line(path)
            elif path.suffix == ".sources":
                yield from _parse_deb822(path)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _parse_one_line(path: Path) -> Iterator[AptSource]:
    for raw in _read(path).splitlines():
        line = raw.split("#", 1)[0].strip()
        words = line.split()
        if not words or words[0] != "deb":
            continue
        rest = words[1:]
        if rest and rest[0].startswith("["):
            # Options: "[arch=amd64 signed-by=...]" may span several words.
            while rest and not rest[0].endswith("]"):
                rest = rest[1:]
            rest = rest[1:]
        if len(rest) >= 2:
            yield AptSource(uri=rest[0], suites=(rest[1],), origin=path)


def _parse_deb822(path: Path) -> Iterator[AptSource]:
    for stanza in _deb822_stanzas(_read(path)):
        if "deb" not in stanza.get("types", "").split():
            continue
        if stanza.get("enabled", "yes").strip().lower() == "no":
            continue
        suites = tuple(stanza.get("suites", "").split())
        for uri in stanza.get("uris", "").split():
            yield AptSource(uri=uri, suites=suites, origin=path)


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    """Stanzas as {lower-case field: value}; continuation lines are joined."""
    fields: dict[str, str] = {}
    last: str | None = None
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if fields:
                yield fields
            fields, last = {}, None
            continue
        if raw[0] in " \t":
            if last is not None:
                fields[last] += " " + raw.strip()
            continue
        name, sep, value = raw.partition(":")
        if not sep:
            continue
        last = name.strip().lower()
        fields[last] = value.strip()
    if fields:
        yield fields
