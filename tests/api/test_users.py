"""Administration through a real `rain serve`: users (list, disable, delete), groups,
tokens (list, create, revoke), the CLI for them, and server-side commands that must find
the repository the way `serve` does instead of making a new one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from rain.client import Client
from rain.model.errors import Conflict, Forbidden, NotFound, Unauthorized
from tests.conftest import Server, run_cli
from tests.support.images import make_raw

pytestmark = pytest.mark.integration


def admin(server: Server) -> Client:
    return Client(server.url, server.token)


def new_user(server: Server, name: str, **kw: object) -> str:
    return str(admin(server).create_user(name, **kw)["token"])  # type: ignore[arg-type]


def one_line_error(r: object, phrase: str) -> None:
    result = r  # a CompletedProcess
    assert result.returncode == 1, result  # type: ignore[attr-defined]
    lines = result.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith("rain: error:"), lines
    assert phrase in lines[0], lines


def test_only_admins_list_users(server: Server) -> None:
    token = new_user(server, "lister", groups=["readers"])
    names = [u["name"] for u in admin(server).users()]
    assert "admin" in names and "lister" in names
    me = admin(server).user("lister")
    assert me["groups"] == ["readers"] and me["disabled"] is False and me["created"]
    with Client(server.url, token) as c:
        with pytest.raises(Forbidden):
            c.users()
        assert c.user("lister")["name"] == "lister"  # yourself: yes
        with pytest.raises(Forbidden):
            c.user("admin")
        with pytest.raises(Forbidden):
            c.groups()


def test_a_disabled_users_tokens_all_fail_with_401_at_once(server: Server) -> None:
    first = new_user(server, "dis")
    with Client(server.url, first) as c:
        second = c.create_token(label="second")["token"]
    admin(server).set_user_disabled("dis", True)
    for token in (first, second):
        r = httpx.get(f"{server.url}/v1/users/me",
                      headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401
        assert r.json()["error"]["message"].startswith("user disabled")
        # The native server's image path says the same.
        r = httpx.get(f"{server.url}/v1/images/x/file",
                      headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401 and "user disabled" in r.json()["error"]["message"]
    assert admin(server).user("dis")["disabled"] is True
    admin(server).set_user_disabled("dis", False)
    with Client(server.url, second) as c:
        assert c.whoami()["name"] == "dis"
    with pytest.raises(Forbidden, match="yourself"):
        admin(server).set_user_disabled("admin", True)


def test_revoked_token_is_401_and_the_others_still_work(server: Server) -> None:
    created = new_user(server, "rot")
    with Client(server.url, created) as c:
        fresh = c.create_token(label="ci runner")
        assert fresh["token"].startswith("rain_") and fresh["user"] == "rot"
        listed = c.tokens()
        assert [t["label"] for t in listed] == ["created", "ci runner"]
        assert all(set(t) == {"id", "label", "user", "node", "created", "last_used"}
                   for t in listed)  # never the secret
        assert listed[0]["last_used"]  # this very request used it
        revoked = c.revoke_token(listed[0]["id"])
        assert revoked["id"] == listed[0]["id"]
        with pytest.raises(Unauthorized):
            c.whoami()
    with Client(server.url, fresh["token"]) as c:
        assert c.whoami()["name"] == "rot"
        assert [t["label"] for t in c.tokens()] == ["ci runner"]
        # Someone else's token: as if it did not exist; another user's list: admins only.
        with pytest.raises(NotFound):
            c.revoke_token(admin(server).tokens()[0]["id"])
        with pytest.raises(Forbidden):
            c.tokens(user="admin")
        with pytest.raises(Forbidden):
            c.create_token(user="admin")
    # An admin lists and revokes anyone's.
    other = admin(server).create_token(user="rot", label="by admin")
    assert other["user"] == "rot"
    ids = [t["id"] for t in admin(server).tokens(user="rot")]
    assert other["id"] in ids and fresh["id"] in ids
    admin(server).revoke_token(other["id"])
    with pytest.raises(Unauthorized):
        Client(server.url, other["token"]).whoami()
    with pytest.raises(NotFound):
        admin(server).revoke_token(other["id"])


def test_group_membership_changes_who_sees_a_shared_image(server: Server,
                                                         tmp_path: Path) -> None:
    owner, reader = new_user(server, "grp-owner"), new_user(server, "grp-reader")
    env = server.env()
    with Client(server.url, owner) as c:
        image = c.push(make_raw(tmp_path / "g.raw", 1 << 20, seed=5), name="grp-image")
    run_cli("group", "create", "optics", env=env)
    one_line_error(run_cli("group", "create", "optics", env=env, check=False),
                   "already exists")
    with Client(server.url, owner) as c:
        c.share(image["id"], group="optics")
    with Client(server.url, reader) as c:
        with pytest.raises(NotFound):
            c.show(image["id"])
        run_cli("group", "add", "optics", "grp-reader", env=env)
        assert c.show(image["id"])["name"] == "grp-image"
        assert c.get_range(image["id"], 0, 4)
        listed = json.loads(run_cli("groups", "--json", env=env).stdout)
        assert {"name": "optics", "members": ["grp-reader"]} in listed
        run_cli("group", "remove", "optics", "grp-reader", env=env)
        with pytest.raises(NotFound):
            c.show(image["id"])
        one_line_error(run_cli("group", "remove", "optics", "grp-reader", env=env,
                               check=False), "not in group")
        run_cli("group", "add", "optics", "grp-reader", env=env)
        assert c.show(image["id"])["id"] == image["id"]
        run_cli("group", "rm", "optics", env=env)
        with pytest.raises(NotFound):
            c.show(image["id"])
    one_line_error(run_cli("group", "add", "optics", "grp-reader", env=env, check=False),
                   "no group")
    one_line_error(run_cli("group", "create", "bad/name", env=env, check=False),
                   "bad group name")
    one_line_error(run_cli("groups", env=server.env(reader), check=False),
                   "only an admin")


def test_deleting_a_user_refuses_while_they_own_images_then_transfers(
        server: Server, tmp_path: Path) -> None:
    leaver = new_user(server, "leaver")
    new_user(server, "heir")
    with Client(server.url, leaver) as c:
        image = c.push(make_raw(tmp_path / "l.raw", 1 << 20, seed=6), name="left-behind")
    env = server.env()
    one_line_error(run_cli("user", "rm", "leaver", env=env, check=False),
                   "still owns 1 image: delete their images")
    with Client(server.url, leaver) as c:
        assert c.whoami()["name"] == "leaver"  # refused: nothing changed
    out = json.loads(run_cli("user", "rm", "leaver", "--transfer-to", "heir", "--json",
                             env=env).stdout)
    assert out["deleted"] is True and out["images_transferred"] == 1
    assert admin(server).show(image["id"])["owner"] == "heir"
    with pytest.raises(Unauthorized):
        Client(server.url, leaver).whoami()
    assert "leaver" not in [u["name"] for u in admin(server).users()]
    tomb = [u for u in admin(server).users(include_deleted=True) if u["name"] == "leaver"]
    assert tomb and tomb[0]["deleted"]
    with pytest.raises(Conflict, match="deleted"):
        admin(server).create_user("leaver")
    with pytest.raises(NotFound):
        admin(server).delete_user("leaver")
    with pytest.raises(Forbidden, match="yourself"):
        admin(server).delete_user("admin")


def test_cli_users_disable_enable_and_tokens(server: Server) -> None:
    env = server.env()
    token = run_cli("user", "create", "clio", "--group", "hist", env=env).stdout.strip()
    assert token.startswith("rain_")
    table = run_cli("users", env=env).stdout
    assert "clio" in table and "hist" in table and "active" in table
    run_cli("user", "disable", "clio", env=env)
    assert "disabled" in run_cli("users", env=env).stdout
    one_line_error(run_cli("whoami", env=server.env(token), check=False), "user disabled")
    run_cli("user", "enable", "clio", env=env)
    mine = server.env(token)
    assert run_cli("whoami", env=mine).stdout.strip() == "clio"
    made = run_cli("token", "create", "--label", "backup", env=mine)
    second = made.stdout.strip()
    assert second.startswith("rain_") and "for clio" in made.stderr
    listed = json.loads(run_cli("token", "ls", "--json", env=mine).stdout)
    assert [t["label"] for t in listed] == ["created", "backup"]
    assert token not in run_cli("token", "ls", env=mine).stdout
    run_cli("token", "revoke", str(listed[0]["id"]), env=server.env(second))
    one_line_error(run_cli("whoami", env=mine, check=False), "invalid token")
    assert run_cli("whoami", env=server.env(second)).stdout.strip() == "clio"
    one_line_error(run_cli("token", "revoke", "999999", env=env, check=False), "no token")
    one_line_error(run_cli("user", "disable", "nobody", env=env, check=False), "no user")
    one_line_error(run_cli("users", env=server.env(second), check=False), "only an admin")


# -- server-side commands find the repository or refuse ----------------------------------
def local_env(server: Server) -> dict[str, str]:
    env = server.env()
    for key in ("RAIN_DATA_DIR", "RAIN_CONFIG", "RAIN_DB"):
        env.pop(key, None)
    return env


def test_admin_create_user_elsewhere_refuses_instead_of_making_a_repository(
        server: Server, tmp_path: Path) -> None:
    r = run_cli("admin", "create-user", "stray", env=local_env(server), cwd=tmp_path,
                check=False)
    one_line_error(r, f"no rain repository in {tmp_path / 'var'}")
    assert "--data-dir" in r.stderr and "RAIN_DATA_DIR" in r.stderr
    assert not (tmp_path / "var").exists() and os.listdir(tmp_path) == []


def test_gc_on_a_missing_directory_refuses_and_does_not_create_it(server: Server,
                                                                  tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    r = run_cli("gc", "--data-dir", str(missing), env=local_env(server), check=False)
    one_line_error(r, f"no rain repository in {missing}")
    assert not missing.exists()
    # An empty directory holds no repository either, and stays empty.
    (tmp_path / "empty").mkdir()
    r = run_cli("gc", env={**local_env(server), "RAIN_DATA_DIR": str(tmp_path / "empty")},
                check=False)
    one_line_error(r, "no rain repository")
    assert os.listdir(tmp_path / "empty") == []


def test_admin_finds_the_repository_through_rain_config(server: Server,
                                                        tmp_path: Path) -> None:
    config = tmp_path / "rain.toml"
    config.write_text(f'data_dir = "{server.data_dir}"\n')
    env = {**local_env(server), "RAIN_CONFIG": str(config)}
    token = run_cli("admin", "create-user", "via-config", env=env, cwd=tmp_path).stdout.strip()
    with Client(server.url, token) as c:  # the running server knows it
        assert c.whoami()["name"] == "via-config"
    assert not (tmp_path / "var").exists()
    report = json.loads(run_cli("gc", "--json", env=env, cwd=tmp_path).stdout)
    assert "chunks_kept" in report
