"""The REST receiver: ``POST /v1/usage`` and Paigo's ``POST /usage``.

Takes one record, a JSON array or NDJSON, compressed or not, as sent by REST clients, Vector's
``http`` sink and Logstash's ``http`` output. Answers 2xx only after the commit, with counts and
per-record errors; the bad records are kept in the rejected-records store.
"""

from __future__ import annotations

import time
from typing import Protocol

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from meter_gateway.config import Config
from meter_gateway.http import error_response, json_response
from meter_gateway.model import Batch, CommitResult, Source
from meter_gateway.pipeline.cumulative import StreamsBusy, Totals
from meter_gateway.pipeline.decode import DecodeError, decompress, parse_items
from meter_gateway.pipeline.ingest import CommitFailed, Ingestor, Overloaded, ShuttingDown
from meter_gateway.pipeline.validate import Validator
from meter_gateway.telemetry import Telemetry

MAX_ERRORS_IN_RESPONSE = 1000


class IngestServices(Protocol):
    """What the REST receiver needs of the service that runs it (``Gateway`` has these)."""

    @property
    def config(self) -> Config: ...

    @property
    def telemetry(self) -> Telemetry: ...

    @property
    def validator(self) -> Validator: ...

    @property
    def ingestor(self) -> Ingestor: ...

    @property
    def totals(self) -> Totals: ...


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


async def ingest(request: Request, gw: IngestServices) -> Response:
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
    if batch.cumulative:
        # Running totals (Vector absolute counters) need their series' committed state:
        # convert, check and commit under a hold on those series, on a worker thread.
        return await run_in_threadpool(_ingest_totals, gw, batch, items.single, atomic, started)
    if atomic and batch.errors:
        return _atomic_refusal(gw, batch)
    try:
        result = await gw.ingestor.submit(batch)
    except (Overloaded, CommitFailed, ShuttingDown) as exc:
        return _unavailable(gw, batch, exc)
    return _answer(gw, batch, result, items.single, started)


def _ingest_totals(
    gw: IngestServices, batch: Batch, single: bool, atomic: bool, started: float
) -> Response:
    def check(converted: Batch) -> None:
        if atomic and converted.errors:
            raise _AtomicRefused

    try:
        result = gw.totals.commit(batch, check)
    except _AtomicRefused:
        return _atomic_refusal(gw, batch)
    except (Overloaded, CommitFailed, ShuttingDown, StreamsBusy) as exc:
        return _unavailable(gw, batch, exc)
    return _answer(gw, batch, result, single, started)


class _AtomicRefused(Exception):
    """An atomic request turned out to hold invalid records once its totals were converted."""


def _atomic_refusal(gw: IngestServices, batch: Batch) -> Response:
    gw.telemetry.requests.labels(batch.source.value, "422").inc()
    return json_response(
        {
            "accepted": 0,
            "duplicates": 0,
            "rejected": len(batch.errors),
            "errors": [e.to_json() for e in batch.errors[:MAX_ERRORS_IN_RESPONSE]],
            "error": "atomic batch has invalid records; nothing was stored",
        },
        422,
    )


def _unavailable(gw: IngestServices, batch: Batch, exc: Exception) -> Response:
    retry = {"Retry-After": str(max(1, round(gw.config.ingest.retry_after.total_seconds())))}
    if isinstance(exc, Overloaded):
        gw.telemetry.requests.labels(batch.source.value, "429").inc()
        return error_response(429, "ingest queue is full; retry later", retry)
    gw.telemetry.requests.labels(batch.source.value, "503").inc()
    return error_response(503, str(exc), retry)


def _answer(
    gw: IngestServices, batch: Batch, result: CommitResult, single: bool, started: float
) -> Response:
    t, source = gw.telemetry, batch.source
    errors = [e.to_json() for e in batch.errors[:MAX_ERRORS_IN_RESPONSE]]
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
    status = 422 if single and result.rejected == 1 else 200
    if status == 422:  # every error answer names what went wrong at the top (SPEC §10)
        first = batch.errors[0] if batch.errors else None
        body_out["error"] = f"the record was rejected: {first.error}" if first else "rejected"
    t.requests.labels(source.value, str(status)).inc()
    t.batch_seconds.labels(source.value).observe(time.perf_counter() - started)
    return json_response(body_out, status)
