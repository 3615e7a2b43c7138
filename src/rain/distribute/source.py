"""The repository as a source of chunks for a node: manifest, then verified Range reads.

One keep-alive connection (plain `http.client`, like the client's bulk path)
asks for runs of missing chunks as byte ranges and writes each chunk into
the PartialImage as soon as it has arrived and matched its digest. A cut
connection is resumed from the first chunk still missing (HTTP Range), so an
interrupted transfer never starts over. Every request names its deployment
(`X-Rain-Deployment`) so the server can count the bytes it sent for it.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from rain.client.connection import open_connection, request_headers
from rain.distribute.partial import BadChunk, PartialImage, TransferAborted
from rain.model.errors import InvalidImage, RainError
from rain.model.wire import raise_for_error
from rain.store.manifest import DIGEST_LEN, ImageManifest

MAX_RUN = 64 * 1024 * 1024  # bytes asked for in one Range request
RETRIES = 5  # consecutive failures without progress before giving up


@dataclass
class TransferStats:
    """Bytes one node moved for one image, by where they came from and went."""

    repo_bytes: int = 0  # received from the repository
    peer_bytes: int = 0  # received from other nodes
    local_bytes: int = 0  # copied from this node's own cache (chunks method)
    sent_bytes: int = 0  # sent to other nodes (relay, chunk server, seeding)
    bad_chunks: int = 0  # chunks that failed verification (and were fetched again)
    dropped: list[str] = field(default_factory=list)  # sources dropped for bad data or death
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, what: str, n: int) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + n)

    def drop(self, source: str, why: str) -> None:
        with self._lock:
            self.dropped.append(f"{source}: {why}")

    def to_dict(self) -> dict[str, object]:
        with self._lock:
            return {"repo_bytes": self.repo_bytes, "peer_bytes": self.peer_bytes,
                    "local_bytes": self.local_bytes, "sent_bytes": self.sent_bytes,
                    "bad_chunks": self.bad_chunks, "dropped": list(self.dropped)}


class RateLimit:
    """A token bucket: `take(n)` sleeps so that the long-run rate stays under `rate` B/s."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._t = time.monotonic()
        self._debt = 0.0

    def take(self, n: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        self._debt = max(0.0, self._debt - (now - self._t) * self.rate) + n
        self._t = now
        if self._debt > self.rate * 0.05:
            time.sleep(self._debt / self.rate)


def chunk_runs(partial: PartialImage, indices: Iterable[int],
               max_run: int = MAX_RUN) -> Iterator[list[int]]:
    """Consecutive missing chunk indices, grouped into runs of at most `max_run` bytes."""
    run: list[int] = []
    for i in indices:
        if partial.present(i):
            continue
        if run and (i != run[-1] + 1 or len(run) * partial.chunk_size >= max_run):
            yield run
            run = []
        run.append(i)
    if run:
        yield run


class RepoSource:
    """Chunks of images from the repository at `url`, as the node agent's user `token`."""

    def __init__(self, url: str, token: str | None, *, deployment: str = "",
                 timeout: float = 60.0, context: ssl.SSLContext | None = None,
                 max_rate: float | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.deployment = deployment
        self.timeout = timeout
        self.context = context
        self.limit = RateLimit(max_rate)
        self._conn: http.client.HTTPConnection | None = None
        self._prefix = ""

    def _headers(self) -> dict[str, str]:
        return request_headers(self.token, **{"X-Rain-Deployment": self.deployment})

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn, self._prefix = open_connection(self.url, self.timeout, self.context)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> RepoSource:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def manifest(self, image_id: str) -> ImageManifest:
        """The image's chunk digests, which every byte from every source is checked against."""
        conn = self._connection()
        try:
            conn.request("GET", f"{self._prefix}/v1/images/{image_id}/manifest",
                         headers=self._headers())
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise RainError(f"cannot reach the repository at {self.url}: {exc}") from None
        raise_for_error(resp.status, body, f"manifest of {image_id}")
        try:
            data = json.loads(body)
            raw = base64.b64decode(data["chunks"])
            chunks = [raw[i : i + DIGEST_LEN] for i in range(0, len(raw), DIGEST_LEN)]
            manifest = ImageManifest(int(data["chunk_size"]), int(data["size"]),
                                     str(data["sha256"]), chunks)
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidImage(f"manifest of {image_id} from the repository is malformed: "
                               f"{exc}") from None
        expected = -(-manifest.size // manifest.chunk_size) if manifest.size else 0
        if len(chunks) != expected:
            raise InvalidImage(f"manifest of {image_id} lists {len(chunks)} chunks for "
                               f"{manifest.size} bytes")
        return manifest

    def fetch(self, image_id: str, partial: PartialImage, indices: Iterable[int] | None = None,
              *, stats: TransferStats, cancel: threading.Event | None = None,
              on_chunk: Callable[[int], None] | None = None) -> None:
        """Fill the listed (default: all) missing chunks of `partial` from the repository.

        Resumes after a cut connection from the first chunk still missing; gives
        up after RETRIES failures in a row that brought nothing new. A chunk
        that fails verification is asked for once more, then it is an error:
        the repository itself verified it on the way out, so the damage is on
        the path, and a path that keeps damaging data is not one to trust.
        """
        wanted = list(range(partial.count) if indices is None else indices)
        failures = 0
        bad_seen: set[int] = set()
        while True:
            todo = partial.missing(wanted)
            if not todo:
                return
            if cancel is not None and cancel.is_set():
                raise TransferAborted(f"transfer of {image_id} cancelled")
            before = partial.missing_count
            try:
                for run in chunk_runs(partial, todo):
                    self._fetch_run(image_id, partial, run, stats, cancel, on_chunk)
                failures = 0
            except BadChunk as exc:
                stats.add("bad_chunks", 1)
                if exc.index in bad_seen:
                    raise InvalidImage(f"chunk {exc.index} of {image_id} arrived corrupt twice "
                                       "from the repository") from None
                bad_seen.add(exc.index)
                self.close()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                failures = 0 if partial.missing_count < before else failures + 1
                if failures >= RETRIES:
                    raise RainError(f"transfer of {image_id} from the repository failed "
                                    f"{RETRIES} times in a row: {exc}") from None
                time.sleep(min(0.2 * 2**failures, 5.0))

    def _fetch_run(self, image_id: str, partial: PartialImage, run: list[int],
                   stats: TransferStats, cancel: threading.Event | None,
                   on_chunk: Callable[[int], None] | None) -> None:
        cs = partial.chunk_size
        start = run[0] * cs
        end = run[-1] * cs + partial.chunk_length(run[-1])
        conn = self._connection()
        headers = {**self._headers(), "Range": f"bytes={start}-{end - 1}"}
        conn.request("GET", f"{self._prefix}/v1/images/{image_id}/file", headers=headers)
        resp = conn.getresponse()
        if resp.status != 206:
            body = resp.read()
            if resp.status == 200:
                raise RainError(f"the repository ignored a Range request for {image_id}")
            raise_for_error(resp.status, body, f"download of {image_id}")
        buf = bytearray(cs)
        for i in run:
            n = partial.chunk_length(i)
            view = memoryview(buf)[:n]
            got = 0
            while got < n:
                k = resp.readinto(view[got:])
                if not k:
                    raise ConnectionResetError(f"the repository closed the connection after "
                                               f"{got} bytes of chunk {i}")
                got += k
            stats.add("repo_bytes", n)
            self.limit.take(n)
            partial.put(i, view, "repository")
            if on_chunk is not None:
                on_chunk(i)
            if cancel is not None and cancel.is_set():
                self.close()
                raise TransferAborted(f"transfer of {image_id} cancelled")
