"""The one place the API's errors become HTTP responses (the body: rain.model.wire)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from rain.model.errors import RainError
from rain.model.wire import error_object

log = logging.getLogger("rain.api")
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None,
                   details: dict[str, Any] | None = None) -> JSONResponse:
    return JSONResponse(error_object(code, message, details), status_code=status,
                        headers=headers)


def error_headers(exc: RainError) -> dict[str, str]:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
    retry_after = exc.details.get("retry_after")
    if retry_after is not None:
        headers["Retry-After"] = str(int(retry_after))
    return headers


def allowed_methods(request: Request) -> list[str]:
    """The methods some route takes on this path. Asked of the routes themselves, one
    method at a time: FastAPI makes one route per method (so Starlette's own Allow names
    only the first) and nests included routers."""
    scope = request.scope
    return [m for m in HTTP_METHODS if any(
        route.matches({**scope, "method": m})[0] == Match.FULL
        for route in request.app.router.routes)]


def install(app: FastAPI) -> None:
    @app.exception_handler(RainError)
    async def _rain(_req: Request, exc: RainError) -> JSONResponse:
        if exc.status >= 500:
            log.error("%s: %s", exc.code, exc.message)
        return error_response(exc.status, exc.code, exc.message, error_headers(exc) or None,
                              exc.details)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(400, "invalid_request",
                              f"{where}: {first.get('msg', 'invalid request')}".strip(": "))

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 405:
            allowed = ", ".join(allowed_methods(req))
            return error_response(405, "method_not_allowed", f"{req.method} is not allowed on "
                                  f"{req.url.path}; it takes {allowed}", {"Allow": allowed})
        code = {404: "not_found"}.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, "internal", f"internal error: {type(exc).__name__}")
