"""Uploads in progress: at most so many per user, and so many on the server.

An upload holds a worker, buffers and a core for as long as it takes — a
sparse upload declaring a terabyte of zeros takes a quarter of an hour of
SHA-256 (docs/architecture.md) — so one user must not start them without
bound. The count is per server process (in memory, nothing to go stale when a
server dies); several servers behind a load balancer each apply it.
"""

from __future__ import annotations

import threading
from collections import Counter

from rain.model.errors import Conflict, TooManyRequests
from rain.repo.config import RepoConfig

RETRY_AFTER = 5  # seconds a refused client is told to wait


class UploadSlots:
    def __init__(self, config: RepoConfig) -> None:
        self.config = config  # read at each acquire: limits can change while serving
        self._lock = threading.Lock()
        self._owner: dict[str, str] = {}  # image id → the user uploading it
        self._by_user: Counter[str] = Counter()

    def acquire(self, user: str, image_id: str) -> None:
        """Count the upload of `image_id` by `user`, or refuse it (429 with Retry-After;
        409 if that image is being uploaded already)."""
        per_user, total = self.config.max_uploads_per_user, self.config.max_uploads
        with self._lock:
            if image_id in self._owner:
                raise Conflict(f"image {image_id} is being uploaded already: images are "
                               "write-once, push a new image instead")
            if per_user and self._by_user[user] >= per_user:
                raise TooManyRequests(
                    f"user {user!r} already has {self._by_user[user]} uploads in progress, "
                    f"the most this server allows at once ([repo] max_uploads_per_user = "
                    f"{per_user}); push again when one has finished", retry_after=RETRY_AFTER)
            if total and len(self._owner) >= total:
                raise TooManyRequests(
                    f"this server has {len(self._owner)} uploads in progress, the most it "
                    f"allows at once ([repo] max_uploads = {total}); push again shortly",
                    retry_after=RETRY_AFTER)
            self._owner[image_id] = user
            self._by_user[user] += 1

    def release(self, image_id: str) -> None:
        with self._lock:
            user = self._owner.pop(image_id, None)
            if user is not None:
                self._by_user[user] -= 1
                if not self._by_user[user]:
                    del self._by_user[user]

    def active(self, user: str | None = None) -> int:
        with self._lock:
            return len(self._owner) if user is None else self._by_user[user]
