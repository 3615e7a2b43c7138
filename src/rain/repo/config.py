"""Repository policy settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RepoConfig:
    # Largest virtual disk an uploaded image may declare (qcow2 can claim exabytes).
    max_virtual_size: int = 4 * 1024**4
    # Largest image an upload may be, in bytes of the image itself (the file: what is
    # hashed, chunked and pulled), whatever its format; Glance's `image_size_cap`.
    # Refused (413) from the declared size before any work, and as bytes arrive.
    max_image_size: int = 1024**4
    # Uploads in progress at once, per user and on this server process (0: no limit);
    # more are refused with 429 and Retry-After.
    max_uploads_per_user: int = 4
    max_uploads: int = 32
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
