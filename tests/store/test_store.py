"""Chunk store: dedup, zero chunks, verified reads, ranges, gc grace."""

from __future__ import annotations

import errno
import hashlib
import os
import time
from pathlib import Path

import pytest

from rain.model.errors import StoreCorruption
from rain.store import (
    ZERO_DIGEST,
    ChunkStore,
    FilesystemBackend,
    ImageReader,
    ImageWriter,
    StoreConfig,
    collect,
)
from rain.store.packs import pack_key

CS = 64 * 1024


def make_store(tmp_path: Path, **kw: object) -> ChunkStore:
    return ChunkStore(FilesystemBackend(tmp_path / "store"), StoreConfig(chunk_size=CS, **kw))  # type: ignore[arg-type]


def push(store: ChunkStore, data: bytes, block: int = 10_000) -> tuple[str, int]:
    w = ImageWriter(store)
    for off in range(0, len(data), block):
        w.write(data[off : off + block])
        w.wait()
    m = w.finish()
    return store.put_manifest(m), w.stored_bytes


def age(store: ChunkStore, seconds: float = 7200) -> None:
    """Make everything in the store look `seconds` old to gc: rows, packs, manifests."""
    old = time.time() - seconds
    with store.index.write_lock() as db:
        db.execute("UPDATE chunks SET touched = ?", (old,))
    root = tmp_root(store)
    for sub in ("packs", "manifests", "chunks"):
        for path in (root / sub).rglob("*"):
            os.utime(path, (old, old))


def tmp_root(store: ChunkStore) -> Path:
    assert isinstance(store.backend, FilesystemBackend)
    return store.backend.root


def image_bytes(seed: int, size: int) -> bytes:
    rnd = bytearray(os.urandom(size // 4))
    data = bytearray(size)
    data[: len(rnd)] = rnd  # a quarter data, the rest zeros
    data[-100:] = bytes([seed]) * 100
    return bytes(data)


def test_roundtrip_digest_and_zero_chunks_not_stored(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    data = image_bytes(1, 40 * CS + 123)
    mid, stored = push(store, data)
    m = store.get_manifest(mid)
    assert m.sha256 == hashlib.sha256(data).hexdigest()
    assert m.size == len(data)
    assert ZERO_DIGEST in m.chunks
    # only non-zero chunks take space: 11 with random data + the short last one
    assert stored == 11 * CS + 123
    assert sum(1 for _ in store.list_chunks()) == 12
    assert b"".join(ImageReader(store, m).iter_range()) == data


def test_identical_chunks_stored_once_across_images(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    base = image_bytes(1, 64 * CS)
    _, stored1 = push(store, base)
    derived = bytearray(base)
    derived[5 * CS : 5 * CS + 10] = b"x" * 10  # one chunk changes
    _, stored2 = push(store, bytes(derived))
    assert stored1 == 17 * CS
    assert stored2 == CS


def test_ranges_match_slices(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    data = image_bytes(2, 20 * CS + 7)
    mid, _ = push(store, data)
    reader = ImageReader(store, store.get_manifest(mid), readahead=3)
    for start, end in [(0, 1), (CS - 1, CS + 1), (3 * CS + 5, 17 * CS), (len(data) - 7, len(data)),
                       (0, len(data)), (6 * CS, 6 * CS)]:
        assert b"".join(reader.iter_range(start, end)) == data[start:end]


def test_corrupt_chunk_is_an_error_naming_image_and_chunk(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    data = image_bytes(3, 8 * CS)
    mid, _ = push(store, data)
    m = store.get_manifest(mid)
    victim = m.chunks[0]
    loc = store.index.lookup(victim)
    assert loc is not None
    with open(tmp_path / "store" / pack_key(loc.pack), "r+b") as f:
        f.seek(loc.offset + 100)
        byte = f.read(1)[0]
        f.seek(loc.offset + 100)
        f.write(bytes([byte ^ 0xFF]))
    with pytest.raises(StoreCorruption, match=f"chunk {victim.hex()} of image img-1 is corrupt"):
        b"".join(ImageReader(store, m, image="img-1").iter_range())


def test_missing_chunk_and_corrupt_manifest(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    mid, _ = push(store, image_bytes(4, 4 * CS))
    m = store.get_manifest(mid)
    loc = store.index.lookup(m.chunks[0])
    assert loc is not None
    (tmp_path / "store" / pack_key(loc.pack)).unlink()
    with pytest.raises(StoreCorruption, match=f"chunk {m.chunks[0].hex()} of image x is missing"):
        b"".join(ImageReader(store, m, image="x").iter_range())
    mpath = next((tmp_path / "store" / "manifests").rglob(mid))
    mpath.write_bytes(mpath.read_bytes()[:-5])
    with pytest.raises(StoreCorruption, match="corrupt"):
        store.get_manifest(mid)


def test_zstd_only_where_it_saves_space(tmp_path: Path) -> None:
    store = make_store(tmp_path, compress=True)
    text = (b"hello rain " * 10_000)[: 4 * CS]
    noise = os.urandom(4 * CS)
    mid, stored = push(store, text + noise)
    assert stored < 4 * CS + 4 * CS  # text compressed
    assert stored >= 4 * CS  # random data stored raw
    m = store.get_manifest(mid)
    assert b"".join(ImageReader(store, m).iter_range()) == text + noise


def test_gc_removes_unreferenced_only_after_grace(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    keep, _ = push(store, image_bytes(5, 8 * CS))
    drop, _ = push(store, image_bytes(6, 8 * CS))
    # An upload cut off half way and never finished nor aborted: pack written, no rows.
    w = ImageWriter(store)
    w.write(os.urandom(3 * CS))
    w.drain()
    before = sum(1 for _ in store.list_chunks())
    packs = sorted((tmp_path / "store" / "packs").rglob("*.pack"))
    assert len(packs) == 3
    report = collect(store, {keep}, grace_seconds=3600)
    assert report.chunks_deleted == 0 and report.manifests_deleted == 0
    assert report.packs_deleted == 0
    assert sum(1 for _ in store.list_chunks()) == before
    assert sorted((tmp_path / "store" / "packs").rglob("*.pack")) == packs
    age(store)
    report = collect(store, {keep}, grace_seconds=3600)
    assert report.manifests_deleted == 1
    assert report.chunks_deleted == 3  # drop's own 3 data chunks (rows)
    assert report.packs_deleted == 2  # drop's pack, now empty, and the unfinished upload's
    assert report.bytes_freed == 3 * CS + 3 * CS  # the two packs' sizes
    assert len(list((tmp_path / "store" / "packs").rglob("*.pack"))) == 1
    m = store.get_manifest(keep)
    b"".join(ImageReader(store, m).iter_range())  # still complete and verified
    with pytest.raises(StoreCorruption):
        store.get_manifest(drop)
    w.abort()


def test_dedup_hit_refreshes_grace(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    data = image_bytes(7, 4 * CS)
    push(store, data)
    age(store)
    # a new upload of the same content reuses (and touches) the old chunks
    w = ImageWriter(store)
    w.write(data)
    w.drain()
    report = collect(store, set(), grace_seconds=3600)
    assert report.manifests_deleted == 1  # the old manifest went: nothing protects the rows
    assert report.chunks_deleted == 0  # but the upload in progress touched them
    m = w.finish()
    assert w.stored_bytes == 0
    mid = store.put_manifest(m)
    assert b"".join(ImageReader(store, store.get_manifest(mid)).iter_range()) == data


def test_direct_io_used_and_falls_back_where_refused(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    disk = FilesystemBackend(tmp_path / "disk")
    store = ChunkStore(disk, StoreConfig(chunk_size=CS, direct_io=True))
    push(store, image_bytes(9, 8 * CS))
    assert disk._direct_ok  # /tmp is a disk filesystem here: O_DIRECT was used

    # A filesystem that refuses O_DIRECT (EINVAL at open, as e.g. FUSE mounts do).
    real_open = os.open

    def refusing_open(path: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr("rain.store.backends.fs.os.open", refusing_open)
    other = FilesystemBackend(tmp_path / "no-direct")
    store = ChunkStore(other, StoreConfig(chunk_size=CS, direct_io=True))
    data = image_bytes(8, 8 * CS)
    mid, stored = push(store, data)
    assert not other._direct_ok and stored > 0
    assert b"".join(ImageReader(store, store.get_manifest(mid)).iter_range()) == data


@pytest.mark.parametrize("spooled", [False, True])
def test_known_zeros_give_the_same_image_as_written_zeros(tmp_path: Path, spooled: bool) -> None:
    """write_zeros (the holes of a sparse upload) must be indistinguishable from zero bytes."""
    store = make_store(tmp_path)
    rnd = os.urandom
    # data, a zero run that ends mid-chunk, data, whole zero chunks, a trailing hole
    parts: list[bytes | int] = [rnd(CS + 100), CS * 2 + 50, rnd(7), CS * 5, rnd(CS), CS * 3 + 1]
    plain = b"".join(p if isinstance(p, bytes) else bytes(p) for p in parts)
    spool = open(tmp_path / "spool", "w+b") if spooled else None  # noqa: SIM115
    w = ImageWriter(store, spool=spool, blocks=2, block_chunks=2)
    for p in parts:
        if isinstance(p, bytes):
            w.write(p)
        else:
            w.write_zeros(p)
    m = w.finish()
    assert m.sha256 == hashlib.sha256(plain).hexdigest() and m.size == len(plain)
    ref = make_store(tmp_path / "ref")
    rw = ImageWriter(ref)
    rw.write(plain)
    assert m.chunks == rw.finish().chunks
    assert b"".join(ImageReader(store, m).iter_range()) == plain
    if spool is not None:
        spool.close()
        assert (tmp_path / "spool").read_bytes() == plain


def test_gc_says_what_the_grace_period_held_and_grace_0_frees_it(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    keep, _ = push(store, image_bytes(8, 8 * CS))
    drop, stored = push(store, image_bytes(9, 8 * CS))  # a deleted image, just pushed
    report = collect(store, {keep}, grace_seconds=3600)
    assert report.chunks_deleted == 0 and report.bytes_freed == 0
    assert report.chunks_kept == 3  # keep's own
    assert report.manifests_held == 1 and report.chunks_held == 3  # drop's
    assert report.bytes_held == stored
    assert report.held_until is not None
    assert time.time() + 3600 - 600 < report.held_until <= time.time() + 3600
    assert report.to_dict()["held_until"].endswith("+00:00")  # ISO 8601, UTC
    now = collect(store, {keep}, grace_seconds=0)
    assert now.manifests_deleted == 1 and now.chunks_deleted == 3 and now.bytes_freed > 0
    assert (now.manifests_held, now.chunks_held, now.bytes_held, now.held_until) == (
        0, 0, 0, None)
    with pytest.raises(StoreCorruption):
        store.get_manifest(drop)
