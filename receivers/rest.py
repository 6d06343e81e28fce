"""The REST receiver: ``POST /v1/usage`` and Paigo's ``POST /usage``.

Takes one record, a JSON array or NDJSON, compressed or not, as sent by REST clients, Vector's
``http`` sink and Logstash's ``http`` output. Answers 2xx only after the commit, with counts and
per-record errors; the bad records are kept in the rejected-records store.
"""

from __future__ import annotations

import time

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from meter_gateway.model import Source
from meter_gateway.pipeline.decode import DecodeError, decompress, parse_items
from meter_gateway.pipeline.ingest import CommitFailed, Overloaded, ShuttingDown
from meter_gateway.service import Gateway

MAX_ERRORS_IN_RESPONSE = 1000


def json_response(
    body: object, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(body), status_code=status, headers=headers, media_type="application/json"
    )


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": message}, status, headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing more than ``limit`` bytes (413) before reading it all."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise DecodeError(400, "Content-Length is not a number")
        if int(length) > limit:
            raise DecodeError(413, f"body of {length} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise DecodeError(413, f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def ingest(request: Request, gw: Gateway) -> Response:
    started = time.perf_counter()
    limits = gw.config.ingest
    source = Source.REST
    t = gw.telemetry
    try:
        body = await read_body(request, limits.max_body_bytes)
        body = decompress(
            body, request.headers.get("content-encoding"), limits.max_decompressed_bytes
        )
        items = parse_items(body, request.headers.get("content-type"), limits.max_batch_records)
    except DecodeError as exc:
        t.requests.labels(source.value, str(exc.status)).inc()
        return error_response(exc.status, exc.message)
    except ClientDisconnect:
        t.requests.labels(source.value, "499").inc()
        return error_response(400, "client disconnected before the body was complete")
    t.received.labels(source.value).inc(len(items))
    batch = gw.validator.batch(items, source)
    atomic = request.query_params.get("atomic", "").lower() in ("1", "true", "yes")
    errors = [e.to_json() for e in batch.errors[:MAX_ERRORS_IN_RESPONSE]]
    if atomic and batch.errors:
        t.requests.labels(source.value, "422").inc()
        return json_response(
            {
                "accepted": 0,
                "duplicates": 0,
                "rejected": len(batch.errors),
                "errors": errors,
                "error": "atomic batch has invalid records; nothing was stored",
            },
            422,
        )
    retry = {"Retry-After": str(max(1, round(limits.retry_after.total_seconds())))}
    try:
        result = await gw.ingestor.submit(batch)
    except Overloaded:
        t.requests.labels(source.value, "429").inc()
        return error_response(429, "ingest queue is full; retry later", retry)
    except (CommitFailed, ShuttingDown) as exc:
        t.requests.labels(source.value, "503").inc()
        return error_response(503, str(exc), retry)
    body_out = {
        "accepted": result.accepted,
        "duplicates": result.duplicates,
        "rejected": result.rejected,
        "errors": errors,
    }
    if len(batch.errors) > MAX_ERRORS_IN_RESPONSE:
        body_out["errors_truncated"] = True
    # A lone record that was rejected is an error to its sender; in a batch, the good records
    # were stored and the answer must be 2xx so Vector and Logstash do not drop or retry them.
    single = items.single and result.rejected == 1
    status = 422 if single else 200
    t.requests.labels(source.value, str(status)).inc()
    t.batch_seconds.labels(source.value).observe(time.perf_counter() - started)
    return json_response(body_out, status)
