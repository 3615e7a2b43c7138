"""The agent's HTTP API: control for the repository, chunk streams for peers.

Control (bearer: the agent key the node registered with):

    GET    /v1/health                     liveness (no auth)
    GET    /v1/state                      the node report the heartbeats carry
    POST   /v1/fetch                      start (or join) fetching an image   → 202
    GET    /v1/fetch/{image}?wait=S       a transfer's status (long-poll while fetching)
    DELETE /v1/fetch/{image}              cancel it, or stop serving it to peers
    POST   /v1/instances                  {"instances": [{id, image_id, size, copy,
                                          ephemeral_size}]} → disks over cached images
    GET    /v1/instances                  DELETE /v1/instances/{id}
    GET    /v1/cache                      DELETE /v1/cache/{image}
    POST   /v1/grants                     {"peer_token", "image_id"}: serve a cached image
                                          to that token's bearers (a `chunks` holder)
    DELETE /v1/grants                     {"peer_token"}: no longer

Peers (bearer: a deployment's peer token this agent was given, which covers
only that deployment's image: rain.agent.grants) — see
rain.distribute.methods.tree.peer for the wire format:

    GET    /v1/peer/images/{image}/chunks?stripe=S&of=K&from=I
    GET    /v1/peer/chunks/{hex digest}

One thread per connection (the stdlib's ThreadingHTTPServer), blocking I/O:
a node serves a handful of children and the repository, not thousands.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import ssl
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from rain.distribute.httpserver import ServingHTTPServer
from rain.distribute.methods.tree.peer import serve_stripe
from rain.distribute.partial import TransferAborted
from rain.model.errors import Forbidden, InvalidRequest, NotFound, RainError, Unauthorized
from rain.model.wire import error_bytes

if TYPE_CHECKING:
    from rain.agent.node import Agent

log = logging.getLogger("rain.agent.http")
MAX_BODY = 4 * 1024 * 1024
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(r"^/v1/health$"), "health"),
    ("GET", re.compile(r"^/v1/state$"), "state"),
    ("POST", re.compile(r"^/v1/fetch$"), "fetch"),
    ("GET", re.compile(r"^/v1/fetch/([^/]+)$"), "fetch_status"),
    ("DELETE", re.compile(r"^/v1/fetch/([^/]+)$"), "fetch_release"),
    ("POST", re.compile(r"^/v1/instances$"), "instances_create"),
    ("GET", re.compile(r"^/v1/instances$"), "instances_list"),
    ("DELETE", re.compile(r"^/v1/instances/([^/]+)$"), "instance_delete"),
    ("GET", re.compile(r"^/v1/cache$"), "cache_list"),
    ("DELETE", re.compile(r"^/v1/cache/([^/]+)$"), "cache_evict"),
    ("POST", re.compile(r"^/v1/grants$"), "grant"),
    ("DELETE", re.compile(r"^/v1/grants$"), "revoke"),
    ("GET", re.compile(r"^/v1/peer/images/([^/]+)/chunks$"), "peer_stripe"),
    ("GET", re.compile(r"^/v1/peer/chunks/([0-9a-fA-F]{64})$"), "peer_chunk"),
]


class AgentHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "rain-agent"
    timeout = 300
    server: AgentHTTPServer

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_DELETE = do_PUT = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    @property
    def agent(self) -> Agent:
        return self.server.agent

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self._started = False
        self._body_read = False
        try:
            for method, pattern, name in _ROUTES:
                m = pattern.match(url.path)
                if m and method == self.command:
                    args = [unquote(g) for g in m.groups()]
                    getattr(self, f"_{name}")(*args, query=parse_qs(url.query))
                    return
            raise NotFound(f"no such agent endpoint: {self.command} {url.path}")
        except RainError as exc:
            self._error(exc)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as exc:  # pragma: no cover - a bug; the repository sees a 500
            log.exception("agent request failed")
            self._error(RainError(f"internal error in the agent: {type(exc).__name__}: {exc}"))

    # -- plumbing ----------------------------------------------------------------
    def _token(self) -> str:
        auth = self.headers.get("Authorization") or ""
        return auth[7:].strip() if auth.lower().startswith("bearer ") else ""

    def _control(self) -> None:
        token = self._token()
        if not token:
            raise Unauthorized("this agent needs its key as a bearer token")
        if not hmac.compare_digest(token, self.agent.key):
            raise Forbidden("wrong agent key")

    def _peer(self, image_id: str | None = None) -> frozenset[str] | None:
        """The images the bearer may read (None: all, it is the repository)."""
        token = self._token()
        if not token:
            raise Unauthorized("peer requests need the deployment's peer token")
        if hmac.compare_digest(token, self.agent.key):
            return None
        images = self.agent.peer_images(token)
        if images is None:
            raise Forbidden("unknown or expired peer token")
        if image_id is not None and image_id not in images:
            raise Forbidden(f"this peer token does not cover image {image_id}")
        return images

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise InvalidRequest(f"request body larger than {MAX_BODY} bytes")
        raw = self.rfile.read(length) if length else b"{}"
        self._body_read = True
        try:
            data = json.loads(raw or b"{}")
        except ValueError:
            raise InvalidRequest("request body is not JSON") from None
        if not isinstance(data, dict):
            raise InvalidRequest("request body must be a JSON object")
        return data

    def _json(self, data: Any, status: int = 200) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self._started = True
        self.wfile.write(body)

    def _error(self, exc: RainError) -> None:
        if self._started:
            self.close_connection = True
            return
        # Read what is left of a body we refused so the client sees the answer.
        length = 0 if self._body_read else int(self.headers.get("Content-Length") or 0)
        if 0 < length <= MAX_BODY:
            self.rfile.read(length)
        elif length:
            self.close_connection = True
        body = error_bytes(exc)
        self.send_response(exc.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if exc.status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        self.wfile.write(body)

    # -- control -----------------------------------------------------------------
    def _health(self, query: dict[str, list[str]]) -> None:
        self._json({"status": "ok", "name": self.agent.name})

    def _state(self, query: dict[str, list[str]]) -> None:
        self._control()
        self._json(self.agent.report())

    def _fetch(self, query: dict[str, list[str]]) -> None:
        self._control()
        status, code = self.agent.fetch(self._body())
        self._json(status, code)

    def _fetch_status(self, image_id: str, query: dict[str, list[str]]) -> None:
        self._control()
        wait = min(float((query.get("wait") or ["0"])[0] or 0), 60.0)
        self._json(self.agent.fetch_status(image_id, wait))

    def _fetch_release(self, image_id: str, query: dict[str, list[str]]) -> None:
        self._control()
        self._json(self.agent.release(image_id))

    def _instances_create(self, query: dict[str, list[str]]) -> None:
        self._control()
        items = self._body().get("instances")
        if not isinstance(items, list):
            raise InvalidRequest("body must be {\"instances\": [...]}")
        self._json({"instances": self.agent.create_instances(items)})

    def _instances_list(self, query: dict[str, list[str]]) -> None:
        self._control()
        self._json({"instances": self.agent.list_instances()})

    def _instance_delete(self, instance_id: str, query: dict[str, list[str]]) -> None:
        self._control()
        self._json(self.agent.delete_instance(instance_id))

    def _cache_list(self, query: dict[str, list[str]]) -> None:
        self._control()
        self._json(self.agent.cache_listing())

    def _cache_evict(self, image_id: str, query: dict[str, list[str]]) -> None:
        self._control()
        self.agent.evict(image_id)
        self._json({"evicted": image_id})

    def _grant(self, query: dict[str, list[str]]) -> None:
        self._control()
        self._json(self.agent.grant(self._body()))

    def _revoke(self, query: dict[str, list[str]]) -> None:
        self._control()
        self._json(self.agent.revoke(self._body()))

    # -- peers -------------------------------------------------------------------
    def _peer_stripe(self, image_id: str, query: dict[str, list[str]]) -> None:
        self._peer(image_id)
        try:
            stripe = int((query.get("stripe") or ["0"])[0])
            of = int((query.get("of") or ["1"])[0])
            start = int((query.get("from") or ["0"])[0])
        except ValueError:
            raise InvalidRequest("stripe, of and from must be integers") from None
        if of < 1 or not 0 <= stripe < of or start < 0:
            raise InvalidRequest("need 0 <= stripe < of and from >= 0")
        partial = self.agent.serving_image(image_id)
        if partial is None:
            raise NotFound(f"image {image_id} is neither cached nor on its way here")
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.rain.chunks")
        self.send_header("Connection", "close")
        self.end_headers()
        self._started = True
        self.close_connection = True
        stats = self.agent.stats_for(image_id)

        def sent(n: int) -> None:
            if stats is not None:
                stats.add("sent_bytes", n)

        try:
            serve_stripe(partial, stripe, of, start, self.wfile.write, on_sent=sent,
                         sock=self.connection)
        except (TransferAborted, TimeoutError) as exc:
            log.info("stripe %d/%d of %s to %s stopped: %s", stripe, of, image_id,
                     self.address_string(), exc)

    def _peer_chunk(self, digest: str, query: dict[str, list[str]]) -> None:
        images = self._peer()
        data = self.agent.chunk_by_digest(bytes.fromhex(digest), images)
        if data is None:
            raise NotFound(f"no chunk {digest[:16]}… here")
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self._started = True
        self.wfile.write(data)


class AgentHTTPServer(ServingHTTPServer):
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], agent: Agent,
                 context: ssl.SSLContext | None = None) -> None:
        self.agent = agent
        super().__init__(address, AgentHandler, context)
