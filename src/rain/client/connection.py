"""How rain opens HTTP connections to a rain server: the one place for TLS, the bearer
token, the user agent and timeouts.

Two kinds: an httpx session for JSON calls (`json_session`: rain.client.Client,
the repository's agent client) and a plain `http.client` connection for bulk
bytes (`open_connection`: image uploads and downloads, chunk reads from the
repository and from peers), where httpx's layers cost more CPU than the hash.
"""

from __future__ import annotations

import functools
import http.client
import ssl
from urllib.parse import urlsplit

import httpx

from rain import __version__

USER_AGENT = f"rain/{__version__}"
CONNECT_TIMEOUT = 10.0  # seconds to set up a connection, whatever the request's timeout


@functools.cache
def default_tls() -> ssl.SSLContext:
    """One context for every connection that trusts the system CAs: loading them costs
    ~30 ms of CPU, and the coordinator makes a session per node per deployment."""
    return ssl.create_default_context()


def tls_context(ca: str | None) -> ssl.SSLContext | None:
    """A context trusting the CA bundle at `ca` (a private certificate); None: the system's."""
    return ssl.create_default_context(cafile=ca) if ca else None


def request_headers(token: str | None = None, **extra: str) -> dict[str, str]:
    """Headers every request carries: the user agent and the bearer token, if any."""
    headers = {"User-Agent": USER_AGENT}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    headers.update({k: v for k, v in extra.items() if v})
    return headers


def json_session(base_url: str, token: str | None, *, timeout: float,
                 connect_timeout: float = CONNECT_TIMEOUT,
                 context: ssl.SSLContext | None = None) -> httpx.Client:
    """A keep-alive session for JSON calls to `base_url`."""
    return httpx.Client(base_url=base_url, headers=request_headers(token),
                        timeout=httpx.Timeout(timeout, connect=connect_timeout),
                        verify=context if context is not None else default_tls())


def open_connection(url: str, timeout: float, context: ssl.SSLContext | None = None
                    ) -> tuple[http.client.HTTPConnection, str]:
    """A connection to `url`'s host (not yet connected) and its path: the target of a
    request to `url` itself, or the prefix of paths under a base URL (no trailing '/').
    `timeout` applies to every socket operation."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(host, parts.port, timeout=timeout,
                                           context=context or default_tls())
    else:
        conn = http.client.HTTPConnection(host, parts.port, timeout=timeout)
    return conn, parts.path.rstrip("/") + (f"?{parts.query}" if parts.query else "")
