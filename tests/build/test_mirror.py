"""Finding the Debian mirror apt is configured with (deb822 and one-line sources)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rain.build.mirror import MIRROR_ENV, apt_sources, debian_mirror
from rain.model.errors import InvalidRequest

DEB822 = """\
Types: deb
# a comment inside the stanza
URIs: http://mirror.invalid/debian/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.invalid/debian-security
Suites: bookworm-security
Components: main
"""


@pytest.fixture(autouse=True)
def _no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MIRROR_ENV, raising=False)


def make_apt(tmp_path: Path, files: dict[str, str]) -> Path:
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    for name, text in files.items():
        (apt / name).write_text(text)
    return apt


def test_deb822_sources(tmp_path: Path) -> None:
    apt = make_apt(tmp_path, {"sources.list.d/debian.sources": DEB822})
    assert debian_mirror(apt) == "http://mirror.invalid/debian"


def test_deb822_security_first_is_skipped(tmp_path: Path) -> None:
    first, second = DEB822.split("\n\n")
    apt = make_apt(tmp_path, {"sources.list.d/debian.sources": second + "\n" + first + "\n"})
    assert debian_mirror(apt) == "http://mirror.invalid/debian"


def test_deb822_disabled_and_deb_src_are_skipped(tmp_path: Path) -> None:
    text = (
        "Types: deb-src\nURIs: http://src.invalid/debian\nSuites: bookworm\nComponents: main\n\n"
        "Types: deb\nURIs: http://off.invalid/debian\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb deb-src\nURIs: http://mirror.invalid/debian\nSuites: bookworm\n"
    )
    apt = make_apt(tmp_path, {"sources.list.d/a.sources": text})
    assert debian_mirror(apt) == "http://mirror.invalid/debian"


def test_third_party_repositories_are_skipped(tmp_path: Path) -> None:
    apt = make_apt(
        tmp_path,
        {
            "sources.list.d/a-node.sources": (
                "Types: deb\nURIs: https://thirdparty.invalid/node_20.x\n"
                "Suites: nodistro\nComponents: main\n"
            ),
            "sources.list.d/b-cloud.list": (
                "deb https://thirdparty.invalid/apt cloud-sdk-bookworm main\n"
            ),
            "sources.list.d/c-debian.sources": DEB822,
        },
    )
    assert debian_mirror(apt) == "http://mirror.invalid/debian"


def test_one_line_sources_list(tmp_path: Path) -> None:
    text = (
        "# deb http://commented.invalid/debian bookworm main\n"
        "deb-src http://src.invalid/debian bookworm main\n"
        "deb http://mirror.invalid/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        "http://mirror.invalid/debian/ bookworm main contrib  # trailing comment\n"
    )
    apt = make_apt(tmp_path, {"sources.list": text})
    assert debian_mirror(apt) == "http://mirror.invalid/debian"


def test_one_line_list_in_parts_dir(tmp_path: Path) -> None:
    apt = make_apt(
        tmp_path,
        {
            "sources.list.d/debian.list": (
                "deb [ trusted=yes ] http://mirror.invalid/debian trixie main\n"
            )
        },
    )
    assert debian_mirror(apt) == "http://mirror.invalid/debian"


def test_sources_list_comes_before_parts(tmp_path: Path) -> None:
    apt = make_apt(
        tmp_path,
        {
            "sources.list": "deb http://first.invalid/debian bookworm main\n",
            "sources.list.d/debian.sources": DEB822,
        },
    )
    assert debian_mirror(apt) == "http://first.invalid/debian"
    assert [s.uri for s in apt_sources(apt)][:2] == [
        "http://first.invalid/debian",
        "http://mirror.invalid/debian/",
    ]


def test_other_file_suffixes_are_ignored(tmp_path: Path) -> None:
    apt = make_apt(tmp_path, {"sources.list.d/debian.sources.disabled": DEB822})
    with pytest.raises(InvalidRequest, match="no Debian mirror"):
        debian_mirror(apt)


def test_nothing_configured(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest) as info:
        debian_mirror(tmp_path / "missing")
    assert "\n" not in str(info.value)
    assert MIRROR_ENV in str(info.value)


def test_only_security_is_not_enough(tmp_path: Path) -> None:
    apt = make_apt(
        tmp_path,
        {"sources.list": "deb http://mirror.invalid/debian-security bookworm-security main\n"},
    )
    with pytest.raises(InvalidRequest):
        debian_mirror(apt)


def test_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MIRROR_ENV, "http://override.invalid/debian/")
    assert debian_mirror(tmp_path / "missing") == "http://override.invalid/debian"


def test_this_machine_has_a_mirror() -> None:
    mirror = debian_mirror()
    assert mirror.startswith(("http://", "https://"))
    assert not mirror.endswith("/")
