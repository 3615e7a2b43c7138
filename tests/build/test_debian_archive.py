"""Host-side package downloads: only what the signed index vouches for reaches the cache.

The integration tests put a tampering proxy on loopback in front of the real
mirror (the one apt on this machine uses): genuine bytes pass, and each kind
of tampering (the InRelease, the package index, a .deb, a replayed other
release) is refused before anything is cached.
"""

from __future__ import annotations

import http.server
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rain.build.distros.debian_archive import (
    DebianArchive,
    PackageFile,
    _parse_packages,
    _release_entry,
)
from rain.build.mirror import debian_mirror
from rain.model.errors import InvalidRequest, ToolFailed

SHA = "a" * 64
RELEASE = f"""\
Origin: Debian
Suite: oldstable
Codename: bookworm
Date: Sat, 11 Jul 2026 10:16:37 UTC
SHA256:
 {SHA} 50060337 main/binary-amd64/Packages
 {"b" * 64}  8790396 main/binary-amd64/Packages.xz
"""


def test_release_entries_name_the_release_and_check_expiry() -> None:
    assert _release_entry(RELEASE, "bookworm", "main/binary-amd64/Packages") == (SHA, 50060337)
    assert _release_entry(RELEASE, "oldstable", "main/binary-amd64/Packages")[0] == SHA
    with pytest.raises(ToolFailed, match="not trixie"):
        _release_entry(RELEASE, "trixie", "main/binary-amd64/Packages")
    with pytest.raises(ToolFailed, match="lists no main/binary-arm64/Packages"):
        _release_entry(RELEASE, "bookworm", "main/binary-arm64/Packages")
    expired = RELEASE.replace("SHA256:", "Valid-Until: Sat, 01 Jan 2000 00:00:00 UTC\nSHA256:")
    with pytest.raises(ToolFailed, match="expired"):
        _release_entry(expired, "bookworm", "main/binary-amd64/Packages")


def test_index_entries_with_odd_filenames_are_dropped(tmp_path: Path) -> None:
    stanza = "Package: {n}\nVersion: 1\nArchitecture: amd64\nFilename: {f}\nSize: 3\nSHA256: {s}\n"
    (tmp_path / "Packages").write_text("\n".join([
        stanza.format(n="good", f="pool/main/g/good/good_1_amd64.deb", s=SHA),
        stanza.format(n="up", f="pool/../../etc/passwd.deb", s=SHA),
        stanza.format(n="abs", f="/etc/shadow.deb", s=SHA),
        stanza.format(n="badsha", f="pool/main/b/b_1_amd64.deb", s="xyz"),
    ]))
    assert list(_parse_packages(tmp_path / "Packages")) == [("good", "1", "amd64")]


class _Proxy:
    """A loopback HTTP proxy to the real mirror that can change what it passes on."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.tamper: Callable[[str, bytes], bytes] = lambda path, body: body
        self.rewrite: Callable[[str], str] = lambda path: path
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = proxy.rewrite(self.path.removeprefix("/debian"))
                try:
                    with urllib.request.urlopen(proxy.upstream + path, timeout=60) as r:
                        body = r.read()
                except urllib.error.HTTPError as exc:
                    self.send_error(exc.code)
                    return
                body = proxy.tamper(path, body)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/debian"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def proxy() -> Iterator[_Proxy]:
    try:
        upstream = debian_mirror()
        urllib.request.urlopen(upstream + "/dists/bookworm/InRelease", timeout=20).close()
    except Exception as exc:
        pytest.skip(f"the Debian mirror is not reachable: {exc}")
    p = _Proxy(upstream)
    yield p
    p.server.shutdown()


@pytest.fixture(autouse=False)
def fresh(proxy: _Proxy) -> Iterator[_Proxy]:
    yield proxy
    proxy.tamper = lambda path, body: body
    proxy.rewrite = lambda path: path


def _flip(body: bytes, at: int) -> bytes:
    return body[:at] + bytes([body[at] ^ 1]) + body[at + 1:]


@pytest.mark.integration
def test_genuine_packages_are_fetched_and_cached(fresh: _Proxy, tmp_path: Path) -> None:
    archive = DebianArchive(fresh.url, tmp_path / "cache")
    index = archive.index("bookworm", "amd64")
    hello = next(f for key, f in index.files.items() if key[0] == "hello")
    simulated = f"Inst hello ({hello.version} Debian:12/oldstable [amd64])\n"
    (path,) = archive.fetch(archive.lookup(index, simulated))
    assert path.stat().st_size == hello.size
    assert archive.fetch([hello]) == [path]  # cached: not downloaded again
    with archive.view(index) as view:
        archive.add(view, [hello])
        assert (view / "repo" / hello.filename).read_bytes() == path.read_bytes()
        assert "file:/run/rain-apt/repo bookworm main" in (view / "sources.list").read_text()


@pytest.mark.integration
def test_what_the_index_does_not_vouch_for_is_refused(fresh: _Proxy, tmp_path: Path) -> None:
    archive = DebianArchive(fresh.url, tmp_path / "cache", max_download_bytes=1000)
    index = archive.index("bookworm", "amd64")
    with pytest.raises(InvalidRequest, match="does not list"):
        archive.lookup(index, "Inst evil (6.6.6 Debian:12 [amd64])\n")
    big = PackageFile("linux", "1", "amd64", "pool/main/l/linux.deb", 10**9, SHA)
    with pytest.raises(InvalidRequest, match="more than the limit"):
        archive.fetch([big])


@pytest.mark.integration
def test_a_tampered_inrelease_is_refused(fresh: _Proxy, tmp_path: Path) -> None:
    fresh.tamper = lambda path, body: (body.replace(b"Codename: bookworm", b"Codename: bookwork")
                                       if path.endswith("InRelease") else body)
    with pytest.raises(ToolFailed, match="no good signature"):
        DebianArchive(fresh.url, tmp_path / "cache").index("bookworm", "amd64")
    assert list((tmp_path / "cache").rglob("InRelease")) == []


@pytest.mark.integration
def test_another_release_replayed_is_refused(fresh: _Proxy, tmp_path: Path) -> None:
    fresh.rewrite = lambda path: path.replace("/dists/bookworm/", "/dists/trixie/")
    with pytest.raises(ToolFailed, match="not bookworm"):
        DebianArchive(fresh.url, tmp_path / "cache").index("bookworm", "amd64")


@pytest.mark.integration
def test_a_tampered_index_or_package_is_refused(fresh: _Proxy, tmp_path: Path) -> None:
    fresh.tamper = lambda path, body: _flip(body, 100) if "binary-amd64" in path else body
    with pytest.raises(ToolFailed, match="SHA-256 does not match"):
        DebianArchive(fresh.url, tmp_path / "cache").index("bookworm", "amd64")
    assert list((tmp_path / "cache").rglob("Packages")) == []

    fresh.tamper = lambda path, body: _flip(body, 1000) if path.endswith(".deb") else body
    archive = DebianArchive(fresh.url, tmp_path / "cache")
    index = archive.index("bookworm", "amd64")
    hello = next(f for key, f in index.files.items() if key[0] == "hello")
    with pytest.raises(ToolFailed, match="SHA-256 does not match"):
        archive.fetch([hello])
    assert list((tmp_path / "cache").rglob("*.deb")) == []
