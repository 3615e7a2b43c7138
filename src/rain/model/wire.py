"""rain's HTTP error body, written and read here only.

Every rain server (the repository's API and its native front end, the node
agent) answers a refusal with the status of the error's class and

    {"error": {"code": "not_found", "message": "no image 'web:2'", ...details}}

and every client (rain.client, the repository's agent client, the node's
repository source) turns that answer back into the same rain.model.errors class
with the same message and details. A body that is not rain's (an HTML page from
a proxy, an empty 502) becomes one line naming the status, of the class that
status stands for.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from rain.model.errors import (
    ERRORS_BY_CODE,
    Conflict,
    Forbidden,
    ImageTooLarge,
    InvalidRequest,
    NotFound,
    RainError,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    Unsupported,
)

# What a status means when the body does not say (not rain's answer).
ERRORS_BY_STATUS: dict[int, type[RainError]] = {
    400: InvalidRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
    413: ImageTooLarge, 429: TooManyRequests, 501: Unsupported, 503: Unavailable,
}
SNIPPET = 200  # characters of a foreign body quoted in the message


def error_object(code: str, message: str,
                 details: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON error body; `details` go beside code and message (they cannot replace them)."""
    return {"error": {**(details or {}), "code": code, "message": message}}


def error_body(exc: RainError) -> dict[str, Any]:
    return error_object(exc.code, exc.message, exc.details)


def error_bytes(exc: RainError) -> bytes:
    return json.dumps(error_body(exc)).encode()


def error_from(status: int, body: bytes, what: str = "") -> RainError:
    """The exception an error answer stands for; `what` (e.g. "node n01") goes before
    the message."""
    prefix = f"{what}: " if what else ""
    try:
        err = json.loads(body)["error"]
        code, message = str(err["code"]), str(err["message"])
        details = {k: v for k, v in err.items() if k not in ("code", "message")}
    except (ValueError, KeyError, TypeError, AttributeError):
        cls = ERRORS_BY_STATUS.get(status, RainError)
        text = " ".join(body[: SNIPPET * 4].decode(errors="replace").split())
        shown = (text[:SNIPPET] + "…") if len(text) > SNIPPET else text
        exc = cls(f"{prefix}HTTP {status} without a rain error body"
                  + (f": {shown}" if shown else ""))
        exc.status = status
        return exc
    cls = ERRORS_BY_CODE.get(code) or ERRORS_BY_STATUS.get(status, RainError)
    exc = cls(prefix + message)
    exc.details = details
    exc.status = status
    if cls.code != code:
        exc.code = code  # a code this client does not know: keep it for the caller
    return exc


def raise_for_error(status: int, body: bytes, what: str = "") -> None:
    """Raise the answer's error (see `error_from`); nothing for a status below 400."""
    if status >= 400:
        raise error_from(status, body, what)
