"""The torrent of an image, made from the chunk store without an extra copy.

A v1, single-file, private torrent: its piece SHA-1s are computed by
streaming the image's verified chunks (ImageReader) once; pieces made only of
zero chunks are never read (their hash is the hash of zeros). The info dict
holds nothing that varies between runs (no tracker, no date), so the same
image always has the same info hash; trackers and web seeds are given to
nodes per deployment, outside the info dict.

The stored .torrent also names the manifest it was made from
(`rain-manifest`, outside the info dict): an image rebuilt with different
bytes gets a new torrent instead of a stale one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rain.distribute.methods.bittorrent.config import BitTorrentConfig
from rain.store.manifest import ZERO_DIGEST, ImageManifest

if TYPE_CHECKING:
    from rain.distribute.methods.base import ImageRepository
    from rain.model import Image
    from rain.store.stream import ImageReader

log = logging.getLogger("rain.distribute.bittorrent")
MiB = 1 << 20
MIN_PIECE = 4 * MiB


# -- bencoding -------------------------------------------------------------------------
def bencode(value: Any) -> bytes:
    out: list[bytes] = []
    _bencode(value, out)
    return b"".join(out)


def _bencode(value: Any, out: list[bytes]) -> None:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        out.append(b"i%de" % value)
    elif isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        out.append(b"%d:" % len(data))
        out.append(data)
    elif isinstance(value, str):
        _bencode(value.encode(), out)
    elif isinstance(value, list | tuple):
        out.append(b"l")
        for item in value:
            _bencode(item, out)
        out.append(b"e")
    elif isinstance(value, dict):
        out.append(b"d")
        items = [(k.encode() if isinstance(k, str) else bytes(k), v) for k, v in value.items()]
        for key, item in sorted(items):
            _bencode(key, out)
            _bencode(item, out)
        out.append(b"e")
    else:
        raise TypeError(f"cannot bencode {type(value).__name__}")


def bdecode(data: bytes) -> Any:
    """The value of a bencoded string (dict keys and strings stay bytes)."""
    value, end = _bdecode(data, 0)
    if end != len(data):
        raise ValueError(f"trailing data after byte {end}")
    return value


def _bdecode(data: bytes, at: int) -> tuple[Any, int]:
    c = data[at : at + 1]
    if c == b"i":
        end = data.index(b"e", at)
        return int(data[at + 1 : end]), end + 1
    if c == b"l":
        at += 1
        items = []
        while data[at : at + 1] != b"e":
            item, at = _bdecode(data, at)
            items.append(item)
        return items, at + 1
    if c == b"d":
        at += 1
        out: dict[bytes, Any] = {}
        while data[at : at + 1] != b"e":
            key, at = _bdecode(data, at)
            out[key], at = _bdecode(data, at)
        return out, at + 1
    if c.isdigit():
        colon = data.index(b":", at)
        n = int(data[at:colon])
        if colon + 1 + n > len(data):
            raise ValueError("string runs past the end")
        return data[colon + 1 : colon + 1 + n], colon + 1 + n
    raise ValueError(f"bad bencoding at byte {at}")


# -- pieces ------------------------------------------------------------------------------
def piece_size_for(size: int, config: BitTorrentConfig | None = None) -> int:
    """The configured piece size (at least 4 MiB), doubled until there are at most
    `max_pieces` pieces. A power of two times 16 KiB, as BitTorrent clients expect."""
    cfg = config or BitTorrentConfig()
    piece = max(MIN_PIECE, cfg.piece_size)
    piece = 1 << (piece - 1).bit_length()
    while size > piece * cfg.max_pieces:
        piece *= 2
    return piece


def zero_pieces(manifest: ImageManifest, piece_size: int) -> list[bool]:
    """For each piece: True when every chunk it overlaps is a zero chunk."""
    cs = manifest.chunk_size
    count = -(-manifest.size // piece_size)
    out = []
    for p in range(count):
        first = p * piece_size // cs
        last = (min((p + 1) * piece_size, manifest.size) - 1) // cs
        out.append(all(manifest.chunks[i] == ZERO_DIGEST for i in range(first, last + 1)))
    return out


def piece_hashes(reader: ImageReader, piece_size: int) -> bytes:
    """The concatenated SHA-1 of every piece, from the verified chunks `reader` reads."""
    manifest = reader.manifest
    size = manifest.size
    count = -(-size // piece_size)
    zero = zero_pieces(manifest, piece_size)
    zero_hash: dict[int, bytes] = {}
    out = bytearray()

    def length(p: int) -> int:
        return min(piece_size, size - p * piece_size)

    p = 0
    while p < count:
        if zero[p]:
            n = length(p)
            if n not in zero_hash:
                zero_hash[n] = hashlib.sha1(bytes(n)).digest()
            out += zero_hash[n]
            p += 1
            continue
        end = p
        while end < count and not zero[end]:
            end += 1
        # one streamed read per run of data pieces, so the reader's read-ahead carries on
        out += b"".join(_hash_run(reader.iter_range(p * piece_size, min(end * piece_size, size)),
                                  [length(q) for q in range(p, end)]))
        p = end
    return bytes(out)


def _hash_run(blocks: Iterator[bytes], lengths: list[int]) -> Iterator[bytes]:
    h = hashlib.sha1()
    k, filled = 0, 0
    for block in blocks:
        view = memoryview(block)
        while view:
            take = min(len(view), lengths[k] - filled)
            h.update(view[:take])
            filled += take
            view = view[take:]
            if filled == lengths[k]:
                yield h.digest()
                h, k, filled = hashlib.sha1(), k + 1, 0
    if k != len(lengths):
        raise ValueError("the image ended before its last piece")


def make_torrent(reader: ImageReader, name: str, piece_size: int = MIN_PIECE, *,
                 manifest_id: str = "") -> tuple[bytes, str]:
    """(bencoded torrent, hex v1 info hash) of the image `reader` reads: single file
    `name`, private."""
    if piece_size < MIN_PIECE or piece_size & (piece_size - 1):
        raise ValueError(f"piece size {piece_size} must be a power of two ≥ 4 MiB")
    info = {"length": reader.manifest.size, "name": name, "piece length": piece_size,
            "pieces": piece_hashes(reader, piece_size), "private": 1}
    meta: dict[str, Any] = {"info": info, "created by": "rain"}
    if manifest_id:
        meta["rain-manifest"] = manifest_id
    return bencode(meta), hashlib.sha1(bencode(info)).hexdigest()


def torrent_manifest(data: bytes) -> str:
    """The manifest id a stored torrent was made from ('' if it does not say)."""
    try:
        meta = bdecode(data)
        return bytes(meta.get(b"rain-manifest", b"")).decode()
    except (ValueError, TypeError, AttributeError):
        return ""


# -- stored with the image -------------------------------------------------------------------
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def ensure_torrent(repo: ImageRepository, image: Image, config: BitTorrentConfig | None = None,
                   *, replace: bool = False) -> tuple[str, int, bytes]:
    """(info hash, piece size, torrent) of the image's current content, made and stored if
    the repository has none for it (or, with `replace`, none made from its current
    manifest)."""
    manifest_id = repo.manifest_id_of(image.id)
    if not manifest_id:
        raise ValueError(f"image {image.id} has no stored content")
    with _locks_guard:
        lock = _locks.setdefault(image.id, threading.Lock())
    with lock:  # the activation hook and a deployment make it once
        found = repo.torrent_of(image.id)
        if found is not None and torrent_manifest(found[2]) == manifest_id:
            return found
        if found is not None and not replace:
            return found
        manifest = repo.load_manifest(manifest_id)
        piece = piece_size_for(manifest.size, config)
        data, info_hash = make_torrent(repo.chunk_reader(manifest, image.id), image.id, piece,
                                       manifest_id=manifest_id)
        repo.save_torrent(image.id, info_hash, piece, data)
        log.info("torrent of image %s: %s, %d pieces of %d MiB", image.id, info_hash,
                 -(-manifest.size // piece), piece // MiB)
        return info_hash, piece, data


class TorrentOnActivate:
    """An activation hook: makes and stores the torrent of each image that becomes active,
    in a thread of its own (hashing a big image must not hold up its upload's response)."""

    def __init__(self, repo: ImageRepository, config: BitTorrentConfig | None = None) -> None:
        self.repo = repo
        self.config = config
        self._threads: list[threading.Thread] = []

    def __call__(self, image: Image) -> None:
        t = threading.Thread(target=self._make, args=(image,), daemon=True,
                             name=f"rain-torrent-{image.id[:8]}")
        self._threads = [x for x in self._threads if x.is_alive()]
        self._threads.append(t)
        t.start()

    def _make(self, image: Image) -> None:
        # Background work: on Linux a thread has its own nice value, so hashing the
        # whole image yields the CPU to the transfers people are waiting for.
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            ensure_torrent(self.repo, image, self.config, replace=True)
        except Exception:
            log.exception("cannot make the torrent of image %s", image.id)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the torrents being made (tests, shutdown)."""
        for t in list(self._threads):
            t.join(timeout)


def torrent_on_activate(repo: ImageRepository,
                        config: BitTorrentConfig | None = None) -> TorrentOnActivate:
    """The hook to append to `repo.activation_hooks`."""
    return TorrentOnActivate(repo, config)
