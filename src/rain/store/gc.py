"""Garbage collection: delete what no live manifest references, repack the rest.

The caller (the repository) says which manifests are live. Anything else —
manifests of deleted images, chunks of killed uploads — goes, but only once it
is older than the grace period: an upload in progress writes its pack (whose
mtime moves) and refreshes the index rows of its dedup hits as it goes, and
commits its rows with a fresh `touched` time, so everything it needs stays
younger than the grace period until its manifest commits.

In order: unreferenced index rows untouched since the cutoff are deleted
(the `touched` test is repeated inside the delete, so a dedup hit racing gc
wins); then loose chunk objects of old stores, as before packs; then packs:
one with no rows left is deleted once its mtime is older than the cutoff (a
crashed or abandoned upload; a pack being written keeps a young mtime), and
one whose rows hold less than `repack_below` of its bytes is repacked — its
live chunks, verified, are copied into a new pack, the rows are moved there in
one durable transaction, and the old pack is deleted. Readers that looked a
chunk up just before the move find the old pack gone and look again.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import zstandard

from rain.model.errors import StoreCorruption
from rain.store.chunks import ChunkStore
from rain.store.index import ChunkIndex, Location
from rain.store.packs import PACK_PREFIX, PackWriter, Piece, pack_id_of, pack_key

REPACK_BELOW = 0.5  # repack a pack once less than half of its bytes are live
_REPACK_BATCH = 8 * 1024 * 1024


@dataclass
class GcReport:
    manifests_deleted: int = 0
    chunks_deleted: int = 0  # index rows and loose chunk objects
    bytes_freed: int = 0  # disk bytes released (deleted packs and objects − new packs)
    chunks_kept: int = 0
    temporaries_deleted: int = 0
    packs_deleted: int = 0  # no rows left (or never committed)
    packs_repacked: int = 0
    bytes_repacked: int = 0  # live bytes copied into new packs
    packs_kept: int = 0
    corrupt_chunks: int = 0  # found while repacking; that pack is left as it is
    # What only the grace period kept: no live image needs it, but it is younger than
    # `grace_seconds` (a deleted image's data, an upload in progress or abandoned).
    grace_seconds: float = 0.0
    manifests_held: int = 0
    chunks_held: int = 0
    bytes_held: int = 0  # their stored bytes (rows, loose chunks and packs without rows)
    held_until: float | None = None  # when the youngest of them is old enough to go

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.__dict__)
        if self.held_until is not None:
            out["held_until"] = datetime.fromtimestamp(self.held_until, UTC).isoformat(
                timespec="seconds")
        return out

    def hold(self, mtime: float, nbytes: int = 0, *, chunk: bool = True) -> None:
        self.chunks_held += chunk
        self.bytes_held += nbytes
        until = mtime + self.grace_seconds
        self.held_until = until if self.held_until is None else max(self.held_until, until)


def collect(store: ChunkStore, live_manifests: set[str], *, grace_seconds: float,
            repack_below: float = REPACK_BELOW) -> GcReport:
    report = GcReport(grace_seconds=grace_seconds)
    cutoff = time.time() - grace_seconds
    referenced: set[bytes] = set()
    young: dict[str, float] = {}  # not live, but may belong to a commit in progress
    for mid, info in list(store.list_manifests()):
        if mid in live_manifests:
            continue
        if info.mtime < cutoff:
            store.delete_manifest(mid)
            report.manifests_deleted += 1
        else:
            young[mid] = info.mtime
    held: dict[bytes, float] = {}  # chunks only young manifests need → the newest one's mtime
    try:
        for mid in live_manifests:
            referenced |= store.get_manifest(mid).unique_digests()
        for mid, mtime in young.items():
            for digest in store.get_manifest(mid).unique_digests() - referenced:
                held[digest] = max(held.get(digest, 0.0), mtime)
    except StoreCorruption:
        # Never delete chunks because a manifest could not be read: that would
        # turn one corrupt object into a lost image.
        return report
    report.manifests_held = len(young)
    for mtime in young.values():
        report.hold(mtime, chunk=False)
    dead: list[bytes] = []
    for digest, loc, touched in store.index.rows():
        if digest in referenced:
            report.chunks_kept += 1
        elif digest in held or touched >= cutoff:
            report.hold(max(touched, held.get(digest, 0.0)), loc.stored)
        else:
            dead.append(digest)
    report.chunks_deleted += store.index.delete_untouched(dead, cutoff)
    for digest, info in list(store.list_loose_chunks()):
        if digest in referenced:
            report.chunks_kept += 1
        elif digest in held or info.mtime >= cutoff:
            report.hold(max(info.mtime, held.get(digest, 0.0)), info.size)
        else:
            store.delete_chunk(digest)
            report.chunks_deleted += 1
            report.bytes_freed += info.size
    _collect_packs(store, cutoff, repack_below, report)
    cleaner = getattr(store.backend, "remove_stale_temporaries", None)
    if cleaner is not None:
        report.temporaries_deleted = cleaner(cutoff)
    return report


def _collect_packs(store: ChunkStore, cutoff: float, repack_below: float,
                   report: GcReport) -> None:
    usage = store.index.pack_usage()
    for info in list(store.backend.list(PACK_PREFIX)):
        pack = pack_id_of(info.key)
        if pack is None:
            continue
        rows, live = usage.get(pack, (0, 0))
        if rows == 0:
            if info.mtime < cutoff and _delete_if_empty(store, pack, cutoff):
                report.packs_deleted += 1
                report.bytes_freed += info.size
            else:
                report.packs_kept += 1
                if info.mtime >= cutoff:
                    report.hold(info.mtime, info.size, chunk=False)
        elif live < repack_below * info.size:
            _repack(store, pack, info.size, report)
        else:
            report.packs_kept += 1


def _delete_if_empty(store: ChunkStore, pack: str, cutoff: float | None) -> bool:
    """Delete a pack without rows, under the index write lock: its writer checks
    that the pack still exists under the same lock before committing rows."""
    key = pack_key(pack)
    with store.index.write_lock() as db:
        if ChunkIndex.pack_rows(db, pack):
            return False
        info = store.backend.stat(key)
        if info is None or (cutoff is not None and info.mtime >= cutoff):
            return False
        store.backend.delete(key)
    return True


def _intact(store: ChunkStore, digest: bytes, loc: Location, raw: bytes) -> bool:
    if len(raw) != loc.stored:
        return False
    data = raw
    if loc.compressed:
        try:
            data = zstandard.ZstdDecompressor().decompress(raw, max_output_size=loc.length)
        except zstandard.ZstdError:
            return False
    return len(data) == loc.length and hashlib.sha256(data).digest() == digest


def _repack(store: ChunkStore, pack: str, size: int, report: GcReport) -> None:
    """Copy the pack's rows (verified) into a new pack, move them, delete the old one."""
    rows = store.index.rows_in_pack(pack)
    new = PackWriter(store.backend, store.index, direct=False)
    new.claim([d for d, _ in rows])
    batch: list[Piece] = []
    batch_bytes = 0
    try:
        for digest, loc in rows:
            try:
                raw = store.backend.read_range(pack_key(pack), loc.offset, loc.stored)
            except KeyError:  # another gc got there first
                new.abort()
                return
            if not _intact(store, digest, loc, raw):
                report.corrupt_chunks += 1
                new.abort()  # leave the evidence; reads of that chunk report it
                return
            batch.append(Piece(digest, raw, loc.length, loc.compressed))
            batch_bytes += len(raw)
            if batch_bytes >= _REPACK_BATCH:
                new.append(batch)
                batch, batch_bytes = [], 0
        new.append(batch)
        moved = new.commit_moved(pack)
    except BaseException:
        new.abort()
        raise
    report.packs_repacked += 1
    report.bytes_repacked += new.size
    added = new.size
    if moved == 0 and _delete_if_empty(store, new.pack_id, None):
        added = 0  # a concurrent gc moved them first: the copy is not needed
    removed = size if _delete_if_empty(store, pack, None) else 0
    report.bytes_freed += removed - added
