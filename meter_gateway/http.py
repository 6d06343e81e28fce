"""JSON over HTTP, shared by the receivers and the API: the one error type and the one JSON
shape of every answer that is not a success, ``{"error": "<what and why>", ...}``.

    ApiError        any 4xx/5xx answer; extra fields ride along (``parameter``, ``errors``)
     └── AuthError  401 (with the Bearer challenge) or 403, in ``meter_gateway.keys``

A low floor of the package: receivers and the API both answer through it, so neither imports
the other for it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import orjson
from starlette.responses import Response

#: How much of a client's value an error message repeats (a 10k-character value stays out).
SHOWN = 80


class ApiError(Exception):
    """An answer that is not a success: ``status``, a message a person can act on, and any
    extra JSON fields (``parameter`` names the query parameter at fault)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers) if headers else None
        self.fields = fields

    def response(self) -> Response:
        return error_response(self.status, self.message, self.headers, **self.fields)


def json_response(
    body: object, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    try:
        content = orjson.dumps(body)
    except TypeError:  # orjson.JSONEncodeError: text that is not Unicode (a lone surrogate)
        # An answer that quotes what was sent may quote a lone surrogate: the standard library
        # writes it as a \u escape, so the answer is still JSON and still names the culprit.
        content = json.dumps(body, ensure_ascii=True, default=str).encode()
    return Response(
        content,
        status_code=status,
        headers=dict(headers) if headers else None,
        media_type="application/json",
    )


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None, **fields: Any
) -> Response:
    return json_response({"error": message, **fields}, status, headers)


def shown(value: str) -> str:
    """``repr`` of a client's value, cut to ``SHOWN`` characters for messages."""
    if len(value) <= SHOWN:
        return repr(value)
    return repr(value[:SHOWN]) + f"… ({len(value)} characters)"
