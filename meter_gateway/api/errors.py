"""The HTTP API's errors: ``ApiError`` and its one JSON shape (``meter_gateway.http``, shared
with the receivers) for every answer that is not a success.

The errors of the layers below (catalog, invoices, wallet, store conflicts) become ``ApiError``
in one place, the app's guard (``app.domain_error``); ``exception_handlers`` gives Starlette's
own answers (unknown route 404, wrong method 405, an unexpected exception 500) the same shape.
"""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ExceptionHandler

from meter_gateway.http import ApiError, error_response, shown

__all__ = ["ApiError", "error_response", "exception_handlers", "shown"]


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    path = shown(request.url.path)
    if exc.status_code == 404:
        return error_response(404, f"no such path: {path}")
    if exc.status_code == 405:
        allowed = _allowed_methods(request)
        return error_response(
            405,
            f"{request.method} is not allowed on {path}; allowed: {', '.join(allowed)}",
            {"Allow": ", ".join(allowed)},
        )
    return error_response(exc.status_code, str(exc.detail), exc.headers)


def _allowed_methods(request: Request) -> list[str]:
    # Starlette's own 405 names the methods of the first route on the path only; a path here
    # is often several routes (GET read, POST admin), so collect them all.
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        route_methods = getattr(route, "methods", None)
        if match is not Match.NONE and route_methods:
            methods |= set(route_methods)
    return sorted(methods)


async def _unexpected(request: Request, exc: Exception) -> Response:
    # Starlette re-raises after answering, so the server still logs the traceback.
    return error_response(500, "internal error: the gateway's log has the details")


def exception_handlers() -> dict[Any, ExceptionHandler]:
    return {HTTPException: _http_exception, Exception: _unexpected}
