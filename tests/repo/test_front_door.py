"""Nothing outside the repository reaches through it to its catalog or chunk store.

The repository's methods are the front door (permission checks, usage records); a
`repo.catalog.…` or `job.server.repo.store` elsewhere skips them. Only rain.repo,
rain.catalog and rain.store use those objects; a class that was handed a catalog
of its own (rain.deploy.nodes, rain.deploy.records) uses it as `self.catalog`, and
settings are read as `cfg.store` — both allowed.
"""

from __future__ import annotations

import ast
import hashlib
import os
from pathlib import Path

import rain
from rain.repo import Repository
from rain.store.manifest import ZERO_DIGEST

SRC = Path(rain.__file__).parent
OWNERS = {"repo", "catalog", "store"}  # the packages these objects belong to
PARTS = {"catalog", "store"}
SETTINGS = {"cfg", "config"}  # rain.config.Config and its sections: `cfg.store` is settings


def reach_throughs(source: str) -> list[tuple[int, str]]:
    """(line, expression) of every `<x>.catalog` / `<x>.store` whose `<x>` is not `self`
    (a handle of one's own) or a settings object."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Attribute) and node.attr in PARTS):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id == "self":
            continue
        last = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
        if last in SETTINGS:
            continue
        found.append((node.lineno, ast.unparse(node)))
    return sorted(found)


def test_the_scan_finds_reach_throughs_and_leaves_own_handles_alone() -> None:
    source = (
        "repo.catalog.manifest_id(i)\n"
        "self.c.repo.catalog.note_cached(n, i)\n"
        "store = job.server.repo.store\n"
        "r.catalog.live_instance_counts()\n"
        "self.catalog.get_node(n)\n"
        "Repository.open(cfg.data_dir, cfg.db_url, cfg.store)\n"
        "x = self.config.store\n"
    )
    assert reach_throughs(source) == [
        (1, "repo.catalog"), (2, "self.c.repo.catalog"), (3, "job.server.repo.store"),
        (4, "r.catalog")]


def test_no_code_outside_the_repository_reaches_its_catalog_or_store() -> None:
    hits = []
    for path in sorted(SRC.rglob("*.py")):
        if path.relative_to(SRC).parts[0] in OWNERS:
            continue
        for line, expr in reach_throughs(path.read_text()):
            hits.append(f"{path.relative_to(SRC.parent)}:{line}: {expr}")
    assert not hits, "use a Repository method instead of its parts:\n" + "\n".join(hits)


def test_what_a_deployment_asks_of_the_repository(tmp_path: Path) -> None:
    """The internal methods the deploy side and the methods' repository halves use
    instead of the catalog and the store: the same bytes, records and torrents."""
    repo = Repository.open(tmp_path / "data", f"sqlite:///{tmp_path / 'c.db'}")
    try:
        alice, _ = repo.local_create_user("alice")
        data = os.urandom(96 * 1024) + bytes(1 << 20) + os.urandom(5000)
        (tmp_path / "d.raw").write_bytes(data)
        image = repo.upload_file(alice, repo.create(alice, {"name": "d"}).id,
                                 tmp_path / "d.raw")
        manifest_id = repo.manifest_id_of(image.id)
        assert manifest_id
        manifest = repo.load_manifest(manifest_id)
        assert manifest.sha256 == image.sha256 == hashlib.sha256(data).hexdigest()
        assert b"".join(repo.chunk_reader(manifest, image.id).iter_range()) == data
        repo.write_sparse(manifest, tmp_path / "seed", image.id)
        assert (tmp_path / "seed").read_bytes() == data
        # Images without stored data (or unknown) add no chunks; zero chunks are none.
        assert repo.chunk_digests([image.id, "0" * 32]) == manifest.unique_digests()
        assert ZERO_DIGEST not in repo.chunk_digests([image.id])

        repo.record_deploy(image.id, alice, 1234)
        deploys = [u for u in repo.usage(alice, image.id) if u.action == "deploy"]
        assert [(u.user, u.bytes) for u in deploys] == [("alice", 1234)]
        assert repo.get(alice, image.id).access_count == image.access_count + 1
        found, owner = repo.image_with_owner(image.id)
        assert (found.id, owner.name) == (image.id, "alice")

        assert repo.torrent_of(image.id) is None
        repo.save_torrent(image.id, "a" * 40, 1 << 22, b"d4:infod1:x1:yee")
        assert repo.torrent_of(image.id) == ("a" * 40, 1 << 22, b"d4:infod1:x1:yee")
    finally:
        repo.close()
