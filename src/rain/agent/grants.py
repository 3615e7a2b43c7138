"""Which images each peer token lets other nodes read from this one.

A deployment's peer token reaches a node two ways: in the repository's fetch
request (the node is one of the deployment's), or in a grant (the node is a
*holder*: it caches the image and the `chunks` method lists it as a source for
the deployment's nodes). Either way the token covers only that deployment's
image, for `seconds` after its last grant: a node serves a token's bearer the
chunks of those images and nothing else it holds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Grant:
    expires: float
    images: set[str] = field(default_factory=set)


class PeerGrants:
    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._grants: dict[str, _Grant] = {}
        self._lock = threading.Lock()

    def grant(self, token: str, image_id: str) -> float:
        """Let bearers of `token` read `image_id` (again); returns the seconds it lasts."""
        with self._lock:
            entry = self._grants.setdefault(token, _Grant(0.0))
            entry.expires = self._clock() + self.seconds
            entry.images.add(image_id)
        return self.seconds

    def revoke(self, token: str) -> bool:
        with self._lock:
            return self._grants.pop(token, None) is not None

    def images(self, token: str) -> frozenset[str] | None:
        """The images `token` covers, or None for a token unknown here or expired."""
        now = self._clock()
        with self._lock:
            for t in [t for t, g in self._grants.items() if g.expires < now]:
                del self._grants[t]
            entry = self._grants.get(token)
            return None if entry is None else frozenset(entry.images)
