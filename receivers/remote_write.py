"""Prometheus remote write 1.0 receiver: ``POST /api/v1/write`` (WIRE_FORMATS.md "Prometheus").

A snappy-block-compressed protobuf ``WriteRequest`` → observations → the mapping rules
(``rules[]`` with ``match.source: remote_write``) → usage. Counters (metadata type COUNTER, or
a ``_total``/``_count``/``_sum``/``_bucket`` name) are running totals: per series they become
increases against committed state (``pipeline.cumulative.Totals``; a series' first total is a
baseline, a drop is a reset, (series, time) is the natural key). Gauges are levels, keyed by
(series, time). A stale marker ends a gauge's level (0); on a counter it adds nothing.

Series no rule could match (Prometheus sends every series it has) are skipped and counted, not
rejected. Answers: 204 once committed; 400 when samples were invalid (the valid ones are
committed, the invalid ones kept in the rejected store; Prometheus never retries a 4xx); 413
past the size limits; 415 for remote write 2.0 or other content types; when the commit queue
is full, 429 for senders known to retry it (Vector) and 503 for everyone else (Prometheus
retries 5xx but, by default, not 429).
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import cramjam
from google.protobuf.message import DecodeError as ProtoDecodeError  # type: ignore[import-untyped]
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from meter_gateway.config import IngestConfig, Rule
from meter_gateway.decimals import DecimalError, parse_value
from meter_gateway.model import (
    Batch,
    CommitResult,
    Observation,
    ObservationKind,
    Reason,
    RecordError,
    Source,
)
from meter_gateway.pipeline.cumulative import (
    Committer,
    ObservationSink,
    StreamsBusy,
    StreamTable,
    Totals,
    series_id,
)
from meter_gateway.pipeline.decode import DecodeError
from meter_gateway.pipeline.ingest import CommitFailed, Overloaded, ShuttingDown
from receivers import prompb
from receivers.rest import read_body

SOURCE = Source.REMOTE_WRITE
STATE_PREFIX = "remote_write/"
STALE_NAN_BITS = 0x7FF0000000000002
MAX_NS = 2**63 - 1  # the latest time an int64 of nanoseconds holds
_EXACT_INT = 2**53  # whole doubles below this are plain integers
MAX_LABELS = 128
MAX_LABEL_BYTES = 4096
_COUNTER_SUFFIXES = ("_total", "_count", "_sum", "_bucket")
_PACK = struct.Struct("<d")
_UNPACK = struct.Struct("<Q")

# Why a sample added nothing; label values of meter_gateway_remote_write_samples_skipped_total.
SKIP_UNMAPPED = "unmapped"  # no rule could match the series
SKIP_STALE = "stale"  # a staleness marker on a counter
SKIP_NAN = "nan"
SKIP_HISTOGRAM = "histogram"  # native histogram samples (not usage)


def check_content_type(content_type: str | None, encoding: str | None) -> None:
    """Remote write 1.0 only: protobuf, snappy. Raises ``DecodeError`` (415) otherwise."""
    if content_type is not None:
        media, _, params = content_type.partition(";")
        if media.strip().lower() != "application/x-protobuf":
            raise DecodeError(415, f"unsupported Content-Type {content_type!r}")
        for p in params.split(";"):
            key, _, value = p.partition("=")
            if key.strip().lower() == "proto" and value.strip() != "prometheus.WriteRequest":
                raise DecodeError(
                    415,
                    f"unsupported remote write message {value.strip()!r}: this receiver "
                    "speaks remote write 1.0 (prometheus.WriteRequest)",
                )
    if encoding is not None and encoding.strip().lower() not in ("snappy", ""):
        raise DecodeError(415, f"unsupported Content-Encoding {encoding!r} (expected snappy)")


def decode_body(body: bytes, max_decompressed: int) -> Any:
    """Snappy block → ``prompb.WriteRequest``; ``DecodeError`` 400/413 on bad input."""
    try:
        size = int(cramjam.snappy.decompress_raw_len(body))
    except Exception as exc:  # cramjam raises its own DecompressionError or ValueError
        raise DecodeError(400, f"body is not snappy block data: {exc}") from None
    if size > max_decompressed:
        raise DecodeError(
            413, f"decompressed body of {size} bytes exceeds the limit of {max_decompressed}"
        )
    try:
        raw = bytes(cramjam.snappy.decompress_raw(body))
    except Exception as exc:
        raise DecodeError(400, f"body is not snappy block data: {exc}") from None
    req = prompb.WriteRequest()
    try:
        req.ParseFromString(raw)
    except ProtoDecodeError as exc:
        raise DecodeError(400, f"body is not a remote write WriteRequest: {exc}") from None
    return req


class _Wanted:
    """Which metric names some remote_write rule could match (a cheap pre-filter)."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        mine = [r for r in rules if r.match.source in (None, SOURCE.value)]
        self.all = any(r.match.metric is None for r in mine)
        self.names = {r.match.metric for r in mine if r.match.metric is not None}

    def __call__(self, name: str) -> bool:
        return self.all or name in self.names


class Decoded:
    """A request's samples as observations: running totals, levels, and the samples rejected
    while decoding. Indices are sample ordinals within the request."""

    def __init__(self) -> None:
        self.cumulative: list[tuple[int, Observation]] = []
        self.levels: list[Observation] = []
        self.level_index: list[int] = []
        self.errors: list[RecordError] = []
        self.skipped: dict[str, int] = {}
        self.samples = 0

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n


def observations(req: Any, wanted: _Wanted) -> Decoded:
    out = Decoded()
    counters = {m.metric_family_name for m in req.metadata if m.type == prompb.COUNTER}
    gauges = {m.metric_family_name for m in req.metadata if m.type != prompb.COUNTER}
    index = 0
    for ts in req.timeseries:
        n = len(ts.samples)
        first = index
        index += n
        out.samples += n
        if ts.histograms:
            out.skip(SKIP_HISTOGRAM, len(ts.histograms))
        if not n:
            continue
        labels: dict[str, str] = {}
        problem: tuple[Reason, str, str] | None = None
        if len(ts.labels) > MAX_LABELS:
            problem = (Reason.TOO_LARGE, "labels", f"{len(ts.labels)} labels (max {MAX_LABELS})")
        else:
            for lb in ts.labels:
                if len(lb.name) + len(lb.value) > MAX_LABEL_BYTES:
                    problem = (
                        Reason.TOO_LARGE,
                        f"labels.{lb.name[:64]}",
                        f"label longer than {MAX_LABEL_BYTES} bytes",
                    )
                    break
                if lb.name in labels:
                    problem = (Reason.MALFORMED, f"labels.{lb.name[:64]}", "duplicate label name")
                    break
                labels[lb.name] = lb.value
        name = labels.pop("__name__", "")
        if problem is None and not name:
            problem = (Reason.MISSING_FIELD, "labels.__name__", "series has no __name__ label")
        if problem is None and not wanted(name):
            out.skip(SKIP_UNMAPPED, n)
            continue
        if problem is not None:
            reason, field, error = problem
            raw = f"{name[:200]} ({len(ts.labels)} labels, {n} samples)"
            out.errors.append(RecordError(first, field, error, reason, raw))
            continue
        family = name
        for suffix in _COUNTER_SUFFIXES:
            if name.endswith(suffix):
                family = name[: -len(suffix)]
                break
        is_counter = name in counters or family in counters
        if not is_counter and name not in gauges and family not in gauges:
            is_counter = family != name  # no metadata: the name's suffix says
        sid: str | None = None
        for k, s in enumerate(ts.samples):
            v = s.value
            t_ns = s.timestamp * 1_000_000
            # Checked before a running total can become a counter's state: a sample refused
            # only after conversion would still have moved its series' baseline.
            if not 0 < t_ns <= MAX_NS:
                out.errors.append(
                    RecordError(
                        first + k,
                        "timestamp",
                        f"sample timestamp {s.timestamp} ms is out of range: expected "
                        f"milliseconds since 1970 up to {MAX_NS // 1_000_000}",
                        Reason.INVALID_TIMESTAMP,
                        name[:200],
                    )
                )
                continue
            if math.isnan(v):
                stale = _is_stale(v)
                if stale and not is_counter:
                    value = Decimal(0)  # the series ended: so did its level
                else:
                    out.skip(SKIP_STALE if stale else SKIP_NAN)
                    continue
            elif -_EXACT_INT < v < _EXACT_INT and v == int(v):
                value = Decimal(int(v))  # the usual sample: a whole number, no checks needed
            else:
                try:
                    value = parse_value(v)  # finite, |v| < 1e21, at most 18 places
                except DecimalError as exc:
                    out.errors.append(
                        RecordError(first + k, "value", str(exc), Reason.INVALID_VALUE, name[:200])
                    )
                    continue
            if is_counter:
                obs = Observation(SOURCE, name, labels, value, ObservationKind.CUMULATIVE, t_ns)
                out.cumulative.append((first + k, obs))
            else:
                obs = Observation(SOURCE, name, labels, value, ObservationKind.LEVEL, t_ns)
                if sid is None:
                    sid = series_id(obs)
                out.levels.append(
                    Observation(
                        SOURCE, name, labels, value, ObservationKind.LEVEL, t_ns, f"{sid}:{t_ns}"
                    )
                )
                out.level_index.append(first + k)
    return out


def _is_stale(v: float) -> bool:
    return bool(_UNPACK.unpack(_PACK.pack(v))[0] == STALE_NAN_BITS)


class RemoteWriteReceiver:
    """Turns remote-write requests into committed usage (``handle`` is the HTTP endpoint)."""

    def __init__(
        self,
        rules: Sequence[Rule],
        sink: ObservationSink,
        committer: Committer,
        store: Any,
        limits: IngestConfig,
        telemetry: Any,
        retry_after_s: float,
    ) -> None:
        self._wanted = _Wanted(rules)
        self._sink = sink
        self._committer = committer
        self._limits = limits
        self._telemetry = telemetry
        self._retry_after = str(max(1, round(retry_after_s)))
        self.totals = Totals(StreamTable(store, STATE_PREFIX), sink, committer)

    def batch(self, body: bytes) -> tuple[Batch, Decoded]:
        """Decode and validate one request body (``DecodeError`` for a bad body)."""
        req = decode_body(body, self._limits.max_decompressed_bytes)
        decoded = observations(req, self._wanted)
        if decoded.samples > self._limits.max_batch_records:
            raise DecodeError(
                413,
                f"{decoded.samples} samples exceed the limit of "
                f"{self._limits.max_batch_records} per request",
            )
        if decoded.levels:
            batch = self._sink.observations(decoded.levels, SOURCE)
            for i, e in enumerate(batch.errors):
                batch.errors[i] = RecordError(
                    decoded.level_index[e.index], e.field, e.error, e.reason, e.raw
                )
        else:
            batch = Batch(SOURCE)
        batch.errors.extend(decoded.errors)
        batch.cumulative = decoded.cumulative
        return batch, decoded

    def commit(self, batch: Batch) -> CommitResult:
        """Convert running totals and commit (blocking; on a worker thread)."""
        if batch.cumulative:
            return self.totals.commit(batch)
        return self._committer.submit_sync(batch)

    async def handle(self, request: Request) -> Response:
        t = self._telemetry
        started = time.perf_counter()
        try:
            check_content_type(
                request.headers.get("content-type"), request.headers.get("content-encoding")
            )
            body = await read_body(request, self._limits.max_body_bytes)
            batch, decoded = await run_in_threadpool(self.batch, body)
        except DecodeError as exc:
            t.requests.labels(SOURCE.value, str(exc.status)).inc()
            return Response(exc.message + "\n", exc.status, media_type="text/plain")
        except ClientDisconnect:
            t.requests.labels(SOURCE.value, "499").inc()
            return Response("client disconnected\n", 400, media_type="text/plain")
        t.received.labels(SOURCE.value).inc(decoded.samples)
        for reason, n in decoded.skipped.items():
            t.remote_write_skipped.labels(reason).inc(n)
        try:
            await run_in_threadpool(self.commit, batch)
        except Overloaded:
            # Only senders known to retry a 429 get one; Prometheus drops the data on a 429
            # unless retry_on_http_429 is set, but retries every 5xx.
            ua = request.headers.get("user-agent", "")
            code = 429 if ua.startswith("Vector/") else 503
            t.requests.labels(SOURCE.value, str(code)).inc()
            return Response(
                "ingest queue is full; retry later\n",
                code,
                headers={"Retry-After": self._retry_after},
                media_type="text/plain",
            )
        except (CommitFailed, ShuttingDown, StreamsBusy) as exc:
            t.requests.labels(SOURCE.value, "503").inc()
            return Response(
                f"{exc}\n", 503, headers={"Retry-After": self._retry_after}, media_type="text/plain"
            )
        t.batch_seconds.labels(SOURCE.value).observe(time.perf_counter() - started)
        if batch.errors:
            t.requests.labels(SOURCE.value, "400").inc()
            lines = [
                f"sample {e.index}: {e.field}: {e.error} ({e.reason.value})"
                for e in sorted(batch.errors, key=lambda e: e.index)[:20]
            ]
            head = f"{len(batch.errors)} invalid samples (the valid ones were stored):"
            return Response("\n".join([head, *lines]) + "\n", 400, media_type="text/plain")
        t.requests.labels(SOURCE.value, "204").inc()
        return Response(status_code=204)
