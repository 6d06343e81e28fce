"""The REST receiver: ``POST /v1/usage`` and Paigo's ``POST /usage``.

Takes one record, a JSON array or NDJSON, compressed or not, as sent by REST clients, Vector's
``http`` sink and Logstash's ``http`` output. Answers 2xx only after the commit, with counts and
per-record errors; the bad records are kept in the rejected-records store.

Admission comes first: before the body is read, the request reserves what it will hold of the
ingest memory budget (``pipeline.admission``) and is answered 429 at once when it is spent.
Decoding and validating a large body is CPU work of tens of milliseconds: it runs on the
bounded ``decode_pool`` threads, so the event loop keeps answering (``/healthz`` under load).
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
from meter_gateway.pipeline import outcomes
from meter_gateway.pipeline.admission import EXPANSION, Budget, Reservation, TooLarge, Workers
from meter_gateway.pipeline.cumulative import StreamsBusy, Totals
from meter_gateway.pipeline.decode import DecodeError, decompress, parse_items
from meter_gateway.pipeline.ingest import CommitFailed, Ingestor, Overloaded, ShuttingDown
from meter_gateway.pipeline.validate import Validator
from meter_gateway.telemetry import Telemetry

MAX_ERRORS_IN_RESPONSE = 1000
#: Bodies up to this size are decoded and validated on the event loop (well under a
#: millisecond); larger ones on ``decode_pool``, where the thread hop is worth it.
INLINE_MAX_BYTES = 8 * 1024


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

    @property
    def decode_pool(self) -> Workers:
        """A few threads for decoding and validating large bodies off the event loop."""
        ...


def content_length(request: Request) -> int | None:
    """The declared body size; DecodeError (400) when it is not a number."""
    length = request.headers.get("content-length")
    if length is None:
        return None
    if not length.isdigit():
        raise DecodeError(400, "Content-Length is not a number")
    return int(length)


async def read_body(request: Request, limit: int, reservation: Reservation | None = None) -> bytes:
    """The raw body, refusing more than ``limit`` bytes (413) before reading it all.

    With a ``reservation``, a body longer than it covers (no Content-Length: chunked) grows it
    as it arrives, ``EXPANSION`` bytes a byte; past the budget that raises ``Overloaded``.
    """
    length = content_length(request)
    if length is not None and length > limit:
        raise DecodeError(413, f"body of {length} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise DecodeError(413, f"body exceeds the limit of {limit} bytes")
        if reservation is not None and size * EXPANSION > reservation.nbytes:
            reservation.resize(size * EXPANSION)
        chunks.append(chunk)
    return b"".join(chunks)


def admit(budget: Budget | None, request: Request) -> Reservation | None:
    """Reserve the request's share of the memory budget before its body is read: ``EXPANSION``
    × Content-Length (a compressed body grows it once decompressed). Raises ``Overloaded``
    (429) when the budget is spent, ``TooLarge`` when the body alone exceeds it."""
    length = content_length(request)
    if budget is None:
        return None
    if length is None:
        return budget.reserve(0)  # grown as the body arrives
    return budget.reserve(length * EXPANSION, wire_bytes=length)


async def ingest(request: Request, gw: IngestServices) -> Response:
    started = time.perf_counter()
    source = Source.REST
    t = gw.telemetry
    try:
        if (content_length(request) or INLINE_MAX_BYTES + 1) > INLINE_MAX_BYTES:
            gw.decode_pool.admit()  # a large body would wait seconds for a decode thread
        reservation = admit(gw.ingestor.budget, request)
    except DecodeError as exc:
        t.requests.labels(source.value, str(exc.status)).inc()
        return error_response(exc.status, exc.message)
    except TooLarge as exc:
        return _unavailable(gw, source, exc)
    except Overloaded as exc:
        t.overloaded.labels(source.value).inc()
        return _unavailable(gw, source, exc)
    handed = False  # to the ingestor, with the batch: it releases the reservation then
    try:
        handed, response = await _ingest(request, gw, reservation, started)
        return response
    finally:
        if reservation is not None and not handed:
            reservation.release()


async def _ingest(
    request: Request, gw: IngestServices, reservation: Reservation | None, started: float
) -> tuple[bool, Response]:
    """The answer, and whether the reservation went to the ingestor with the batch."""
    limits = gw.config.ingest
    source = Source.REST
    t = gw.telemetry
    encoding = request.headers.get("content-encoding")
    ctype = request.headers.get("content-type")
    try:
        body = await read_body(request, limits.max_body_bytes, reservation)
        if len(body) <= INLINE_MAX_BYTES and not encoding:
            batch, single = _decode(gw, body, encoding, ctype, reservation)
        else:
            batch, single = await gw.decode_pool.run(
                _decode, gw, body, encoding, ctype, reservation
            )
        del body  # held by the batch's records from here on, not as text
    except DecodeError as exc:
        t.requests.labels(source.value, str(exc.status)).inc()
        return False, error_response(exc.status, exc.message)
    except ClientDisconnect:
        t.requests.labels(source.value, "499").inc()
        return False, error_response(400, "client disconnected before the body was complete")
    except Overloaded as exc:  # a chunked or compressed body outgrew what was left
        t.overloaded.labels(source.value).inc()
        return False, _unavailable(gw, source, exc)
    atomic = request.query_params.get("atomic", "").lower() in ("1", "true", "yes")
    if batch.cumulative:
        # Running totals (Vector absolute counters) need their series' committed state:
        # convert, check and commit under a hold on those series, on a worker thread.
        answer = await run_in_threadpool(_ingest_totals, gw, batch, single, atomic, started)
        return False, answer
    if atomic and batch.errors:
        return False, _atomic_refusal(gw, batch)
    batch.atomic = atomic
    try:
        # From here the ingestor owns the reservation, refused or not.
        result = await gw.ingestor.submit(batch, reservation)
    except (Overloaded, CommitFailed, ShuttingDown) as exc:
        return True, _unavailable(gw, source, exc)
    if atomic and batch.errors:  # a record the store could not keep: nothing was stored
        return True, _atomic_refusal(gw, batch)
    return True, _answer(gw, batch, result, single, started)


def _decode(
    gw: IngestServices,
    body: bytes,
    encoding: str | None,
    ctype: str | None,
    reservation: Reservation | None,
) -> tuple[Batch, bool]:
    """Body → validated batch (CPU work: on the loop for small bodies, else on a worker)."""
    limits = gw.config.ingest
    if encoding:
        body = decompress(body, encoding, limits.max_decompressed_bytes)
        if reservation is not None and len(body) * EXPANSION > reservation.nbytes:
            reservation.resize(len(body) * EXPANSION)
    items = parse_items(body, ctype, limits.max_batch_records)
    gw.telemetry.received.labels(Source.REST.value).inc(len(items))
    return gw.validator.batch(items, Source.REST), items.single


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
        return _unavailable(gw, batch.source, exc)
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


def _unavailable(gw: IngestServices, source: Source, exc: Exception) -> Response:
    """The answer to a refused batch (``pipeline.outcomes``: 429, 503 or 413)."""
    a = outcomes.answer(exc, gw.config.ingest.retry_after.total_seconds())
    gw.telemetry.requests.labels(source.value, a.code).inc()
    return error_response(a.http, a.message, a.headers())


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
