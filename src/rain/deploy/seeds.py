"""Images as plain files on the repository, for senders that need one (a BitTorrent seed,
udp-sender): materialised once from the chunk store, kept within a byte budget.

Files are named by the image's SHA-256, written under a temp name and renamed
when complete, so a crash never leaves a half file under a real name; the
least recently used files go when the budget is exceeded (never one in use
by a running deployment: callers hold it with `use`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rain.store.manifest import ImageManifest

TMP = ".tmp-"


class SeedFiles:
    def __init__(self, root: Path, capacity: int) -> None:
        self.root = root
        self.capacity = capacity
        self._lock = threading.Lock()
        self._making: dict[str, threading.Lock] = {}
        self._in_use: dict[str, int] = {}
        root.mkdir(parents=True, exist_ok=True)
        for p in root.glob(f"{TMP}*"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def path(self, manifest: ImageManifest, write: Callable[[Path], None]) -> Path:
        """The image as a file (made now by `write`, e.g. Repository.write_sparse, if it
        is not there yet)."""
        final = self.root / manifest.sha256
        with self._lock:
            lock = self._making.setdefault(manifest.sha256, threading.Lock())
        with lock:
            if final.exists():
                os.utime(final)
                return final
            tmp = self.root / f"{TMP}{manifest.sha256}.{os.getpid()}.{threading.get_ident()}"
            try:
                write(tmp)
                os.replace(tmp, final)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        self._trim(keep=manifest.sha256)
        return final

    @contextmanager
    def use(self, sha256: str) -> Iterator[None]:
        with self._lock:
            self._in_use[sha256] = self._in_use.get(sha256, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._in_use[sha256] -= 1
                if not self._in_use[sha256]:
                    del self._in_use[sha256]

    def _trim(self, keep: str) -> None:
        files = [p for p in self.root.iterdir() if not p.name.startswith(TMP)]
        used = sum(p.stat().st_blocks * 512 for p in files)
        for p in sorted(files, key=lambda p: p.stat().st_mtime):
            if used <= self.capacity:
                break
            with self._lock:
                busy = p.name == keep or p.name in self._in_use
            if busy:
                continue
            used -= p.stat().st_blocks * 512
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def touch(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.root / sha256, (time.time(), time.time()))
