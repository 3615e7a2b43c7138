"""`rain` commands run inside this process (the CLI's own entry point with an argv),
against the service served by a thread (tests/support/servers.py): what a person types
and sees, without a subprocess for either side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rain import __version__
from rain.cli.errors import run
from rain.cli.main import app
from tests.support.images import MiB, make_raw, sha256
from tests.support.servers import ThreadServer

pytestmark = pytest.mark.inprocess


@pytest.fixture
def rain(thread_server: ThreadServer, monkeypatch: pytest.MonkeyPatch,
         capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """`rain(*argv)` → (exit status, stdout, stderr), as the admin unless RAIN_TOKEN is
    set again."""
    for key, value in thread_server.env().items():
        monkeypatch.setenv(key, value)

    def call(*argv: str, token: str | None = None) -> tuple[int, str, str]:
        if token:
            monkeypatch.setenv("RAIN_TOKEN", token)
        capsys.readouterr()
        status = run(app, list(argv))
        captured = capsys.readouterr()
        monkeypatch.setenv("RAIN_TOKEN", thread_server.token)
        return status, captured.out, captured.err
    return call


def test_version_and_whoami(rain) -> None:  # type: ignore[no-untyped-def]
    assert rain("--version")[1].strip().endswith(__version__)
    status, out, _ = rain("whoami")
    assert status == 0 and out.strip() == "admin (admin)"


def test_push_ls_show_pull(rain, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    img = make_raw(tmp_path / "a.raw", size=2 * MiB)
    status, out, _ = rain("push", str(img), "--name", "cli-web", "--version", "1")
    assert status == 0
    image_id = out.strip()
    listed = json.loads(rain("images", "--name", "cli-web", "--json")[1])
    assert [i["id"] for i in listed["images"]] == [image_id]
    shown = json.loads(rain("show", "cli-web", "--json")[1])
    assert shown["sha256"] == sha256(img) and shown["version"] == "1"
    status, out, err = rain("pull", "cli-web", "-o", str(tmp_path / "back.raw"))
    assert status == 0 and "verified" in err
    assert sha256(tmp_path / "back.raw") == sha256(img)


def test_what_the_server_refuses_is_one_line_exit_1(rain) -> None:  # type: ignore[no-untyped-def]
    status, out, err = rain("show", "no-such-image")
    assert status == 1 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("rain: error:")


def test_a_value_that_cannot_be_read_is_exit_2(rain) -> None:  # type: ignore[no-untyped-def]
    status, _, err = rain("images", "--min-size", "1Q")
    assert status == 2 and len(err.splitlines()) == 1
    assert "bad size '1Q'" in err and err.rstrip().endswith("--help')")


def test_users_and_their_rights(rain) -> None:  # type: ignore[no-untyped-def]
    status, out, _ = rain("user", "create", "cli-bob", "--quota-bytes", "1G")
    assert status == 0
    bob = out.strip()
    assert rain("whoami", token=bob)[1].strip() == "cli-bob"
    status, _, err = rain("user", "create", "cli-eve", token=bob)
    assert status == 1 and err.startswith("rain: error:") and "admin" in err
    shown = json.loads(rain("user", "show", "cli-bob", "--json")[1])
    assert shown["quota_bytes"] == 1024**3
