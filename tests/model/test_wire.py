"""The error body over real HTTP: what each rain server writes, each rain client reads
back as the same rain.model.errors class, message and details (rain.model.wire)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi import FastAPI

from rain.agent.server import AgentHTTPServer
from rain.api import errors as api_errors
from rain.api.native import RainHTTPServer
from rain.client import Client
from rain.distribute.agentclient import AgentClient
from rain.model import errors
from rain.model.errors import ERRORS_BY_CODE, ImageRebuilding, RainError, TooManyRequests
from rain.model.wire import error_body, error_from, raise_for_error
from tests.support.servers import serve_http

KEY = "agent-key-for-the-wire-test"
CODES = sorted(ERRORS_BY_CODE)


def sample(cls: type[RainError]) -> RainError:
    """An instance of `cls` with a message that JSON must carry as it is."""
    message = f'{cls.__name__}: "quoted", ünïcode and a / slash'
    if cls is ImageRebuilding:
        return ImageRebuilding(message, build_id="b-123", retry_after=7)
    if cls is TooManyRequests:
        return TooManyRequests(message, retry_after=3)
    return cls(message)


def assert_same(got: RainError, sent: RainError, prefix: str = "") -> None:
    assert type(got) is type(sent)
    assert got.code == sent.code and got.status == sent.status
    assert got.message == prefix + sent.message
    assert got.details == sent.details


def test_every_error_class_has_a_code_the_clients_know() -> None:
    defined = {cls for _, cls in inspect.getmembers(errors, inspect.isclass)
               if issubclass(cls, RainError) and cls.__module__ == errors.__name__}
    assert defined == set(ERRORS_BY_CODE.values())


# -- the repository: its FastAPI handlers and its native front end ------------------------
class RaisingRepository:
    """Stands in for rain.repo.Repository: authenticating a token raises the error whose
    code the token is (so the native file endpoint answers with it)."""

    def authenticate(self, token: str | None) -> None:
        raise sample(ERRORS_BY_CODE[str(token)])


@pytest.fixture(scope="module")
def repository_url() -> Iterator[str]:
    app = FastAPI()
    api_errors.install(app)

    @app.get("/v1/raise/{code}")
    def _raise(code: str) -> None:
        raise sample(ERRORS_BY_CODE[code])

    yield from serve_http(RainHTTPServer(("127.0.0.1", 0), RaisingRepository(),  # type: ignore[arg-type]
                                    app))


@pytest.mark.parametrize("code", CODES)
def test_api_error_reaches_the_client_as_itself(repository_url: str, code: str) -> None:
    sent = sample(ERRORS_BY_CODE[code])
    with Client(repository_url, token="unused") as c, pytest.raises(RainError) as caught:
        c._request("GET", f"/v1/raise/{code}")
    assert_same(caught.value, sent)


@pytest.mark.parametrize("code", CODES)
def test_native_file_endpoint_error_reaches_the_client_as_itself(repository_url: str,
                                                                 code: str) -> None:
    sent = sample(ERRORS_BY_CODE[code])
    with Client(repository_url, token=code) as c, pytest.raises(RainError) as caught:
        c.get_range("some-image", 0, 10)
    assert_same(caught.value, sent)


# -- the node agent ---------------------------------------------------------------------
class RaisingAgent:
    """Stands in for rain.agent.Agent: every fetch request raises the error it names."""

    key = KEY

    def fetch(self, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
        raise sample(ERRORS_BY_CODE[str(body["code"])])


@pytest.fixture(scope="module")
def agent_url() -> Iterator[str]:
    yield from serve_http(AgentHTTPServer(("127.0.0.1", 0), RaisingAgent()))  # type: ignore[arg-type]


@pytest.mark.parametrize("code", CODES)
def test_agent_error_reaches_the_repository_as_itself(agent_url: str, code: str) -> None:
    sent = sample(ERRORS_BY_CODE[code])
    with AgentClient("n01", agent_url, KEY) as agent, pytest.raises(RainError) as caught:
        agent.fetch({"code": code})
    assert_same(caught.value, sent, prefix="node n01: ")


def test_agent_refusal_of_a_wrong_key_is_forbidden(agent_url: str) -> None:
    with AgentClient("n01", agent_url, "not-the-key") as agent, \
            pytest.raises(errors.Forbidden, match=r"^node n01: wrong agent key$"):
        agent.state()


# -- answers that are not rain's --------------------------------------------------------
PROXY_PAGE = b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\n" \
             b"<center><h1>502 Bad Gateway</h1></center>\n<hr><center>nginx</center>\n" \
             b"</body>\n</html>\n" + b"<!-- padding -->\n" * 100


class ProxyHandler(BaseHTTPRequestHandler):
    """A proxy in front of a dead server: an HTML page for every request."""

    def do_GET(self) -> None:
        self.send_response(502)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(PROXY_PAGE)))
        self.end_headers()
        self.wfile.write(PROXY_PAGE)

    do_POST = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def proxy_url() -> Iterator[str]:
    yield from serve_http(ThreadingHTTPServer(("127.0.0.1", 0), ProxyHandler))


def test_a_proxy_page_is_one_line_for_the_client(proxy_url: str) -> None:
    with Client(proxy_url) as c, pytest.raises(RainError) as caught:
        c.health()
    message = caught.value.message
    assert "\n" not in message and "\r" not in message and len(message) < 300
    assert message.startswith("HTTP 502 without a rain error body: <html> <head>")
    assert caught.value.status == 502


def test_a_proxy_page_is_one_line_for_the_agent_client(proxy_url: str) -> None:
    with AgentClient("n01", proxy_url, KEY) as agent, pytest.raises(RainError) as caught:
        agent.fetch({})
    message = caught.value.message
    assert "\n" not in message and message.startswith("node n01: HTTP 502 without")


@pytest.mark.parametrize(("status", "body", "cls"), [
    (404, b"", errors.NotFound),
    (503, b"Service Unavailable", errors.Unavailable),
    (413, b'{"detail": "too big"}', errors.ImageTooLarge),  # JSON, but not rain's
    (500, b'{"error": "a string"}', RainError),
    (418, b"\xff\xfe not utf-8", RainError),
])
def test_a_foreign_body_gets_the_class_its_status_stands_for(
        status: int, body: bytes, cls: type[RainError]) -> None:
    exc = error_from(status, body)
    assert type(exc) is cls and exc.status == status
    assert exc.message.startswith(f"HTTP {status} without a rain error body")
    assert "\n" not in exc.message


def test_an_unknown_code_keeps_its_code() -> None:
    exc = error_from(409, b'{"error": {"code": "brand_new", "message": "later"}}')
    assert type(exc) is errors.Conflict and exc.code == "brand_new" and exc.message == "later"


def test_details_cannot_replace_code_or_message() -> None:
    body = error_body(errors.NotFound("gone", details={"code": "x", "message": "y", "n": 1}))
    assert body == {"error": {"code": "not_found", "message": "gone", "n": 1}}


def test_success_raises_nothing() -> None:
    raise_for_error(200, b"<html>")
    raise_for_error(304, b"")
