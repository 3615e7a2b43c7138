"""rain's own HTTP/1.1 server: image bytes take the shortest path, the rest is ASGI.

Measured on the reference machine (docs/benchmarks.md), an ASGI server spends
more CPU *receiving* a 2 GiB body than the repository spends hashing it:
uvicorn 2.8 s, Granian 1.3 s, a blocking socket reading straight into the
upload buffers 0.4 s. So this server handles the two bulk paths itself —

    PUT       /v1/images/{ref}/file   socket → writer blocks (readinto, no copies)
    GET/HEAD  /v1/images/{ref}/file   verified chunks → socket

— one thread per connection, blocking I/O, and hands every other request to
the FastAPI app through a small in-process ASGI bridge. The FastAPI routes for
the same two paths stay (they document the API in OpenAPI and serve it under
`rain serve --server uvicorn`); both front ends call the same Repository
methods, so behaviour is identical.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import re
import ssl
import threading
import time
from collections.abc import Callable, MutableMapping
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from fastapi import FastAPI

from rain.api.errors import error_headers
from rain.api.files import DRAIN_LIMIT, bearer_token, download_headers
from rain.api.memory import release_memory
from rain.api.ranges import RangeNotSatisfiable, parse_range
from rain.api.sparse import MEDIA_TYPE, SparseBodyReader, sparse_header, sparse_parts, wants_sparse
from rain.api.transfers import Transfers
from rain.deploy.coordinator import Coordinator
from rain.distribute.httpserver import ServingHTTPServer
from rain.model import DiskFormat, Image, InvalidRequest, RainError, User
from rain.model.wire import error_object
from rain.repo import Download, Repository

log = logging.getLogger("rain.api.native")
FILE_PATH = re.compile(r"^/v1/images/([^/]+)/file$")
MAX_API_BODY = 16 * 1024 * 1024
IDLE_TIMEOUT = 300.0
DRAIN_SECONDS = 10.0  # how long a refused upload's rest is read (and dropped) at most


class BodyReader:
    """The request body, by Content-Length or chunked transfer coding."""

    def __init__(self, rfile: Any, headers: Any) -> None:
        self.rfile = rfile
        self.chunked = "chunked" in (headers.get("Transfer-Encoding") or "").lower()
        length = headers.get("Content-Length")
        self.remaining: int | None = None if self.chunked else int(length or 0)
        self._chunk_left = 0
        self.done = self.remaining == 0

    def readinto(self, view: memoryview) -> int:
        """Fill up to len(view) bytes; 0 at the end of the body; EOFError if cut off."""
        if self.done or not len(view):
            return 0
        if not self.chunked:
            assert self.remaining is not None
            n = self.rfile.readinto(view[: min(len(view), self.remaining)])
            if not n:
                raise EOFError("client closed the connection mid-body")
            self.remaining -= n
            self.done = self.remaining == 0
            return int(n)
        if self._chunk_left == 0:
            line = self.rfile.readline(1024)
            if not line:
                raise EOFError("client closed the connection mid-body")
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                self.done = True
                return 0
            self._chunk_left = size
        n = self.rfile.readinto(view[: min(len(view), self._chunk_left)])
        if not n:
            raise EOFError("client closed the connection mid-body")
        self._chunk_left -= n
        if self._chunk_left == 0:
            self.rfile.readline(16)  # CRLF after the chunk
        return int(n)

    def read_all(self, limit: int) -> bytes:
        out = bytearray()
        buf = bytearray(64 * 1024)
        while n := self.readinto(memoryview(buf)):
            out += buf[:n]
            if len(out) > limit:
                raise InvalidRequest(f"request body larger than {limit} bytes")
        return bytes(out)

    def drain(self, limit: int, deadline: float | None = None) -> bool:
        """Read and drop the rest (up to `limit` bytes, until `deadline` on the monotonic
        clock); True when the body was consumed."""
        buf = memoryview(bytearray(1024 * 1024))
        seen = 0
        try:
            while n := self.readinto(buf):
                seen += n
                if seen > limit or (deadline is not None and time.monotonic() > deadline):
                    return False
        except (EOFError, OSError, ValueError):
            return False
        return True


class ASGIBridge:
    """Runs the FastAPI app on an event loop thread for the worker threads."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="rain-asgi",
                                       daemon=True)
        self.thread.start()

    def call(self, scope: dict[str, Any], body: bytes,
             write_start: Callable[[int, list[tuple[bytes, bytes]]], None],
             write_body: Callable[[bytes, bool], None]) -> None:
        messages: queue.Queue[MutableMapping[str, Any] | None] = queue.Queue()
        finished = asyncio.Event()
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await finished.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            messages.put(message)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            finally:
                finished.set()

        fut: Future[None] = asyncio.run_coroutine_threadsafe(run(), self.loop)
        fut.add_done_callback(lambda _f: messages.put(None))
        started = False
        while (message := messages.get()) is not None:
            if message["type"] == "http.response.start":
                started = True
                write_start(int(message["status"]), list(message.get("headers", [])))
            elif message["type"] == "http.response.body":
                write_body(bytes(message.get("body", b"")), bool(message.get("more_body")))
        exc = fut.exception()
        if exc is not None and not started:
            raise exc


class RainHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "rain"
    timeout = IDLE_TIMEOUT
    server: RainHTTPServer

    # -- dispatch --------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def __getattr__(self, name: str) -> Any:
        # Any other method (PROPFIND, BREW …) goes to the app too, which answers a JSON
        # 405 with Allow (or 404 for a path it does not have) instead of the stdlib's
        # 501 HTML page.
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        m = FILE_PATH.match(url.path)
        try:
            if m and self.command == "PUT":
                self._upload(unquote(m.group(1)), parse_qs(url.query))
            elif m and self.command in ("GET", "HEAD"):
                with self.server.transfers.download():
                    self._download(unquote(m.group(1)), parse_qs(url.query))
            else:
                self._asgi(url.path, url.query)
        except RainError as exc:
            self._error(exc.status, exc.code, exc.message, error_headers(exc) or None,
                        exc.details)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception:
            log.exception("unexpected error")
            self._error(500, "internal", "internal error")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    @property
    def repo(self) -> Repository:
        return self.server.repo

    def _viewer(self) -> User | None:
        return self.repo.authenticate(bearer_token(self.headers.get("Authorization"),
                                                   self.headers.get("X-Auth-Token")))

    # -- responses -------------------------------------------------------------
    def _error(self, status: int, code: str, message: str,
               headers: dict[str, str] | None = None,
               details: dict[str, Any] | None = None) -> None:
        if getattr(self, "_headers_sent", False):
            self.close_connection = True  # mid-body: all we can do is stop
            return
        body = json.dumps(error_object(code, message, details)).encode()
        self._start(status, {"Content-Type": "application/json",
                             "Content-Length": str(len(body)), **(headers or {})})
        if self.command != "HEAD":
            self.wfile.write(body)

    def _start(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self._headers_sent = True

    def handle_one_request(self) -> None:
        self._headers_sent = False
        super().handle_one_request()

    # -- image data --------------------------------------------------------------
    def _upload(self, ref: str, query: dict[str, list[str]]) -> None:
        raw = BodyReader(self.rfile, self.headers)
        # Tracked until the answer is out: a stopping server waits for it.
        with self.server.transfers.upload(self.connection) as interrupt:
            try:
                if self.server.transfers.stopping.is_set():
                    raise Transfers.stopped()
                image = self._receive(ref, query, raw, interrupt)
            except RainError as exc:
                self._refuse(exc, raw)  # its upload slot is already free
                return
            if image is None:
                return
            payload = json.dumps(image.to_dict()).encode()
            self._start(200, {"Content-Type": "application/json",
                              "Content-Length": str(len(payload))})
            self.wfile.write(payload)

    def _receive(self, ref: str, query: dict[str, list[str]], raw: BodyReader,
                 interrupt: Callable[[], None]) -> Image | None:
        """The upload itself: the active image, or None when the client went away."""
        body: BodyReader | SparseBodyReader = raw
        sparse = (self.headers.get("Content-Type") or "").startswith(MEDIA_TYPE)
        image, session = self.repo.begin_upload(
            self._viewer(), ref, _format(query.get("disk_format")), interrupt=interrupt,
            size=None if sparse else raw.remaining)  # the sparse header declares its own
        try:
            if sparse:
                body = SparseBodyReader(raw, max_size=session.limits.max_image_size)
                session.expect_size(body.header.size)
            while session.wants_header:
                chunk = bytearray(session.header_missing)
                n = body.readinto(memoryview(chunk))
                if n == 0:
                    break
                session.feed(memoryview(chunk)[:n])
            while not body.done:
                if isinstance(body, SparseBodyReader) and (zeros := body.zero_run()):
                    body.skip(zeros)
                    session.zeros(zeros)
                    continue
                n = body.readinto(session.buffer())
                session.commit(n)
            result = session.finish()
        except BaseException as exc:
            try:
                session.abort()
            finally:
                self.repo.end_upload(image, None)  # its slot goes back whatever abort raised
            if isinstance(exc, EOFError | OSError) and self.server.transfers.stopping.is_set():
                raise Transfers.stopped() from None  # its socket was shut by the stop
            if isinstance(exc, EOFError):
                self.close_connection = True
                log.info("upload of %s interrupted: %s", image.id, exc)
                return None
            raise
        return self.repo.end_upload(image, result)

    def _refuse(self, exc: RainError, body: BodyReader) -> None:
        """Answer a refused upload at once, then read and drop a bounded rest of its body:
        a client still sending sees the answer instead of a reset, and one that waits
        for it (it sent only what it had to: a header declaring too much) gets it now."""
        self.close_connection = not body.done
        self._error(exc.status, exc.code, exc.message, error_headers(exc) or None,
                    exc.details)
        if body.done or self.server.transfers.stopping.is_set():
            return
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.settimeout(DRAIN_SECONDS)
            body.drain(DRAIN_LIMIT, time.monotonic() + DRAIN_SECONDS)

    def _download(self, ref: str, query: dict[str, list[str]]) -> None:
        viewer = self._viewer()
        coordinator = self.server.coordinator
        if viewer is None and query.get("access_token") and coordinator is not None:
            # A BitTorrent web seed cannot send headers: a running deployment's peer
            # token in the query reads that deployment's image, and nothing else.
            viewer = coordinator.viewer_for_token(query["access_token"][0], ref)
        deployment = self.headers.get("X-Rain-Deployment") or \
            (query.get("deployment") or [""])[0]
        viewer = self.repo.node_reader(viewer, ref, deployment)
        count = None
        # A running deployment's transfers are counted for its report and logged as one
        # usage record per node by the coordinator, not one per Range request.
        tracked = bool(deployment) and coordinator is not None and \
            coordinator.is_running(deployment)
        if tracked:
            assert coordinator is not None

            def count(n: int) -> None:
                coordinator.count_bytes(deployment, n)
        d = self.repo.open_download(viewer, ref, _format(query.get("format")))
        headers = download_headers(d)
        try:
            rng = parse_range(self.headers.get("Range"), d.size)
        except RangeNotSatisfiable:
            headers = {"Content-Range": f"bytes */{d.size}"}
            raise
        if rng is None and wants_sparse(self.headers.get("Accept")):
            self._download_sparse(viewer, d, headers, count)
            return
        start, end = rng if rng else (0, d.size)
        inm = self.headers.get("If-None-Match")
        if inm and inm.strip() in (headers["ETag"], "*"):
            self._start(304, {"ETag": headers["ETag"], "Content-Length": "0"})
            return
        headers["Content-Length"] = str(end - start)
        if rng:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{d.size}"
        self._start(206 if rng else 200, headers)
        if self.command == "HEAD":
            return
        sent = 0
        try:
            for block in d.reader().iter_range(start, end):
                if sent + len(block) == end - start:
                    # Recorded before the last block leaves: a client holding the whole
                    # image also finds the pull in the usage log.
                    if not tracked:
                        self.repo.record_pull(viewer, d.image, end - start, fresh=start == 0)
                    sent = -1
                self.wfile.write(block)
                if count is not None:
                    count(len(block))
                if sent >= 0:
                    sent += len(block)
        except RainError as exc:
            log.error("download of %s stopped: %s", d.image.id, exc.message)
            self.close_connection = True
        finally:
            if sent > 0 and not tracked:
                self.repo.record_pull(viewer, d.image, sent, fresh=False)

    def _download_sparse(self, viewer: User | None, d: Download, headers: dict[str, str],
                         count: Callable[[int], None] | None = None) -> None:
        """The whole image without its zero chunks, digests up front (rain.model.sparse)."""
        sparse = sparse_header(d.manifest)
        for name in ("Repr-Digest", "Digest", "Accept-Ranges"):
            headers.pop(name, None)  # they describe the plain bytes, not this encoding
        headers.update({"Content-Type": MEDIA_TYPE, "Vary": "Accept",
                        "ETag": headers["ETag"][:-1] + '.sparse"',
                        "Content-Length": str(sparse.body_length())})
        self._start(200, headers)
        if self.command == "HEAD":
            return
        try:
            reader = d.reader()
            last: bytes | memoryview | None = None
            for part in sparse_parts(reader, sparse):
                if last is not None:
                    self.wfile.write(last)
                    if count is not None:
                        count(len(last))
                last = part
            # Recorded before the last part leaves, as for plain downloads.
            self.repo.record_pull(viewer, d.image, d.size, fresh=True)
            if last is not None:
                self.wfile.write(last)
                if count is not None:
                    count(len(last))
        except RainError as exc:
            log.error("download of %s stopped: %s", d.image.id, exc.message)
            self.close_connection = True

    # -- everything else -----------------------------------------------------------
    def _asgi(self, path: str, query: str) -> None:
        body = BodyReader(self.rfile, self.headers)
        payload = body.read_all(MAX_API_BODY)
        client = self.client_address
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": self.command, "scheme": "http",
            "path": unquote(path), "raw_path": path.encode(), "query_string": query.encode(),
            "root_path": "", "headers": [(k.lower().encode("latin-1"), v.encode("latin-1"))
                                         for k, v in self.headers.items()],
            "client": (client[0], client[1]) if isinstance(client, tuple) else None,
            "server": self.server.server_address[:2],
        }
        chunked = False

        def write_start(status: int, headers: list[tuple[bytes, bytes]]) -> None:
            nonlocal chunked
            names = {k.lower() for k, _ in headers}
            chunked = b"content-length" not in names and status not in (204, 304)
            self.send_response(status)
            for k, v in headers:
                self.send_header(k.decode("latin-1"), v.decode("latin-1"))
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._headers_sent = True

        def write_body(data: bytes, more: bool) -> None:
            if self.command == "HEAD":
                return
            if chunked:
                if data:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                if not more:
                    self.wfile.write(b"0\r\n\r\n")
            elif data:
                self.wfile.write(data)

        self.server.bridge.call(scope, payload, write_start, write_body)


def _format(values: list[str] | None) -> DiskFormat | None:
    if not values or not values[0]:
        return None
    try:
        return DiskFormat(values[0])
    except ValueError:
        raise InvalidRequest(f"unknown disk format {values[0]!r}: use one of "
                             f"{', '.join(f.value for f in DiskFormat)}") from None


class RainHTTPServer(ServingHTTPServer):
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], repo: Repository, app: FastAPI,
                 coordinator: Coordinator | None = None,
                 context: ssl.SSLContext | None = None) -> None:
        self.repo = repo
        self.bridge = ASGIBridge(app)
        # Uploads and downloads in progress: stopped on shutdown; memory given back when idle.
        self.transfers = Transfers(on_idle=release_memory)
        # Counts the bytes sent for deployments and reads their peer tokens.
        self.coordinator = coordinator
        super().__init__(address, RainHandler, context)
