"""An image being assembled on a node from verified chunks, readable while it fills.

Every transfer method ends in the same place: a file of the image's size on
the node, filled chunk by chunk, where each chunk is checked against the
SHA-256 digest the repository's manifest gives for it *before* it counts as
present. Chunks are the store's (256 KiB by default), so the manifest a node
fetches once (32 bytes a chunk) is all it needs to verify bytes from any
source: the repository, a tree parent, a BitTorrent swarm, a multicast
stream, or another cached image on the same node.

Present chunks can be read while others are still missing (`wait`/`read`),
which is what lets a tree node forward data to its children while it is
still receiving it. All-zero chunks (ZERO_DIGEST) are present from the start:
the file is created sparse and they are never moved at all.

A complete PartialImage is byte-for-byte the image the manifest describes,
so its whole-image SHA-256 is the manifest's (collision resistance of
SHA-256), and the node cache admits it without hashing it a second time.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from rain.model.errors import InvalidImage, RainError
from rain.store.manifest import ZERO_DIGEST, ImageManifest

_READ_BLOCK = 4 * 1024 * 1024


class BadChunk(InvalidImage):
    """A chunk's bytes do not match its digest (or its length): the source is bad."""

    code = "bad_chunk"

    def __init__(self, index: int, source: str = "") -> None:
        where = f" from {source}" if source else ""
        super().__init__(f"chunk {index} received{where} does not match its SHA-256 digest",
                         details={"index": index, "source": source})
        self.index = index
        self.source = source


class TransferAborted(RainError):
    """The image will not complete here (cancelled, or failed for good)."""

    code = "transfer_aborted"


class PartialImage:
    """The file at `path`, of `manifest.size` bytes, and which of its chunks are verified."""

    def __init__(self, path: Path, manifest: ImageManifest, *, create: bool = True) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.size = manifest.size
        self.chunk_size = manifest.chunk_size
        self.count = len(manifest.chunks)
        self._present = bytearray(self.count)
        self._missing = 0
        for i, digest in enumerate(manifest.chunks):
            if digest == ZERO_DIGEST:
                self._present[i] = 1
            else:
                self._missing += 1
        self._cond = threading.Condition()
        self._failure: BaseException | None = None
        flags = (os.O_RDWR | os.O_CREAT | os.O_TRUNC) if create else os.O_RDONLY
        self._fd = os.open(self.path, flags, 0o600)
        if create:
            os.ftruncate(self._fd, self.size)

    @classmethod
    def of_cached(cls, path: Path, manifest: ImageManifest) -> PartialImage:
        """A complete image the node cache already verified, opened for serving to peers."""
        image = cls(path, manifest, create=False)
        image._present = bytearray(b"\x01") * image.count
        image._missing = 0
        return image

    # -- queries ---------------------------------------------------------------
    def chunk_length(self, index: int) -> int:
        return self.manifest.chunk_length(index)

    def present(self, index: int) -> bool:
        return bool(self._present[index])

    def is_zero(self, index: int) -> bool:
        return self.manifest.chunks[index] == ZERO_DIGEST

    @property
    def missing_count(self) -> int:
        return self._missing

    @property
    def complete(self) -> bool:
        return self._missing == 0

    def missing(self, indices: Iterable[int] | None = None) -> list[int]:
        """Indices not yet verified, in order (of `indices`, or of the whole image)."""
        pool = range(self.count) if indices is None else indices
        return [i for i in pool if not self._present[i]]

    def data_bytes(self) -> int:
        """Bytes of non-zero chunks: what a transfer has to move at most."""
        return sum(self.chunk_length(i) for i, d in enumerate(self.manifest.chunks)
                   if d != ZERO_DIGEST)

    # -- filling -----------------------------------------------------------------
    def put(self, index: int, data: bytes | bytearray | memoryview, source: str = "") -> bool:
        """Verify and write chunk `index`; False if it was already present.

        Raises BadChunk (and writes nothing) when the bytes do not match the
        manifest: the caller drops that source and gets the chunk elsewhere.
        """
        if self._present[index]:
            return False
        if len(data) != self.chunk_length(index) or \
                hashlib.sha256(data).digest() != self.manifest.chunks[index]:
            raise BadChunk(index, source)
        os.pwrite(self._fd, data, index * self.chunk_size)
        return self._mark(index)

    def verify_file(self, indices: Iterable[int] | None = None, *,
                    zeros: bool = False) -> list[int]:
        """Check chunks that something else wrote into the file; returns the bad ones.

        For tools that write the file themselves (udp-receiver, libtorrent):
        each listed (default: every missing) chunk is read back and marked
        present if it matches its digest. With `zeros`, the zero chunks —
        present from the start, so a tool may have overwritten them — are
        checked too, and anything found there is zeroed again (their content
        is known, so they are repaired here rather than reported).
        """
        bad: list[int] = []
        todo = self.missing(indices)
        buf = bytearray(self.chunk_size)
        for i in todo:
            n = self.chunk_length(i)
            view = memoryview(buf)[:n]
            got = os.preadv(self._fd, [view], i * self.chunk_size)
            if got == n and hashlib.sha256(view).digest() == self.manifest.chunks[i]:
                self._mark(i)
            else:
                bad.append(i)
        if zeros:
            for i, digest in enumerate(self.manifest.chunks):
                if digest != ZERO_DIGEST:
                    continue
                n = self.chunk_length(i)
                view = memoryview(buf)[:n]
                got = os.preadv(self._fd, [view], i * self.chunk_size)
                if got != n or view.tobytes().count(0) != n:
                    os.pwrite(self._fd, bytes(n), i * self.chunk_size)
        return bad

    def _mark(self, index: int) -> bool:
        with self._cond:
            if self._present[index]:
                return False
            self._present[index] = 1
            self._missing -= 1
            self._cond.notify_all()
            return True

    # -- reading while filling -------------------------------------------------------
    def wait(self, index: int, timeout: float | None = None) -> bool:
        """Block until chunk `index` is present (True) or `timeout` passes (False).

        Raises TransferAborted once the image has failed here.
        """
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._present[index] or self._failure is not None, timeout)
            if self._present[index]:
                return True
            if self._failure is not None:
                raise TransferAborted(f"the image stopped arriving: {self._failure}")
            return bool(ok) and bool(self._present[index])

    def wait_complete(self, timeout: float | None = None) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: self._missing == 0 or self._failure is not None,
                                timeout)
            if self._failure is not None and self._missing:
                raise TransferAborted(f"the image stopped arriving: {self._failure}")
            return self._missing == 0

    def read(self, index: int) -> bytes:
        """The bytes of a present chunk (zeros for a zero chunk)."""
        if not self._present[index]:
            raise RainError(f"chunk {index} is not here yet")
        n = self.chunk_length(index)
        if self.is_zero(index):
            return bytes(n)
        return os.pread(self._fd, n, index * self.chunk_size)

    def fail(self, exc: BaseException) -> None:
        """No more data will come: wake everyone waiting (readers get TransferAborted)."""
        with self._cond:
            if self._failure is None:
                self._failure = exc
            self._cond.notify_all()

    @property
    def failure(self) -> BaseException | None:
        return self._failure

    # -- the end ---------------------------------------------------------------------
    def sync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def fileno(self) -> int:
        return self._fd

    def __enter__(self) -> PartialImage:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def chunk_digest_index(manifest: ImageManifest) -> dict[bytes, int]:
    """First chunk index of every non-zero digest in `manifest`."""
    index: dict[bytes, int] = {}
    for i, digest in enumerate(manifest.chunks):
        if digest != ZERO_DIGEST and digest not in index:
            index[digest] = i
    return index
