"""Nothing outside the repository reaches through it to its catalog or chunk store.

The repository's methods are the front door (permission checks, usage records); a
`repo.catalog.…` or `job.server.repo.store` elsewhere skips them. Only rain.repo,
rain.catalog and rain.store use those objects; a class that was handed a catalog
of its own (rain.deploy.nodes, rain.deploy.records) uses it as `self.catalog`, and
settings are read as `cfg.store` — both allowed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import rain

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
