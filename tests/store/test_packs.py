"""Pack files and the chunk index: layout, commit protocol, dedup, gc and repack,
corruption, stores written before packs. Real files and a real SQLite index."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zstandard

from rain.model.errors import StoreCorruption
from rain.store import (
    ChunkStore,
    FilesystemBackend,
    ImageManifest,
    ImageReader,
    ImageWriter,
    StoreConfig,
    collect,
)
from rain.store.chunks import ZSTD_SUFFIX, chunk_key
from rain.store.packs import pack_key

CS = 64 * 1024
ROOT = Path(__file__).resolve().parents[2]


def make_store(root: Path, **kw: object) -> ChunkStore:
    return ChunkStore(FilesystemBackend(root), StoreConfig(chunk_size=CS, **kw))  # type: ignore[arg-type]


def push(store: ChunkStore, data: bytes) -> tuple[str, int]:
    w = ImageWriter(store)
    w.write(data)
    return store.put_manifest(w.finish()), w.stored_bytes


def pull(store: ChunkStore, mid: str, image: str = "") -> bytes:
    return b"".join(ImageReader(store, store.get_manifest(mid), image=image).iter_range())


def packs(root: Path) -> list[Path]:
    return sorted((root / "packs").rglob("*.pack"))


def rows(root: Path) -> list[tuple[bytes, str, int, int, int, int, float]]:
    with sqlite3.connect(root / "index.sqlite") as db:
        return list(db.execute("SELECT digest, pack, offset, length, stored, compressed, touched "
                               "FROM chunks ORDER BY pack, offset"))


def age_everything(root: Path, seconds: float = 7200) -> None:
    old = time.time() - seconds
    with sqlite3.connect(root / "index.sqlite") as db:
        db.execute("UPDATE chunks SET touched = ?", (old,))
    for sub in ("packs", "manifests", "chunks"):
        for path in (root / sub).rglob("*"):
            os.utime(path, (old, old))


def random_chunks(n: int) -> list[bytes]:
    return [os.urandom(CS) for _ in range(n)]


def test_round_trip_through_one_pack_per_upload(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = make_store(root)
    a = b"".join(random_chunks(10)) + bytes(3 * CS) + os.urandom(777)  # zeros, short tail
    b = b"".join(random_chunks(5))
    mid_a, stored_a = push(store, a)
    assert stored_a == 10 * CS + 777
    assert len(packs(root)) == 1 and not (root / "chunks").exists()
    mid_b, _ = push(store, b)
    assert len(packs(root)) == 2  # one file per upload, not one per chunk
    files = [p for p in root.rglob("*") if p.is_file()]
    assert len(files) <= 2 + 2 + 3  # packs, manifests, index.sqlite (+ -wal, -shm)
    # A re-push of known data writes no pack at all.
    mid_a2, stored = push(store, a)
    assert stored == 0 and mid_a2 == mid_a and len(packs(root)) == 2
    assert pull(store, mid_a) == a and pull(store, mid_b) == b
    # Each pack region is 4096-aligned for O_DIRECT; the short tail is padded.
    table = rows(root)
    assert len(table) == 16
    assert all(off % CS == 0 for _, _, off, *_ in table)
    assert sorted(p.stat().st_size for p in packs(root)) == [5 * CS, 10 * CS + 4096]


def test_identical_chunks_across_uploads_stored_once(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = make_store(root)
    base = random_chunks(12)
    push(store, b"".join(base))
    derived = list(base)
    derived[4] = os.urandom(CS)
    derived.append(base[0])  # a repeat inside the same image
    mid, stored = push(store, b"".join(derived))
    assert stored == CS
    assert len(rows(root)) == 13
    assert sum(p.stat().st_size for p in packs(root)) == 13 * CS  # bytes on disk, not just counters
    assert pull(store, mid) == b"".join(derived)
    # Within one upload too: the same new chunk 5 times is written once.
    twice = os.urandom(CS)
    _, stored = push(store, twice * 5)
    assert stored == CS and len(rows(root)) == 14


def test_concurrent_writers_committing_the_same_digest(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = make_store(root)
    data = b"".join(random_chunks(8))
    w1, w2 = ImageWriter(store), ImageWriter(store)
    w1.write(data)
    w2.write(data)
    w1.drain()
    w2.drain()  # neither sees the other's uncommitted chunks: both write them
    assert len(packs(root)) == 2
    m1 = w1.finish()
    age_everything(root)
    m2 = w2.finish()  # commits second: every digest is already indexed (INSERT … ON CONFLICT)
    # … and its commit refreshed them: its manifest, written next, references them.
    assert all(r[6] > time.time() - 60 for r in rows(root))
    assert w1.stored_bytes == w2.stored_bytes == 8 * CS
    mids = {store.put_manifest(m1), store.put_manifest(m2)}
    table = rows(root)
    assert len(table) == 8 and len({r[1] for r in table}) == 1  # all point at the winner's pack
    # The loser's pack holds only dead copies: gc removes it (here with no grace).
    report = collect(store, mids, grace_seconds=0)
    assert report.packs_deleted == 1 and report.chunks_deleted == 0
    assert len(packs(root)) == 1
    for mid in mids:
        assert pull(store, mid) == data

    # And truly at once: four threads pushing overlapping images into one store.
    shared = random_chunks(6)
    images = [b"".join(shared + random_chunks(2)) for _ in range(4)]
    results: dict[int, str] = {}

    def run(i: int) -> None:
        results[i] = push(store, images[i])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(rows(root)) == 8 + 6 + 4 * 2
    for i, mid in results.items():
        assert pull(store, mid) == images[i]


def test_abort_deletes_the_pack_at_once(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = make_store(root)
    w = ImageWriter(store)
    w.write(b"".join(random_chunks(5)))
    w.drain()
    assert len(packs(root)) == 1
    w.abort()
    assert packs(root) == [] and rows(root) == []
    # After finish (committed), abort must not delete: the rows may be shared by now.
    w = ImageWriter(store)
    w.write(b"".join(random_chunks(3)))
    w.finish()
    w.abort()
    assert len(packs(root)) == 1 and len(rows(root)) == 3


def test_crash_before_index_commit_leaves_a_pack_gc_removes_after_grace(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = make_store(root)
    keep, _ = push(store, b"".join(random_chunks(2)))
    crash = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from rain.store import ChunkStore, FilesystemBackend, ImageWriter, StoreConfig\n"
        f"store = ChunkStore(FilesystemBackend(Path({str(root)!r})),\n"
        f"                   StoreConfig(chunk_size={CS}))\n"
        "w = ImageWriter(store)\n"
        f"w.write(os.urandom({4 * CS}))\n"
        "w.drain()\n"
        "os._exit(0)  # dies between writing the pack and committing the index\n"
    )
    subprocess.run([sys.executable, "-c", crash], check=True, cwd=ROOT)
    assert len(packs(root)) == 2 and len(rows(root)) == 2
    orphan = next(p for p in packs(root) if p.stat().st_size == 4 * CS)
    report = collect(store, {keep}, grace_seconds=3600)
    assert report.packs_deleted == 0 and orphan.exists()  # young: could be an upload in progress
    old = time.time() - 7200
    os.utime(orphan, (old, old))
    report = collect(store, {keep}, grace_seconds=3600)
    assert report.packs_deleted == 1 and report.bytes_freed == 4 * CS
    assert not orphan.exists() and len(packs(root)) == 1
    assert len(pull(store, keep)) == 2 * CS


def test_pack_deleted_by_gc_before_commit_fails_the_upload(tmp_path: Path) -> None:
    """An upload slower than the grace period must fail, not commit rows into nothing."""
    root = tmp_path / "store"
    store = make_store(root)
    w = ImageWriter(store)
    w.write(b"".join(random_chunks(3)))
    w.drain()
    age_everything(root)
    assert collect(store, set(), grace_seconds=3600).packs_deleted == 1
    with pytest.raises(StoreCorruption, match="deleted before its upload committed"):
        w.finish()
    assert rows(root) == []


def test_gc_deletes_dead_rows_empty_packs_and_repacks(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = make_store(root)
    c = random_chunks(20)
    keep, _ = push(store, b"".join(c[0:4]))  # pack 1: stays whole
    push(store, b"".join(c[4:8]))  # pack 2: all dead → deleted
    push(store, b"".join(c[8:16]))  # pack 3: 2 of 8 stay live → repacked
    partly, _ = push(store, b"".join([c[8], c[9], *c[16:20]]))  # pack 4: its 4 new chunks
    sizes = {p: p.stat().st_size for p in packs(root)}
    assert len(sizes) == 4
    reader = ImageReader(store, store.get_manifest(partly), image="partly")
    assert b"".join(reader.iter_range()) == b"".join([c[8], c[9], *c[16:20]])  # fds now cached
    age_everything(root)
    report = collect(store, {keep, partly}, grace_seconds=3600)
    assert report.manifests_deleted == 2
    assert report.chunks_deleted == 4 + 6
    assert report.packs_deleted == 1 and report.packs_repacked == 1
    assert report.bytes_repacked == 2 * CS
    assert report.bytes_freed == 4 * CS + (8 * CS - 2 * CS)
    after = packs(root)
    assert len(after) == 3
    assert sum(p.stat().st_size for p in after) == sum(sizes.values()) - report.bytes_freed
    assert {r[0] for r in rows(root)} == {hashlib.sha256(x).digest()
                                           for x in [*c[0:4], c[8], c[9], *c[16:20]]}
    # Every live image reads back bit-exact: through the moved rows, and through the
    # reader whose cached fd pointed into the old pack.
    assert pull(store, keep) == b"".join(c[0:4])
    assert b"".join(reader.iter_range()) == b"".join([c[8], c[9], *c[16:20]])
    fresh = make_store(root)
    assert pull(fresh, partly) == b"".join([c[8], c[9], *c[16:20]])
    # Nothing left to do: a second run changes nothing.
    again = collect(store, {keep, partly}, grace_seconds=3600)
    assert (again.chunks_deleted, again.packs_deleted, again.packs_repacked) == (0, 0, 0)


def test_gc_deletes_nothing_when_a_manifest_is_unreadable(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = make_store(root)
    keep, _ = push(store, b"".join(random_chunks(2)))
    age_everything(root)
    next((root / "manifests").rglob(keep)).write_bytes(b"garbage")
    report = collect(store, {keep}, grace_seconds=0)
    assert report.chunks_deleted == 0 and report.packs_deleted == 0
    assert len(rows(root)) == 2 and len(packs(root)) == 1


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))


def test_flipped_byte_in_a_pack_names_image_and_chunk(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = make_store(root)
    data = b"".join(random_chunks(6))
    mid, _ = push(store, data)
    m = store.get_manifest(mid)
    victim = m.chunks[3]
    loc = store.index.lookup(victim)
    assert loc is not None
    flip(root / pack_key(loc.pack), loc.offset + CS - 1)
    reader = ImageReader(store, m, image="img-9")
    with pytest.raises(StoreCorruption,
                       match=f"^chunk {victim.hex()} of image img-9 is corrupt"):
        b"".join(reader.iter_range())
    assert b"".join(reader.iter_range(0, 3 * CS)) == data[: 3 * CS]  # the others are fine
    # gc does not copy a corrupt chunk into a new pack: it leaves the evidence.
    with sqlite3.connect(root / "index.sqlite") as db:
        db.execute("DELETE FROM chunks WHERE digest != ?", (victim,))
    report = collect(store, {mid}, grace_seconds=3600)
    assert report.corrupt_chunks == 1 and report.packs_repacked == 0


def test_truncated_or_missing_pack_is_corruption(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = make_store(root)
    mid, _ = push(store, b"".join(random_chunks(4)))
    m = store.get_manifest(mid)
    path = packs(root)[0]
    os.truncate(path, 3 * CS + 10)
    with pytest.raises(StoreCorruption, match=f"chunk {m.chunks[3].hex()} of image t is corrupt "
                                              r"\(pack .* is truncated\)"):
        pull(store, mid, image="t")
    path.unlink()
    with pytest.raises(StoreCorruption, match=f"chunk {m.chunks[0].hex()} of image t is missing"):
        pull(store, mid, image="t")
    assert not store.has_chunk(b"\x01" * 32) and store.has_chunk(m.chunks[0])


def test_store_with_loose_chunk_files_still_works(tmp_path: Path) -> None:
    """A store written before packs: chunks/ab/<hex>[.zst], no index rows."""
    root = tmp_path / "store"
    backend = FilesystemBackend(root)
    chunks = [*random_chunks(3), b"old text " * (CS // 9) + b"x" * (CS % 9)]
    digests = [hashlib.sha256(x).digest() for x in chunks]
    for d, x in zip(digests[:3], chunks[:3], strict=True):
        backend.put(chunk_key(d), x)
    backend.put(chunk_key(digests[3]) + ZSTD_SUFFIX, zstandard.ZstdCompressor().compress(chunks[3]))
    data = b"".join(chunks)
    manifest = ImageManifest(CS, len(data), hashlib.sha256(data).hexdigest(), digests)
    store = make_store(root)
    mid = store.put_manifest(manifest)
    assert pull(store, mid) == data
    assert all(store.has_chunk(d) for d in digests)
    assert {d for d, _ in store.list_chunks()} == set(digests)
    # New uploads dedup against loose chunks (and touch them), writing only what is new.
    age_everything(root)
    extra = os.urandom(CS)
    w = ImageWriter(store)
    w.write(chunks[0] + chunks[3] + extra)
    new = store.put_manifest(w.finish())
    assert w.stored_bytes == CS and len(rows(root)) == 1
    assert (root / chunk_key(digests[0])).stat().st_mtime > time.time() - 60  # touched
    # gc still collects loose chunks: only the old image's chunks 1 and 2 were left untouched.
    report = collect(store, {new}, grace_seconds=3600)
    assert report.chunks_deleted == 2 and report.manifests_deleted == 1
    assert report.bytes_freed == 2 * CS
    assert pull(store, new) == chunks[0] + chunks[3] + extra
    store.delete_chunk(digests[0])
    assert not store.has_chunk(digests[0])


def test_compressed_chunks_in_packs(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = make_store(root, compress=True)
    text = b"hello, rain 2026" * (3 * CS // 16)
    noise = os.urandom(2 * CS)
    data = text + noise + text[:1000]
    mid, stored = push(store, data)
    table = rows(root)
    # the text chunk (three identical ones: one row) and the tail, not the noise
    assert sorted(r[5] for r in table) == [0, 0, 1, 1]
    comp = [r for r in table if r[5]]
    assert all(r[4] < r[3] // 8 for r in comp)  # stored much smaller than the chunk
    assert stored == sum(r[4] for r in table)
    assert packs(root)[0].stat().st_size < 2 * CS + 3 * 4096
    assert pull(store, mid) == data
    # A flipped byte in compressed data is caught too.
    d, pack, off, _, _, _, _ = comp[0]
    flip(root / pack_key(pack), off + 10)
    with pytest.raises(StoreCorruption, match=f"chunk {d.hex()} of image z is corrupt"):
        pull(store, mid, image="z")


def test_bare_put_chunk_is_committed_by_put_manifest(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = make_store(root)
    data = os.urandom(CS)
    digest = hashlib.sha256(data).digest()
    assert store.put_chunk(digest, data) == CS
    assert store.put_chunk(digest, data) == 0
    assert rows(root) == []  # not yet committed
    mid = store.put_manifest(ImageManifest(CS, CS, hashlib.sha256(data).hexdigest(), [digest]))
    assert len(rows(root)) == 1 and pull(store, mid) == data


def open_fds_to(path_part: str) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if path_part in target:
            out.append(target)
    return out


def _target(fd: str) -> str | None:
    try:  # other threads open and close files meanwhile (finished threads' index connections)
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def test_pack_is_written_with_o_direct(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = make_store(root)
    data = b"".join(random_chunks(16))  # one whole block of the writer: dispatched at once
    w = ImageWriter(store)
    w.write(data)
    w.drain()
    pack = str(packs(root)[0])
    fd = next(fd for fd in os.listdir("/proc/self/fd") if _target(fd) == pack)
    with open(f"/proc/self/fdinfo/{fd}") as f:
        flags = int(next(line.split()[1] for line in f if line.startswith("flags:")), 8)
    assert isinstance(store.backend, FilesystemBackend)
    if not store.backend._direct_ok:
        pytest.skip("this filesystem refuses O_DIRECT")
    assert flags & os.O_DIRECT
    mid = store.put_manifest(w.finish())
    assert open_fds_to(pack) == []  # closed once committed
    assert pull(store, mid) == data


def test_reader_with_a_stale_location_looks_again_once(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = make_store(root)
    c = random_chunks(2)
    digest = hashlib.sha256(c[0]).digest()
    push(store, c[0] + c[1])
    only_c0 = store.put_manifest(ImageManifest(CS, CS, hashlib.sha256(c[0]).hexdigest(),
                                               [digest]))
    stale = store.index.lookup(digest)
    assert stale is not None
    age_everything(root)
    report = collect(store, {only_c0}, grace_seconds=3600, repack_below=0.6)  # half dead
    assert report.packs_repacked == 1 and report.chunks_deleted == 1
    moved = store.index.lookup(digest)
    assert moved is not None and moved.pack != stale.pack
    assert not (root / pack_key(stale.pack)).exists()
    # A read that looked the chunk up before the repack finds the old pack gone, looks
    # again and reads the new copy; if the row is gone too, that is a missing chunk.
    assert store._read_packed(digest, stale, "chunk x") == c[0]
    with sqlite3.connect(root / "index.sqlite") as db:
        db.execute("DELETE FROM chunks WHERE digest = ?", (digest,))
    with pytest.raises(StoreCorruption, match="chunk x is missing"):
        store._read_packed(digest, stale, "chunk x")


def test_cached_fd_of_a_pack_deleted_elsewhere_is_released(tmp_path: Path) -> None:
    """A server's fd cache must not pin the space of packs a separate gc process removed."""
    root = tmp_path / "store"
    server = make_store(root)
    assert isinstance(server.backend, FilesystemBackend)
    server.backend._readers.sweep_seconds = 0
    c = random_chunks(5)
    keep, _ = push(server, c[0])
    drop, _ = push(server, b"".join(c[1:5]))
    assert len(pull(server, drop)) == 4 * CS  # caches an fd of drop's pack
    dropped = next(p for p in packs(root) if p.stat().st_size == 4 * CS)
    assert open_fds_to(str(dropped))
    gc_process = make_store(root)  # another ChunkStore, as `rain gc` in its own process
    age_everything(root)
    assert collect(gc_process, {keep}, grace_seconds=3600).packs_deleted == 1
    assert not dropped.exists()
    assert pull(server, keep) == c[0]  # any read sweeps the cache
    assert open_fds_to(str(dropped)) == []
