"""What `rain serve` checks before it says "serving": the address it will listen on
and its TLS files, so that a wrong port or a busy one is one line, not a traceback
after a misleading "rain serving on …"."""

from __future__ import annotations

import errno
import socket
import ssl

from rain.model.errors import RainError


def check_listen_address(host: str, port: object) -> None:
    """Bind (and let go of) `host:port` once, as the server is about to."""
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise RainError(f"bad port {port!r}: use a number from 1 to 65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise RainError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', exc)}"
                        " (give --host an address of this machine)") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            hint = {errno.EADDRINUSE: " (another rain serve? choose another --port)",
                    errno.EACCES: " (ports below 1024 need root)",
                    errno.EADDRNOTAVAIL: " (not an address of this machine)"}.get(
                        exc.errno or 0, "")
            raise RainError(f"cannot listen on {host}:{port}: {exc.strerror}{hint}") from None


def check_tls(cert: str, key: str) -> None:
    """Load the certificate and key once, as the server will."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise RainError(f"TLS: {exc.filename or cert}: no such file") from None
    except (ssl.SSLError, OSError) as exc:
        raise RainError(f"TLS: cannot use certificate {cert} with key {key}: "
                        f"{getattr(exc, 'reason', None) or exc}") from None
