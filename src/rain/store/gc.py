"""Garbage collection: delete what no live manifest references.

The caller (the repository) says which manifests are live. Anything else —
manifests of deleted images, chunks of killed uploads — goes, but only once it
is older than the grace period: an upload in progress writes (or, on a dedup
hit, touches) its chunks as it goes, so its chunks are always younger than the
grace period until its manifest commits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rain.model.errors import StoreCorruption
from rain.store.chunks import ChunkStore


@dataclass
class GcReport:
    manifests_deleted: int = 0
    chunks_deleted: int = 0
    bytes_freed: int = 0
    chunks_kept: int = 0
    temporaries_deleted: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def collect(store: ChunkStore, live_manifests: set[str], *, grace_seconds: float) -> GcReport:
    report = GcReport()
    cutoff = time.time() - grace_seconds
    referenced: set[bytes] = set()
    for mid, info in list(store.list_manifests()):
        if mid in live_manifests:
            continue
        if info.mtime < cutoff:
            store.delete_manifest(mid)
            report.manifests_deleted += 1
        else:
            live_manifests = live_manifests | {mid}  # young: may belong to a commit in progress
    for mid in live_manifests:
        try:
            referenced |= store.get_manifest(mid).unique_digests()
        except StoreCorruption:
            # Never delete chunks because a manifest could not be read: that would
            # turn one corrupt object into a lost image.
            return report
    for digest, info in list(store.list_chunks()):
        if digest in referenced:
            report.chunks_kept += 1
        elif info.mtime < cutoff:
            store.delete_chunk(digest)
            report.chunks_deleted += 1
            report.bytes_freed += max(info.size - 1, 0)
    cleaner = getattr(store.backend, "remove_stale_temporaries", None)
    if cleaner is not None:
        report.temporaries_deleted = cleaner(cutoff)
    return report
