"""The node cache: digests checked before admission, LFU-DA eviction, pins, restarts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rain.agent import NodeCache
from rain.model import DiskFormat
from rain.model.errors import Conflict, InvalidImage, InvalidRequest, NotFound, QuotaExceeded
from tests.distribute.conftest import MiB, Tick, write_image

RAW = DiskFormat.RAW


def add(cache: NodeCache, tmp_path: Path, image_id: str, size: int = MiB) -> None:
    src = tmp_path / f"src-{image_id}"
    digest = write_image(src, size)
    cache.add(image_id, src, RAW, digest)


def cached(cache: NodeCache) -> set[str]:
    return {e.image_id for e in cache.list()}


def test_add_verifies_and_stores(tmp_path: Path, clock: Tick) -> None:
    cache = NodeCache(tmp_path / "cache", 4 * MiB, clock=clock)
    src = tmp_path / "img"
    digest = write_image(src, MiB)
    entry = cache.add("img-1", src, RAW, "sha256:" + digest.upper())
    assert entry.path == tmp_path / "cache" / "images" / "img-1.raw"
    assert entry.path.read_bytes() == src.read_bytes()
    assert (entry.sha256, entry.size, entry.use_count) == (digest, MiB, 1)
    assert cache.get("img-1") == entry.path
    e = cache.entry("img-1")
    assert e is not None and e.use_count == 2 and e.last_used > entry.last_used
    assert cache.get("nope") is None
    # Adding the same image again is a use; a different digest under that id is not allowed.
    assert cache.add("img-1", src, RAW, digest).use_count == 3
    other = tmp_path / "other"
    with pytest.raises(Conflict, match="different digest"):
        cache.add("img-1", other, RAW, write_image(other, MiB, b"other"))


def test_corrupt_image_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path / "cache", 4 * MiB)
    src = tmp_path / "img"
    digest = write_image(src, MiB)
    with src.open("r+b") as f:  # one flipped byte in transit
        f.seek(12345)
        f.write(b"\x00")
    with pytest.raises(InvalidImage, match="expected " + digest):
        cache.add("img-1", src, RAW, digest)
    assert cache.list() == []
    assert list((tmp_path / "cache" / "images").iterdir()) == []
    with pytest.raises(InvalidImage):
        cache.add("img-2", src, RAW, digest, move=True)
    assert not src.exists()  # moved in, found bad, thrown away
    assert list((tmp_path / "cache" / "images").iterdir()) == []


def test_bad_ids_and_digests_are_refused(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path / "cache", 4 * MiB)
    src = tmp_path / "img"
    digest = write_image(src, MiB)
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(InvalidRequest):
            cache.add(bad, src, RAW, digest)
    with pytest.raises(InvalidRequest, match="SHA-256"):
        cache.add("img", src, RAW, "md5:abc")


def test_eviction_is_popularity_with_dynamic_aging(tmp_path: Path, clock: Tick) -> None:
    cache = NodeCache(tmp_path / "cache", 3 * MiB, clock=clock)
    for i in "abc":
        add(cache, tmp_path, i)  # H = 0 + 1 each
    cache.get("a")
    cache.get("a")  # H(a) = 3
    cache.get("b")  # H(b) = 2
    assert [e.image_id for e in cache.list()] == ["c", "b", "a"]
    add(cache, tmp_path, "d")  # evicts c (H 1, least popular); age L becomes 1
    assert cached(cache) == {"a", "b", "d"}
    d = cache.entry("d")
    assert d is not None and d.priority == 2  # entered at age L 1 with one use
    add(cache, tmp_path, "e")  # b and d tie at H 2: the less recently used b goes
    assert cached(cache) == {"a", "d", "e"}
    add(cache, tmp_path, "f")  # a 3, d 2, e 3 (entered at L 2): d goes
    assert cached(cache) == {"a", "e", "f"}
    # Aging: a's three early uses now weigh no more than the one use of images
    # that came in later (H 3 each), and among equals the least recent goes.
    add(cache, tmp_path, "g")
    assert cached(cache) == {"e", "f", "g"}
    assert cache.used <= cache.capacity


def test_pinned_images_are_never_evicted(tmp_path: Path, clock: Tick) -> None:
    cache = NodeCache(tmp_path / "cache", 2 * MiB, clock=clock)
    add(cache, tmp_path, "a")
    add(cache, tmp_path, "b")
    assert cache.pinned == 0
    cache.pin("a")
    assert 0 < cache.pinned == cache.entry("a").allocated  # type: ignore[union-attr]
    add(cache, tmp_path, "c")  # a is the oldest and least used, but pinned: b goes
    assert cached(cache) == {"a", "c"}
    cache.pin("c")
    with pytest.raises(QuotaExceeded, match="pinned by instances: a, c"):
        add(cache, tmp_path, "d")
    assert cached(cache) == {"a", "c"}
    assert sorted(p.name for p in (tmp_path / "cache" / "images").iterdir()) == ["a.raw", "c.raw"]
    with pytest.raises(Conflict, match="backs 1 instance disk"):
        cache.evict("a")
    cache.unpin("a")
    cache.evict("a")
    with pytest.raises(NotFound):
        cache.evict("a")
    with pytest.raises(QuotaExceeded, match="more than the whole cache"):
        add(cache, tmp_path, "huge", 3 * MiB)


def test_state_survives_restart_and_strays_are_cleaned(tmp_path: Path, clock: Tick) -> None:
    root = tmp_path / "cache"
    cache = NodeCache(root, 3 * MiB, clock=clock)
    add(cache, tmp_path, "a")
    add(cache, tmp_path, "b")
    cache.get("b")
    before = {e.image_id: e for e in cache.list()}
    # A crash mid-add leaves a temp file; one just before the index write leaves an unknown file.
    (root / "images" / ".tmp-c.123.456").write_bytes(b"partial")
    (root / "images" / "d.raw").write_bytes(b"never verified")
    (root / ".tmp-index.json.1.2").write_text("{")
    again = NodeCache(root, 3 * MiB, clock=clock)
    assert {e.image_id: e for e in again.list()} == before
    assert sorted(p.name for p in (root / "images").iterdir()) == ["a.raw", "b.raw"]
    assert sorted(p.name for p in root.iterdir()) == ["images", "index.json", "manifests"]
    index = json.loads((root / "index.json").read_text())
    assert {r["image_id"] for r in index["images"]} == {"a", "b"}
    fields = {"size", "format", "sha256", "last_used", "use_count", "added"}
    assert set(index["images"][0]) >= fields
