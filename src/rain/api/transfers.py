"""The native server's image transfers in progress: what a shutdown stops, when memory goes back.

An upload's work can outlast its request by far (a sparse upload of declared
zeros is hashed after its last byte arrived), so the server watches each one:
`interrupt` — called by the upload while it waits for its own work — raises
when the client has gone (the socket saw FIN, RST or an error) or the server
is stopping. `stop` also shuts the reading side of every upload's socket, so
one blocked in `recv` wakes at once. Once no transfer has run for a moment,
`on_idle` gives memory back (rain.api.memory).
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Callable, Iterator

from rain.model import Unavailable

IDLE_SECONDS = 1.0
_GONE = getattr(select, "POLLRDHUP", 0x2000) | select.POLLHUP | select.POLLERR


def peer_gone(sock: socket.socket) -> bool:
    """The client closed or reset the connection (without reading anything from it)."""
    try:
        poller = select.poll()
        poller.register(sock.fileno(), _GONE)
        return bool(poller.poll(0))
    except (OSError, ValueError):  # closed under us
        return True


class Transfers:
    def __init__(self, on_idle: Callable[[], None] | None = None,
                 idle_seconds: float = IDLE_SECONDS) -> None:
        self.stopping = threading.Event()
        self._cond = threading.Condition()
        self._uploads: dict[int, socket.socket] = {}
        self._active = 0
        self._generation = 0  # bumped by every transfer that ends
        self._trimmed = 0
        self._closed = False
        self._on_idle = on_idle
        self._idle_seconds = idle_seconds
        if on_idle is not None:
            threading.Thread(target=self._idle_loop, name="rain-idle", daemon=True).start()

    @contextlib.contextmanager
    def upload(self, sock: socket.socket) -> Iterator[Callable[[], None]]:
        """Track an upload on `sock` (check `stopping` once inside); yields its interrupt
        callback."""
        key = id(sock)

        def interrupt() -> None:
            if self.stopping.is_set():
                raise self.stopped()
            if peer_gone(sock):
                raise EOFError("the client closed the connection")

        with self._cond:
            self._uploads[key] = sock
            self._active += 1
        try:
            yield interrupt
        finally:
            self._end(key)

    @contextlib.contextmanager
    def download(self) -> Iterator[None]:
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            self._end(None)

    def _end(self, key: int | None) -> None:
        with self._cond:
            if key is not None:
                self._uploads.pop(key, None)
            self._active -= 1
            self._generation += 1
            self._cond.notify_all()

    @staticmethod
    def stopped() -> Unavailable:
        """What a stopped upload answers (503 with Retry-After), if its client still listens."""
        return Unavailable("the server is shutting down: the upload was stopped; push "
                           "again in a moment", details={"retry_after": 10})

    def stop(self) -> None:
        """Stop every upload soon: their waits raise `stopped()`, blocked reads see EOF."""
        with self._cond:
            self.stopping.set()
            socks = list(self._uploads.values())
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)

    def wait_uploads(self, timeout: float) -> bool:
        """Wait until no upload is left (after `stop`); False if some still run."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._uploads, timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _idle_loop(self) -> None:
        assert self._on_idle is not None
        while True:
            with self._cond:
                # Something ended since the last trim, and nothing runs now ...
                self._cond.wait_for(lambda: self._closed or (
                    self._active == 0 and self._generation != self._trimmed))
                if self._closed:
                    return
                seen = self._generation

                def busy(seen: int = seen) -> bool:
                    return self._closed or self._active > 0 or self._generation != seen

                # ... and nothing started or ended for a moment.
                if self._cond.wait_for(busy, self._idle_seconds):
                    continue
                self._trimmed = seen
            self._on_idle()
