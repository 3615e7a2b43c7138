"""Repository policy settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RepoConfig:
    # Largest virtual disk an uploaded image may declare (qcow2 can claim exabytes).
    max_virtual_size: int = 4 * 1024**4
    # Let unauthenticated clients read public images.
    anonymous_read: bool = False
    # Seconds an unreferenced chunk survives before gc may delete it.
    gc_grace_seconds: float = 6 * 3600
    # Quotas for new users (None: unlimited).
    default_quota_bytes: int | None = None
    default_quota_images: int | None = None
    # CPU seconds / bytes of memory qemu-img may use on an untrusted image.
    inspect_cpu_seconds: int = 30
    inspect_memory_bytes: int = 1024**3
    # A node whose agent has not reported for this long is down (agents beat every few s).
    node_timeout_seconds: float = 15.0
