"""The build queue, purge, rebuild and pedigree, in process, on SQLite and PostgreSQL.

The runner is `RecordingRunner`, a test double (tests/build/doubles.py): it
builds nothing for real but pushes a small real image through the repository.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from rain.build.config import BuildConfig
from rain.build.jobs import BuildQueue
from rain.catalog.search import ImageQuery
from rain.model import (
    Build,
    BuildStatus,
    Conflict,
    Forbidden,
    ImageRebuilding,
    ImageStatus,
    InvalidRequest,
    NotFound,
    Unsupported,
    User,
)
from rain.model.clock import utcnow
from rain.repo import Repository
from rain.store import ImageReader
from tests.build.doubles import IMAGE_SIZE, RecordingRunner
from tests.conftest import fresh_postgres_db


def template(name: str, *run: str, base: str = "debian/12", packages: str = "[nginx]") -> str:
    """A template; the name is also written into a file, so each name is a distinct image."""
    lines = [f"name: {name}", f"from: {base}", f"packages: {packages}",
             f"files: {{/etc/rain-test: {name}}}"]
    if run:
        lines.append("run: [" + ", ".join(f'"{r}"' for r in run) + "]")
    return "\n".join(lines) + "\n"


class Env:
    def __init__(self, repo: Repository, runner: RecordingRunner, queue: BuildQueue) -> None:
        self.repo, self.runner, self.queue = repo, runner, queue
        self.alice = repo.catalog.create_user("alice")
        self.bob = repo.catalog.create_user("bob")
        self.admin = repo.catalog.create_user("root", admin=True)

    def wait(self, build_id: str, *statuses: BuildStatus, timeout: float = 15) -> Build:
        want = statuses or (BuildStatus.SUCCEEDED, BuildStatus.FAILED, BuildStatus.CANCELLED)
        deadline = time.monotonic() + timeout
        while True:
            build = self.repo.catalog.get_build(build_id, log_offset=0)
            if build.status in want:
                return build
            assert time.monotonic() < deadline, f"build {build_id} stuck at {build.status}"
            time.sleep(0.02)

    def built(self, user: User, text: str) -> str:
        """Submit, wait for success, return the image id."""
        build = self.wait(self.queue.submit(user, text).id)
        assert build.status == BuildStatus.SUCCEEDED, build.error
        assert build.image_id
        return build.image_id


@pytest.fixture
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """SQLite; tests marked `@both` run on PostgreSQL too (the catalog's own tests cover
    every build query on both, so the rest stay on SQLite to keep the suite quick)."""
    if getattr(request, "param", "sqlite") == "sqlite":
        return f"sqlite:///{tmp_path / 'c.db'}"
    return fresh_postgres_db(request.getfixturevalue("postgres_url"), "jobs")


both = pytest.mark.parametrize(
    "db_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> Iterator[Env]:
    repo = Repository.open(tmp_path / "data", db_url)
    runner = RecordingRunner(repo)
    queue = BuildQueue(repo, runner, BuildConfig(max_concurrent=2, poll_seconds=0.2))
    repo.rebuilder = queue
    e = Env(repo, runner, queue)
    queue.start()
    yield e
    if runner.gate is not None:
        runner.gate.set()
    queue.stop()
    repo.close()


def read_image(repo: Repository, viewer: User, image_id: str) -> bytes:
    d = repo.open_download(viewer, image_id)
    return b"".join(ImageReader(repo.store, d.manifest).iter_range())


# -- queue -----------------------------------------------------------------------
@both
def test_build_records_image_template_log_and_timings(env: Env) -> None:
    text = template("web")
    build = env.queue.submit(env.alice, text)
    assert build.status == BuildStatus.QUEUED and not build.cached
    done = env.wait(build.id)
    assert done.status == BuildStatus.SUCCEEDED and done.progress == 1.0
    assert "test double: building web" in done.log and done.log_size == len(done.log)
    assert set(done.timings) == {"install", "upload"}
    image = env.repo.get(env.alice, str(done.image_id))
    assert image.status == ImageStatus.ACTIVE and image.owner == "alice"
    assert image.template == text and image.template_digest == done.template_digest
    assert image.build_id == done.id and image.build_timings == done.timings
    assert image.packages == {"nginx": "1.0-test"}
    assert len(read_image(env.repo, env.alice, image.id)) == IMAGE_SIZE
    # a follower asks only for what is new
    tail = env.queue.get(env.alice, build.id, log_offset=done.log_size - 10)
    assert tail.log == done.log[-10:] and tail.log_offset == done.log_size - 10


@both
def test_concurrency_limit_and_queue(env: Env) -> None:
    env.runner.gate = gate = threading.Event()
    builds = [env.queue.submit(env.alice, template(f"c{i}")) for i in range(3)]
    deadline = time.monotonic() + 10
    while env.runner.active < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.3)  # a third worker, if there were one, would have started by now
    states = [env.repo.catalog.get_build(b.id).status for b in builds]
    assert states.count(BuildStatus.RUNNING) == 2 and states.count(BuildStatus.QUEUED) == 1
    assert states[2] == BuildStatus.QUEUED  # oldest first
    gate.set()
    assert all(env.wait(b.id).status == BuildStatus.SUCCEEDED for b in builds)
    assert env.runner.max_active == 2


@both
def test_identical_requests_share_one_job_and_template_hit_is_instant(env: Env) -> None:
    env.runner.gate = gate = threading.Event()
    text = "name: shared\nfrom: debian/12\npackages: [nginx, curl]\n"
    reordered = "packages: [curl, nginx]\nfrom: debian/bookworm\nname: renamed\n"
    first = env.queue.submit(env.alice, text)
    second = env.queue.submit(env.alice, reordered)  # same digest: the same job
    assert second.id == first.id
    other = env.queue.submit(env.bob, text)  # another user: a job of their own
    assert other.id != first.id
    gate.set()
    image_id = env.wait(first.id).image_id
    env.wait(other.id)
    assert [c[0] for c in env.runner.calls].count(first.template_digest) == 2
    started = time.monotonic()
    hit = env.queue.submit(env.alice, reordered)
    assert time.monotonic() - started < 1
    assert hit.status == BuildStatus.SUCCEEDED and hit.cached and hit.image_id == image_id
    assert "template hit" in env.queue.get(env.alice, hit.id).log
    assert len(env.runner.calls) == 2  # no work for the hit


def test_failure_is_recorded_with_error_and_log(env: Env) -> None:
    build = env.queue.submit(env.alice, template("broken", "fail apt-get exploded"))
    done = env.wait(build.id)
    assert done.status == BuildStatus.FAILED and done.error == "apt-get exploded"
    assert "+ fail apt-get exploded" in done.log and "build failed: apt-get exploded" in done.log
    assert done.image_id is None and done.finished is not None


def test_bad_template_fails_fast_without_a_job(env: Env) -> None:
    with pytest.raises(InvalidRequest, match=r"template line 3: unknown key 'pakages'"):
        env.queue.submit(env.alice, "name: x\nfrom: debian/12\npakages: [nginx]\n")
    with pytest.raises(InvalidRequest, match=r"base\.yaml line 1"):
        env.queue.submit(env.alice, "name: c\nfrom: template:base.yaml\n", ["nme: b\n"],
                         ["child.yaml", "base.yaml"])
    with pytest.raises(InvalidRequest, match="whose text was not sent"):
        env.queue.submit(env.alice, "name: c\nfrom: template:base.yaml\n")
    with pytest.raises(NotFound):
        env.queue.submit(env.alice, "name: c\nfrom: image:nothing-like-it\n")
    assert env.queue.list_builds(env.alice)[1] == 0


def test_template_extending_a_template_travels_with_its_parent(env: Env) -> None:
    parent = template("base", packages="[curl]")
    child = "name: child\nfrom: template:base.yaml\npackages: [nginx]\n"
    build = env.wait(env.queue.submit(env.alice, child, [parent]).id)
    assert build.status == BuildStatus.SUCCEEDED and build.template_parents == [parent]
    image = env.repo.get(env.alice, str(build.image_id))
    assert image.template == child and image.template_parents == [parent]
    # a changed parent is a different image
    other = env.queue.submit(env.alice, child, [template("base", packages="[wget]")])
    assert other.template_digest != build.template_digest


def wait_for_line(env: Env, build_id: str, text: str) -> Build:
    """The build once its log has `text` (the runner got that far)."""
    deadline = time.monotonic() + 10
    while text not in (build := env.repo.catalog.get_build(build_id, log_offset=0)).log:
        assert time.monotonic() < deadline, build.log
        time.sleep(0.02)
    return build


def scratch_of(build: Build) -> Path:
    """The scratch directory the test double's `hold` logged."""
    line = next(x for x in build.log.splitlines() if x.startswith("scratch "))
    return Path(line.split(" ", 1)[1])


def test_cancel_queued_and_running_builds(env: Env) -> None:
    running = env.queue.submit(env.alice, template("held", "hold"))
    held = wait_for_line(env, running.id, "scratch ")
    env.runner.gate = gate = threading.Event()
    other = env.queue.submit(env.alice, template("r1"))
    queued = env.queue.submit(env.alice, template("later"))
    env.wait(other.id, BuildStatus.RUNNING)
    with pytest.raises(NotFound):
        env.queue.cancel(env.bob, queued.id)  # not visible to bob
    assert env.queue.cancel(env.alice, queued.id).status == BuildStatus.CANCELLED
    # A running build: its worker stops at the next step; nothing of it is left.
    assert scratch_of(held).is_dir()
    assert env.queue.cancel(env.alice, running.id).status in (BuildStatus.CANCELLING,
                                                               BuildStatus.CANCELLED)
    done = env.wait(running.id)
    assert done.status == BuildStatus.CANCELLED and done.error == "cancelled by alice"
    assert done.image_id is None and not scratch_of(done).exists()
    assert "cancel requested by alice" in done.log and done.log.rstrip().endswith(
        "build cancelled")
    found, _ = env.repo.search(env.alice, ImageQuery(name="held"))
    assert found == []
    gate.set()
    assert env.wait(other.id).status == BuildStatus.SUCCEEDED
    with pytest.raises(Conflict, match="has already succeeded; there is nothing to cancel"):
        env.queue.cancel(env.admin, other.id)
    assert env.repo.catalog.get_build(queued.id).status == BuildStatus.CANCELLED


def test_a_build_that_finishes_after_its_cancel_leaves_no_image(env: Env,
                                                                tmp_path: Path) -> None:
    """The runner notices too late and makes its image anyway: the image is taken back
    (deleted; for a rebuild, purged again) and the build still ends cancelled."""
    build = env.queue.submit(env.alice, template("late", "ignore-cancel"))
    wait_for_line(env, build.id, "+ ignore-cancel")
    env.queue.cancel(env.alice, build.id)
    done = env.wait(build.id)
    assert done.status == BuildStatus.CANCELLED and done.image_id is None
    made = re.search(r"image (\S+) it had made was deleted", done.log)
    assert made, done.log
    assert env.repo.catalog.get_image(made[1]).status == ImageStatus.DELETED
    # A rebuild: the purged image stays purged.
    go = tmp_path / "go"
    go.touch()
    image_id = env.built(env.alice, template("again", f"ignore-cancel {go}"))
    go.unlink()
    env.repo.purge(env.alice, image_id)
    rebuild = env.queue.rebuild(env.alice, image_id)
    wait_for_line(env, rebuild.id, "+ ignore-cancel")
    env.queue.cancel(env.alice, rebuild.id)
    assert env.wait(rebuild.id).status == BuildStatus.CANCELLED
    assert env.repo.catalog.get_image(image_id).status == ImageStatus.PURGED


def test_cancel_through_another_server_sharing_the_catalog(env: Env, db_url: str,
                                                          tmp_path: Path) -> None:
    """A second server (no builder of its own) marks the build; the server running it
    sees that within a flush and stops it."""
    build = env.queue.submit(env.alice, template("elsewhere", "hold"))
    wait_for_line(env, build.id, "scratch ")
    other_repo = Repository.open(tmp_path / "data", db_url)
    try:
        other = BuildQueue(other_repo, None, BuildConfig())
        assert other.cancel(env.alice, build.id).status == BuildStatus.CANCELLING
        done = env.wait(build.id)
        assert done.status == BuildStatus.CANCELLED
        assert "cancel requested by a user (through another server)" in done.log
    finally:
        other_repo.close()


def test_builds_of_others_are_404_unless_they_made_a_visible_image(env: Env) -> None:
    failed = env.wait(env.queue.submit(env.alice, template("f", "fail no")).id)
    ok = env.wait(env.queue.submit(env.alice, template("p")).id)
    for build in (failed, ok):
        with pytest.raises(NotFound):
            env.queue.get(env.bob, build.id)
        assert env.queue.get(env.admin, build.id).id == build.id
    env.repo.update(env.alice, str(ok.image_id), {"visibility": "public"})
    assert env.queue.get(env.bob, ok.id).id == ok.id  # it made an image bob may see
    assert [b.id for b in env.queue.list_builds(env.bob, image=str(ok.image_id))[0]] == [ok.id]
    assert env.queue.list_builds(env.bob)[1] == 0
    assert env.queue.list_builds(env.admin)[1] == 2


def test_restart_marks_builds_of_dead_servers_failed(env: Env) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    c = env.repo.catalog
    mine = c.create_build(env.alice, template_digest="a" * 64, template="name: a\n")
    elsewhere = c.create_build(env.alice, template_digest="b" * 64, template="name: b\n")
    stale = c.create_build(env.alice, template_digest="c" * 64, template="name: c\n")
    now = utcnow()
    for build, worker, beat in [(mine, f"{host}:{dead.pid}", now),
                                (elsewhere, "other-host:1", now),
                                (stale, "other-host:2", now - timedelta(hours=1))]:
        c.update_build(build.id, status="running", worker=worker, heartbeat=beat)
    survivor = BuildQueue(env.repo, env.runner, BuildConfig(stale_after_seconds=600))
    assert sorted(survivor.recover()) == sorted([mine.id, stale.id])
    for build, status in [(mine, BuildStatus.FAILED), (stale, BuildStatus.FAILED),
                          (elsewhere, BuildStatus.RUNNING)]:
        got = c.get_build(build.id)
        assert got.status == status
    assert "stopped before it finished" in str(c.get_build(mine.id).error)


def test_without_a_runner_builds_are_501(env: Env) -> None:
    queue = BuildQueue(env.repo, None, unavailable="no builder here")
    with pytest.raises(Unsupported, match="no builder here"):
        queue.submit(env.alice, template("x"))
    with pytest.raises(InvalidRequest):  # templates are still checked first
        queue.submit(env.alice, "name: x\n")


# -- purge, rebuild, pedigree ---------------------------------------------------------
@both
def test_purge_keeps_metadata_and_pull_rebuilds(env: Env) -> None:
    image_id = env.built(env.alice, template("app", packages="[nginx, curl]"))
    before = env.repo.get(env.alice, image_id)
    env.repo.update(env.alice, image_id, {"visibility": "public"})
    purged = env.repo.purge(env.alice, image_id)
    assert purged.status == ImageStatus.PURGED and purged.stored_bytes == 0
    assert purged.template == before.template and purged.packages == before.packages
    assert env.repo.catalog.manifest_id(image_id) is None
    assert env.repo.get(env.bob, image_id).status == ImageStatus.PURGED  # still listed
    # any reader's pull starts (or joins) the rebuild and is told to come back
    with pytest.raises(ImageRebuilding) as first:
        env.repo.open_download(env.bob, image_id)
    with pytest.raises(ImageRebuilding) as second:
        env.repo.open_download(env.alice, image_id)
    build_id = first.value.build_id
    assert build_id and second.value.build_id == build_id and first.value.retry_after == 10
    rebuild = env.queue.get(env.bob, build_id)  # bob may follow it: he sees the image
    assert rebuild.rebuild_of == image_id and rebuild.owner == "alice"
    done = env.wait(build_id)
    assert done.status == BuildStatus.SUCCEEDED and done.image_id == image_id
    assert "rebuilt with the same package set (2 packages)" in done.log
    after = env.repo.get(env.alice, image_id)
    assert after.status == ImageStatus.ACTIVE and after.template_digest == before.template_digest
    assert after.packages == before.packages and after.build_id == build_id
    assert after.sha256 != before.sha256
    assert after.properties["rain.previous_sha256"] == before.sha256
    assert len(read_image(env.repo, env.bob, image_id)) == IMAGE_SIZE
    assert env.runner.calls[-1] == (before.template_digest, image_id)


def test_rebuild_explicitly_and_template_of_purged_image_rebuilds_it(env: Env) -> None:
    text = template("again")
    image_id = env.built(env.alice, text)
    with pytest.raises(Conflict, match="not purged"):
        env.queue.rebuild(env.alice, image_id)
    env.repo.purge(env.alice, image_id)
    build = env.queue.rebuild(env.alice, image_id)
    assert env.queue.submit(env.alice, text).id == build.id  # same template: joins the rebuild
    assert env.wait(build.id).image_id == image_id


def test_purge_refusals(env: Env) -> None:
    image_id = env.built(env.alice, template("guarded"))
    env.repo.update(env.alice, image_id, {"protected": True})
    with pytest.raises(Forbidden, match="protected"):
        env.repo.purge(env.alice, image_id)
    pushed = env.repo.create(env.alice, {"name": "pushed"})
    with pytest.raises(Conflict, match="no template"):
        env.repo.purge(env.alice, pushed.id)
    with pytest.raises(NotFound):
        env.repo.purge(env.bob, image_id)  # private: bob may not even know it
    env.repo.update(env.alice, image_id, {"visibility": "public", "protected": False})
    with pytest.raises(Forbidden, match="owner or an admin"):
        env.repo.purge(env.bob, image_id)
    with pytest.raises(Forbidden):
        env.queue.rebuild(env.bob, image_id)
    assert env.repo.purge(env.admin, image_id).status == ImageStatus.PURGED
    assert env.repo.purge(env.alice, image_id).status == ImageStatus.PURGED  # idempotent


def test_gc_reclaims_only_what_no_other_image_shares(env: Env) -> None:
    keep = env.built(env.alice, template("keep"))
    drop = env.built(env.alice, template("drop"))
    env.repo.purge(env.alice, drop)
    report = env.repo.gc(local=True, grace_seconds=0)
    # drop's own chunk goes; the chunk both images hold and its manifest's peers stay
    assert report.chunks_deleted == 1 and report.bytes_freed > 0
    assert report.manifests_deleted == 1
    assert len(read_image(env.repo, env.alice, keep)) == IMAGE_SIZE


@both
def test_purge_unused_uses_last_access_or_created(env: Env) -> None:
    old = env.built(env.alice, template("old"))
    recent = env.built(env.alice, template("recent"))
    pulled = env.built(env.alice, template("pulled"))
    guarded = env.built(env.alice, template("guarded"))
    pushed = env.repo.create(env.alice, {"name": "pushed"}).id
    long_ago = utcnow() - timedelta(days=100)
    for image_id in (old, pulled, guarded, pushed):
        env.repo.catalog.update_image(image_id, created=long_ago)
    env.repo.catalog.record_access(pulled, utcnow() - timedelta(days=1))
    env.repo.update(env.alice, guarded, {"protected": True})
    bobs = env.built(env.bob, template("bobs-old"))
    env.repo.catalog.update_image(bobs, created=long_ago)
    dry = env.repo.purge_unused(env.alice, timedelta(days=90), dry_run=True)
    assert [i.id for i in dry] == [old]
    assert env.repo.get(env.alice, old).status == ImageStatus.ACTIVE
    assert [i.id for i in env.repo.purge_unused(env.alice, timedelta(days=90))] == [old]
    assert env.repo.get(env.alice, recent).status == ImageStatus.ACTIVE
    assert env.repo.get(env.bob, bobs).status == ImageStatus.ACTIVE  # not alice's
    assert [i.id for i in env.repo.purge_unused(env.admin, timedelta(days=90))] == [bobs]


def test_pedigree_follows_parents_and_stops_at_what_is_hidden(env: Env) -> None:
    root = env.built(env.alice, template("root"))
    middle = env.built(env.alice, template("middle", base="image:root"))
    leaf = env.built(env.alice, template("leaf", base="image:middle"))
    chain, hidden = env.repo.pedigree(env.alice, leaf)
    assert [i.id for i in chain] == [leaf, middle, root] and hidden is None
    env.repo.update(env.alice, leaf, {"visibility": "public"})
    env.repo.update(env.alice, middle, {"visibility": "public"})
    chain, hidden = env.repo.pedigree(env.bob, leaf)
    assert [i.id for i in chain] == [leaf, middle] and hidden == root
    # a cycle (impossible through the API) ends the chain instead of looping
    env.repo.catalog.update_image(root, parent_id=leaf)
    chain, _ = env.repo.pedigree(env.alice, leaf)
    assert [i.id for i in chain] == [leaf, middle, root]
    assert env.repo.get(env.alice, middle).parent == root
