"""What a new operator meets in the first hour (issue 10, §5): `rain` on the PATH and
`--version`, size filters that mean what they say, `match` and `gc` that explain an
empty answer, one-line errors instead of tracebacks, short usage errors, and /docs
that works offline."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import httpx
import pytest

from rain import __version__
from tests.conftest import RAIN, ROOT, Server, free_port, run_cli, start_server, stop_server
from tests.support.images import make_raw, qemu_img

pytestmark = pytest.mark.integration
GiB = 1024**3


def one_error_line(r: subprocess.CompletedProcess[str], status: int = 1) -> str:
    """The command failed with `status` and said why in one `rain: error:` line."""
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rain: error: "), r.stderr
    return lines[0]


# -- rain on the PATH, rain --version ------------------------------------------------
def test_version_prints_the_package_version_and_the_servers(server: Server) -> None:
    env = {k: v for k, v in server.env().items() if k != "RAIN_URL"}
    alone = run_cli("--version", env=env)
    assert alone.stdout == f"rain {__version__}\n"
    both = run_cli("--version", env=server.env())
    assert both.stdout.splitlines() == [f"rain {__version__}",
                                        f"server {server.url}: rain {__version__}"]
    down = run_cli("--version", env={**env, "RAIN_URL": f"http://127.0.0.1:{free_port()}"})
    assert down.stdout.startswith(f"rain {__version__}\n") and "cannot reach" in down.stdout


def test_make_run_links_rain_before_serving(tmp_path: Path) -> None:
    """`make run` puts `rain` on the PATH (BINDIR, /usr/local/bin by default) first."""
    dry = subprocess.run(["make", "-n", "run", f"BINDIR={tmp_path}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    lines = dry.stdout.splitlines()
    link = [i for i, line in enumerate(lines) if "scripts/link-rain" in line]
    serve = [i for i, line in enumerate(lines) if line.endswith(
        "--host 127.0.0.1 --port 8480") and "rain serve" in line]
    assert link and serve and link[0] < serve[0], dry.stdout
    assert lines[link[0]].split()[-2:] == [".venv/bin/rain", str(tmp_path)]


@pytest.mark.skipif(os.geteuid() != 0, reason="links only as root")
def test_link_rain_is_idempotent_and_leaves_other_files_alone(tmp_path: Path) -> None:
    script = ROOT / "scripts" / "link-rain"
    target = tmp_path / "venv" / "bin" / "rain"
    target.parent.mkdir(parents=True)
    target.write_text("#!/bin/sh\necho linked-rain\n")
    target.chmod(0o755)
    bindir = tmp_path / "bin"
    first = subprocess.run([script, target, bindir], capture_output=True, text=True, check=True)
    assert (bindir / "rain").resolve() == target and "->" in first.stderr + first.stdout
    again = subprocess.run([script, target, bindir], capture_output=True, text=True, check=True)
    assert again.stdout == again.stderr == ""  # nothing to do the second time
    shell = subprocess.run(["sh", "-c", "rain"], env={"PATH": f"{bindir}:/usr/bin:/bin"},
                           capture_output=True, text=True)
    assert shell.stdout == "linked-rain\n"  # a new shell finds it
    (bindir / "rain").unlink()
    (bindir / "rain").write_text("someone else's rain\n")
    other = subprocess.run([script, target, bindir], capture_output=True, text=True, check=True)
    assert "left alone" in other.stderr
    assert (bindir / "rain").read_text() == "someone else's rain\n"


# -- size filters ---------------------------------------------------------------------
def test_min_size_is_the_disk_size_and_min_file_size_the_file(server: Server,
                                                              tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "d.raw", size=GiB, data_fraction=1 / 1024)  # 1 MiB of data
    qcow2 = tmp_path / "d.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2))
    assert qcow2.stat().st_size < 8 * 1024**2
    env = server.env()
    image_id = run_cli("push", str(qcow2), "--name", "sized-1g", env=env).stdout.strip()

    def found(*args: str) -> bool:
        r = json.loads(run_cli("images", "--name", "sized-1g", *args, "--json", env=env).stdout)
        return [i["id"] for i in r["images"]] == [image_id]

    assert found("--min-size", "1G")  # the README's example: a 1 GiB disk
    assert not found("--min-size", "2G") and not found("--max-size", "512M")
    assert found("--max-file-size", "8M") and not found("--min-file-size", "1G")
    table = run_cli("images", "--name", "sized-1g", env=env).stdout
    assert "DISK" in table and "FILE" in table and "1.0 GiB" in table
    # The HTTP API keeps min_size for the file's bytes (Glance's meaning) ...
    api = httpx.get(f"{server.url}/v1/images", params={"name": "sized-1g", "min_size": "1G"},
                    headers={"Authorization": f"Bearer {server.token}"}).json()
    assert api["total"] == 0
    # ... and min_virtual_size / max_virtual_size for the disk.
    api = httpx.get(f"{server.url}/v1/images", params={
        "name": "sized-1g", "min_virtual_size": "1G", "max_virtual_size": "1G"},
        headers={"Authorization": f"Bearer {server.token}"}).json()
    assert [i["id"] for i in api["images"]] == [image_id]


# -- match explains an empty answer -------------------------------------------------
def test_match_without_result_says_what_removed_the_candidates(server: Server,
                                                               tmp_path: Path) -> None:
    env = server.env()
    for seed, name in ((41, "mpi-a"), (42, "mpi-b")):
        img = make_raw(tmp_path / f"{name}.raw", size=1024**2, seed=seed)
        run_cli("push", str(img), "--name", name, "--os-distro", "explainos", "--os-release",
                "12", "--arch", "amd64", env=env)
    args = ("match", "--distro", "explainos", "--arch", "amd64", "--package",
            "no-such-package>=1")
    found = run_cli(*args, "--json", env=env, check=False)
    assert found.returncode == 1  # none found: like grep, a script can tell
    report = json.loads(found.stdout)
    assert report["matches"] == []
    steps = {e["requirement"]: (e["removed"], e["left"]) for e in report["eliminated"]}
    assert steps["arch amd64"] == (0, 2)
    assert steps["package no-such-package>=1"] == (2, 0)
    assert report["candidates"] >= 2
    assert steps["os_distro explainos"] == (report["candidates"] - 2, 2)
    r = run_cli(*args, env=env, check=False)
    assert r.returncode == 1 and r.stdout == ""
    said = r.stderr.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("no image meets the requirements: of ")
    assert "package no-such-package>=1 removed the last 2" in said[0]
    assert "arch amd64" not in said[0]  # removed nothing: not worth a word


# -- gc says what the grace period kept --------------------------------------------
def test_gc_says_what_the_grace_period_kept_and_how_to_free_it(tmp_path: Path) -> None:
    s = start_server(tmp_path / "srv")
    try:
        env = s.env()
        img = make_raw(tmp_path / "g.raw", size=8 * 1024**2, seed=43, data_fraction=1.0)
        image_id = run_cli("push", str(img), "--name", "to-delete", env=env).stdout.strip()
        run_cli("rm", image_id, env=env)
        r = run_cli("gc", "--data-dir", str(s.data_dir), env=env)
        lines = r.stdout.strip().splitlines()
        assert lines[0].startswith("deleted 0 chunks")
        assert len(lines) == 2 and lines[1].startswith("held for the grace period (6 h): "), r
        assert "8.0 MiB in 32 chunks" in lines[1] and "rain gc --grace 0" in lines[1]
        assert re.search(r"until \d{4}-\d\d-\d\d \d\d:\d\d", lines[1])
        report = json.loads(run_cli("gc", "--data-dir", str(s.data_dir), "--json",
                                    env=env).stdout)
        assert report["manifests_held"] == 1 and report["bytes_held"] >= 8 * 1024**2
        assert report["grace_seconds"] == 6 * 3600 and report["held_until"]
        freed = run_cli("gc", "--data-dir", str(s.data_dir), "--grace", "0", env=env).stdout
        assert freed.startswith("deleted 32 chunks") and "held for" not in freed
    finally:
        stop_server(s.proc)


# -- one-line errors instead of tracebacks -----------------------------------------
@pytest.mark.parametrize("env_change,phrase", [
    ({"RAIN_URL": "http://[::1"}, "bad server URL 'http://[::1'"),
    ({"RAIN_URL": "ftp://127.0.0.1:8480"}, "scheme 'ftp' is not http or https"),
    ({"RAIN_URL": "127.0.0.1:8480"}, "no scheme"),
    ({"RAIN_URL": "http://127.0.0.1:99999"}, "port 99999 is not 1-65535"),
    ({"RAIN_TOKEN": "t\u00f6ken"}, "the API token (--token or RAIN_TOKEN) holds"),
    ({"RAIN_TOKEN": "two\nlines"}, "the API token (--token or RAIN_TOKEN) holds"),
])
def test_bad_url_or_token_is_one_line(server: Server, env_change: dict[str, str],
                                      phrase: str) -> None:
    for args in (["images"], ["pull", "x"], ["push", __file__, "--name", "x"]):
        line = one_error_line(run_cli(*args, env={**server.env(), **env_change}, check=False))
        assert phrase in line
        assert "töken" not in line and "lines" not in line  # a token is never echoed


def test_a_good_token_with_a_pasted_newline_still_works(server: Server) -> None:
    me = run_cli("whoami", "--json", env={**server.env(), "RAIN_TOKEN": server.token + "\n"})
    assert json.loads(me.stdout)["name"] == "admin"


def serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
          toml: str | None = None) -> subprocess.CompletedProcess[str]:
    data = tmp_path / "data"
    if toml is not None:
        data.mkdir(parents=True, exist_ok=True)
        (data / "rain.toml").write_text(toml)
    full = {**os.environ, **(env or {})}
    full.pop("RAIN_DATA_DIR", None)
    return subprocess.run([*RAIN, "serve", "--data-dir", str(data), *args], env=full,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)


@pytest.mark.parametrize("args,toml,env,phrase", [
    (["--db", "nonsense://x"], None, None, "cannot open the catalog database nonsense://x"),
    (["--db", "postgresql://u:secret@127.0.0.1:1/x"], None, None,
     "cannot open the catalog database postgresql://u:***@127.0.0.1:1/x"),
    ([], '[server]\nport = "abc"\n', None, "[server]: port must be an integer"),
    ([], "server = 5\n", None, "'server' is a section"),
    ([], "[server]\nport = 99999\n", None, "bad port 99999"),
    ([], "port = [\n", None, "rain.toml: "),
    ([], "[server]\nnonsense = 1\n", None, "unknown setting 'nonsense'"),
    ([], None, {"RAIN_STORE__CHUNK_SIZE": "big"}, "chunk_size must be an integer"),
    (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"], None, None,
     "TLS: /nonexistent.pem: no such file"),
    (["--tls-cert", "/etc/hostname", "--tls-key", "/etc/hostname"], None, None,
     "TLS: cannot use certificate /etc/hostname"),
])
def test_serve_refuses_bad_settings_in_one_line(tmp_path: Path, args: list[str],
                                                toml: str | None, env: dict[str, str] | None,
                                                phrase: str) -> None:
    r = serve(tmp_path, *args, env=env, toml=toml)
    line = one_error_line(r)
    assert phrase in line and "secret" not in line


def test_serve_port_out_of_range_is_a_usage_error(tmp_path: Path) -> None:
    line = one_error_line(serve(tmp_path, "--port", "99999"), status=2)
    assert "'--port'" in line and "65535" in line and "see 'rain serve --help'" in line


def test_serve_on_a_busy_port_says_so_before_anything_else(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = serve(tmp_path, "--port", str(port))
    line = one_error_line(r)
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in line
    assert r.stdout == ""  # no admin token handed out by a server that never ran
    assert not (tmp_path / "data" / "admin.token").exists()


def test_a_data_dir_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    r = subprocess.run([*RAIN, "serve", "--data-dir", str(tmp_path / "file" / "var")],
                       capture_output=True, text=True, timeout=60)
    assert "Not a directory" in one_error_line(r)


# -- wrong successes and files that are no images ----------------------------------
def test_pull_refused_by_the_server_fails(server: Server, tmp_path: Path) -> None:
    img = make_raw(tmp_path / "iso.raw", size=1024**2, seed=44)
    run_cli("push", str(img), "--name", "no-iso", env=server.env())
    r = run_cli("pull", "no-iso", "--format", "iso", "-o", str(tmp_path / "x.iso"),
                env=server.env(), check=False)
    assert "cannot convert to iso" in one_error_line(r)
    assert not (tmp_path / "x.iso").exists() and list(tmp_path.glob(".*part")) == []


@pytest.mark.parametrize("what,phrase", [
    ("device", "/dev/null: not a regular file"),
    ("empty", "is empty (0 bytes)"),
    ("directory", "is a directory"),
    ("missing", "no such file"),
])
def test_push_of_what_is_not_an_image_file_says_what_is_wrong(server: Server, tmp_path: Path,
                                                              what: str, phrase: str) -> None:
    path = {"device": Path("/dev/null"), "empty": tmp_path / "empty.img",
            "directory": tmp_path, "missing": tmp_path / "nope.img"}[what]
    if what == "empty":
        path.write_bytes(b"")
    r = run_cli("push", str(path), "--name", "not-an-image", env=server.env(), check=False)
    assert phrase in one_error_line(r)
    listed = json.loads(run_cli("images", "--name", "not-an-image", "--status", "any",
                                "--json", env=server.env()).stdout)
    assert listed["total"] == 0  # refused before any image record was made


# -- usage errors: one line, a pointer to --help, status 2 ------------------------
@pytest.mark.parametrize("args,phrase,command", [
    (["images", "--colour"], "no such option: --colour", "rain images"),
    (["push"], "missing argument 'file'", "rain push"),
    (["images", "--limit", "many"], "invalid value for '--limit'", "rain images"),
    (["push", "a", "b", "--name", "x"], "unexpected extra argument", "rain push"),
    (["no-such-command"], "no such command 'no-such-command'", "rain"),
    (["admin", "create-user"], "missing argument 'name'", "rain admin create-user"),
])
def test_usage_errors_are_one_short_line_with_status_2(server: Server, args: list[str],
                                                       phrase: str, command: str) -> None:
    r = run_cli(*args, env=server.env(), check=False)
    line = one_error_line(r, status=2)
    assert phrase in line and line.endswith(f"(see '{command} --help')")
    assert not set("╭╮╰╯│─") & set(r.stderr)  # no box


# -- /docs offline ------------------------------------------------------------------
@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_pages_need_nothing_from_another_site(server: Server, page: str) -> None:
    html = httpx.get(server.url + page).text
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    refs = re.findall(r"""(?:src|href|url|spec-url)\s*[=:]\s*["']([^"']+)["']""", html)
    assert len(refs) >= 2, html
    for ref in refs:
        assert ref.startswith("/") and not ref.startswith("//"), ref
        got = httpx.get(server.url + ref)
        assert got.status_code == 200 and len(got.content) > 0, ref
