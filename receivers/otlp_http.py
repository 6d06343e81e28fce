"""The OTLP/HTTP receiver: ``POST /v1/metrics``, protobuf or JSON, gzip, on its own port.

Answers in the request's content type: an ``ExportMetricsServiceResponse`` (with
``partial_success`` when points were rejected) on success, a ``google.rpc.Status`` otherwise.
413 for bodies over the limit, 415 for other content types, 429 with ``Retry-After`` when the
ingest queue is full and 503 when the store cannot commit (both retried by OTLP exporters;
the one mapping, and the ``code`` label's vocabulary, are ``pipeline.outcomes``'s).
Decoding and the export run on a worker thread: the answer waits for the commit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from google.protobuf import json_format  # type: ignore[import-untyped]
from google.rpc import status_pb2  # type: ignore[import-untyped]
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceResponse,
)
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from meter_gateway.keys import AuthError
from meter_gateway.model import Source
from meter_gateway.pipeline import outcomes
from meter_gateway.pipeline.decode import DecodeError, decompress
from meter_gateway.telemetry import Telemetry
from receivers.otlp import (
    ExportOutcome,
    OtlpError,
    OtlpMetrics,
    decode_json,
    decode_protobuf,
)
from receivers.rest import read_body

log = logging.getLogger(__name__)

PATH = "/v1/metrics"
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_PROTOBUF_TYPES = (PROTOBUF, "application/protobuf")
OTLP = Source.OTLP.value


class Authorizer(Protocol):
    def check(self, authorization: str | None, scope: str) -> str | None: ...


@dataclass(frozen=True, slots=True)
class HttpSettings:
    max_body_bytes: int
    max_decompressed_bytes: int
    retry_after_s: float


def create_app(
    metrics: OtlpMetrics, keys: Authorizer, telemetry: Telemetry, settings: HttpSettings
) -> Starlette:
    def finish(status: int, body: Response) -> Response:
        telemetry.requests.labels(OTLP, str(status)).inc()
        return body

    def error(
        status: int, message: str, as_json: bool, headers: dict[str, str] | None = None
    ) -> Response:
        return finish(status, status_response(status, message, as_json, headers))

    def export_body(body: bytes, encoding: str | None, as_json: bool) -> ExportOutcome:
        try:
            body = decompress(body, encoding, settings.max_decompressed_bytes)
        except DecodeError as exc:
            raise OtlpError(exc.status, exc.message) from None
        request = decode_json(body) if as_json else decode_protobuf(body)
        return metrics.export(request)

    async def export(request: Request) -> Response:
        started = time.perf_counter()
        content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        as_json = content_type == JSON
        if not as_json and content_type not in _PROTOBUF_TYPES:
            return error(
                415,
                f"unsupported Content-Type {content_type or '(none)'!r}: send {PROTOBUF} or {JSON}",
                True,
            )
        try:
            keys.check(request.headers.get("authorization"), "ingest")
        except AuthError as exc:
            challenge = {"WWW-Authenticate": 'Bearer realm="meter-gateway"'}
            return error(exc.status, exc.message, as_json, challenge if exc.status == 401 else None)
        try:
            body = await read_body(request, settings.max_body_bytes)
            outcome = await run_in_threadpool(
                export_body, body, request.headers.get("content-encoding"), as_json
            )
        except DecodeError as exc:
            return error(exc.status, exc.message, as_json)
        except ClientDisconnect:  # counted as 499, like the other receivers (nobody reads it)
            telemetry.requests.labels(OTLP, "499").inc()
            message = "client disconnected before the body was complete"
            return status_response(400, message, as_json)
        except OtlpError as exc:
            return error(exc.status, exc.message, as_json)
        except outcomes.REFUSALS as exc:
            a = outcomes.answer(exc, settings.retry_after_s)
            return error(a.http, a.message, as_json, a.headers())
        except Exception:
            log.exception("OTLP/HTTP export failed")
            return error(500, "internal error; see the gateway log", as_json)
        response = ExportMetricsServiceResponse()
        if outcome.rejected:
            response.partial_success.rejected_data_points = outcome.rejected
            response.partial_success.error_message = outcome.error_message
        telemetry.batch_seconds.labels(OTLP).observe(time.perf_counter() - started)
        return finish(200, message_response(response, 200, as_json))

    return Starlette(routes=[Route(PATH, export, methods=["POST"])])


def message_response(
    message: Any, status: int, as_json: bool, headers: dict[str, str] | None = None
) -> Response:
    if as_json:
        body = json_format.MessageToJson(message, indent=None).encode()
        return Response(body, status, headers, media_type=JSON)
    return Response(bytes(message.SerializeToString()), status, headers, media_type=PROTOBUF)


def status_response(
    status: int, message: str, as_json: bool, headers: dict[str, str] | None = None
) -> Response:
    code = outcomes.HTTP_RPC_CODE.get(status, outcomes.RPC_CODE["UNKNOWN"])
    if as_json:
        body = orjson.dumps({"code": code, "message": message})
        return Response(body, status, headers, media_type=JSON)
    return message_response(status_pb2.Status(code=code, message=message), status, False, headers)
