"""RepoSource against a real server: verified Range reads, resume after a cut, bad data."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from rain.distribute.partial import PartialImage
from rain.distribute.source import RepoSource, TransferStats, chunk_runs
from tests.distribute.conftest import RepoImage


def test_fetch_fills_only_data_chunks(repo_image: RepoImage, tmp_path: Path) -> None:
    m = repo_image.manifest
    stats = TransferStats()
    with RepoSource(repo_image.url, repo_image.token, deployment="d-1") as src, \
            PartialImage(tmp_path / "out", m) as p:
        src.fetch(repo_image.id, p, stats=stats)
        assert p.complete
    assert (tmp_path / "out").read_bytes() == repo_image.path.read_bytes()
    assert stats.repo_bytes == p.data_bytes() < m.size  # zero chunks never moved


def test_fetch_resumes_after_the_connection_is_cut(repo_image: RepoImage, tmp_path: Path) -> None:
    m = repo_image.manifest
    stats = TransferStats()
    cuts = {"left": 2}
    with RepoSource(repo_image.url, repo_image.token) as src, \
            PartialImage(tmp_path / "out", m) as p:
        def cut(i: int) -> None:
            # Close the socket under the reader every few chunks, twice.
            if i % 7 == 6 and cuts["left"] and src._conn is not None and src._conn.sock:
                cuts["left"] -= 1
                src._conn.sock.close()
        src.fetch(repo_image.id, p, stats=stats, on_chunk=cut)
        assert p.complete
    assert cuts["left"] == 0
    assert (tmp_path / "out").read_bytes() == repo_image.path.read_bytes()
    # Resumed, not restarted: at most the chunks in flight at each cut come twice.
    assert stats.repo_bytes <= p.data_bytes() + 2 * 64 * 1024 * 1024


def test_wrong_token_and_cancel(repo_image: RepoImage, tmp_path: Path) -> None:
    from rain.model.errors import RainError, Unauthorized

    with RepoSource(repo_image.url, "not-a-token") as src, \
            PartialImage(tmp_path / "out", repo_image.manifest) as p, \
            pytest.raises(Unauthorized):
        src.fetch(repo_image.id, p, stats=TransferStats())
    cancel = threading.Event()
    cancel.set()
    with RepoSource(repo_image.url, repo_image.token) as src, \
            PartialImage(tmp_path / "out2", repo_image.manifest) as p, \
            pytest.raises(RainError, match="cancelled"):
        src.fetch(repo_image.id, p, stats=TransferStats(), cancel=cancel)


def test_runs_group_consecutive_missing_chunks(repo_image: RepoImage, tmp_path: Path) -> None:
    with PartialImage(tmp_path / "out", repo_image.manifest) as p:
        runs = list(chunk_runs(p, range(p.count), max_run=2 * p.chunk_size))
        assert all(len(r) <= 2 for r in runs)
        assert sorted(i for r in runs for i in r) == p.missing()
