"""Prometheus remote write 1.0 receiver: ``POST /api/v1/write`` (WIRE_FORMATS.md "Prometheus").

A snappy-block-compressed protobuf ``WriteRequest`` → observations → the mapping rules
(``rules[]`` with ``match.source: remote_write``) → usage. Counters (metadata type COUNTER, or
a ``_total``/``_count``/``_sum``/``_bucket`` name) are running totals: per series they become
increases against committed state (``pipeline.cumulative.Totals``; a series' first total is a
baseline, a drop is a reset, (series, time) is the natural key), their state kept one row per
group of series first seen together (``TotalGroups``). Gauges are levels, keyed by
(series, time). A stale marker ends a gauge's level (0); on a counter it adds nothing.

Series no rule could match (Prometheus sends every series it has) are skipped and counted, not
rejected. Answers: 204 once committed; 400 when samples were invalid (the valid ones are
committed, the invalid ones kept in the rejected store; Prometheus never retries a 4xx); 413
past the size limits; 415 for remote write 2.0 or other content types; when the commit queue
is full, 429 for senders known to retry it (Vector) and 503 for everyone else (Prometheus
retries 5xx but, by default, not 429). Every error is JSON ``{"error": ...}`` (SPEC §10; the
400 also lists the refused samples); Prometheus and Vector only log the body.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from decimal import Decimal
from typing import Any, NamedTuple

import cramjam
from google.protobuf.message import DecodeError as ProtoDecodeError  # type: ignore[import-untyped]
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from meter_gateway.catalog import Catalog
from meter_gateway.clock import Clock
from meter_gateway.config import IngestConfig, Rule
from meter_gateway.decimals import ZERO, DecimalError, parse_value
from meter_gateway.http import error_response
from meter_gateway.model import (
    Batch,
    CommitResult,
    Observation,
    ObservationKind,
    Reason,
    RecordError,
    Source,
    UsageRecord,
)
from meter_gateway.pipeline import outcomes
from meter_gateway.pipeline.cumulative import (
    Committer,
    ObservationSink,
    SeriesMappings,
    Snap,
    TimeWindow,
    Total,
    TotalGroups,
    Totals,
    series_id,
)
from meter_gateway.pipeline.decode import DecodeError
from meter_gateway.pipeline.mapping import Mapper
from receivers import prompb
from receivers.rest import read_body

SOURCE = Source.REMOTE_WRITE
STATE_PREFIX = "remote_write/"
STALE_NAN_BITS = 0x7FF0000000000002
MAX_NS = 2**63 - 1  # the latest time an int64 of nanoseconds holds
_EXACT_INT = float(2**53)  # whole doubles below this are plain integers (a float: compared
# with doubles, an int costs a conversion every time)
MAX_LABELS = 128
MAX_LABEL_BYTES = 4096
MAX_ERRORS = 100  # refused samples listed in a 400 answer (all are in /v1/rejected)
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
    return parse(decompress(body, max_decompressed))


def decompress(body: bytes, max_decompressed: int) -> bytes:
    """Snappy block → the serialized ``WriteRequest``; ``DecodeError`` 400/413 on bad input."""
    try:
        size = int(cramjam.snappy.decompress_raw_len(body))
    except Exception as exc:  # cramjam raises its own DecompressionError or ValueError
        raise DecodeError(400, f"body is not snappy block data: {exc}") from None
    if size > max_decompressed:
        raise DecodeError(
            413, f"decompressed body of {size} bytes exceeds the limit of {max_decompressed}"
        )
    try:
        return bytes(cramjam.snappy.decompress_raw(body))
    except Exception as exc:
        raise DecodeError(400, f"body is not snappy block data: {exc}") from None


def parse(raw: bytes) -> Any:
    """The serialized ``WriteRequest`` as a message; ``DecodeError`` 400 if it is not one."""
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


class _Series(NamedTuple):
    """What a series' labels say, worked out once per series (``SeriesCache``)."""

    name: str
    family: str  # the name without a counter suffix
    labels: dict[str, str]  # without __name__
    sid: str  # pipeline.cumulative.series_id: state keys and natural keys
    wanted: bool  # some rule could match its name
    problem: tuple[Reason, str, str] | None  # why its samples are refused
    n_labels: int
    template: Observation  # its name and labels, for its totals (pipeline.cumulative.Total)
    counter: bool  # wanted, valid, and a counter by its name (requests without metadata)


def describe(pairs: Sequence[tuple[str, str]], wanted: _Wanted) -> _Series:
    """A series from its labels, as (name, value) pairs in wire order."""
    labels: dict[str, str] = {}
    problem: tuple[Reason, str, str] | None = None
    if len(pairs) > MAX_LABELS:
        problem = (Reason.TOO_LARGE, "labels", f"{len(pairs)} labels (max {MAX_LABELS})")
    else:
        for key, value in pairs:
            if len(key) + len(value) > MAX_LABEL_BYTES:
                problem = (
                    Reason.TOO_LARGE,
                    f"labels.{key[:64]}",
                    f"label longer than {MAX_LABEL_BYTES} bytes",
                )
                break
            if key in labels:
                problem = (Reason.MALFORMED, f"labels.{key[:64]}", "duplicate label name")
                break
            labels[key] = value
    name = labels.pop("__name__", "")
    if problem is None and not name:
        problem = (Reason.MISSING_FIELD, "labels.__name__", "series has no __name__ label")
    family = name
    for suffix in _COUNTER_SUFFIXES:
        if name.endswith(suffix):
            family = name[: -len(suffix)]
            break
    wants = problem is None and wanted(name)
    template = Observation(SOURCE, name, labels, ZERO, ObservationKind.CUMULATIVE, 0)
    sid = series_id(template) if wants else ""
    counter = wants and family != name
    return _Series(name, family, labels, sid, wants, problem, len(pairs), template, counter)


class SeriesCache:
    """Series by the bytes of their labels (``prompb.scan``), bounded: emptied when full."""

    def __init__(self, wanted: _Wanted, max_series: int = 250_000) -> None:
        self._wanted = wanted
        self._max = max_series
        self.known: dict[bytes, _Series] = {}

    def get(self, labels: bytes) -> _Series:
        series = self.known.get(labels)
        if series is None:
            ts = prompb.TimeSeries()
            try:
                ts.ParseFromString(labels)
            except ProtoDecodeError as exc:
                raise DecodeError(400, f"body is not a remote write WriteRequest: {exc}") from None
            series = describe([(lb.name, lb.value) for lb in ts.labels], self._wanted)
            if len(self.known) >= self._max:
                self.known.clear()
            self.known[labels] = series
        return series


class Decoded:
    """A request's samples as observations: running totals, levels, and the samples rejected
    while decoding. Indices are sample ordinals within the request."""

    def __init__(self) -> None:
        self.totals: list[Total] = []  # counters' samples, for pipeline.cumulative.Totals
        self.total_sids: list[str] = []
        self.levels: list[Observation] = []
        self.level_index: list[int] = []
        self.level_sids: list[str] = []
        self.records: list[UsageRecord] = []  # levels of known series, mapped already
        self.errors: list[RecordError] = []
        self.skipped: dict[str, int] = {}
        self.samples = 0

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n


Samples = Sequence[tuple[float, int]]


def _message_series(req: Any, wanted: _Wanted) -> Iterator[tuple[_Series | None, Samples, int]]:
    """The series of a request parsed as messages (any layout): (series, samples, histograms);
    series None when it has no samples."""
    for ts in req.timeseries:
        samples = [(s.value, s.timestamp) for s in ts.samples]
        series = describe([(lb.name, lb.value) for lb in ts.labels], wanted) if samples else None
        yield series, samples, len(ts.histograms)


def observations(
    series: Iterable[tuple[_Series | None, Samples, int]],
    counters: set[str],
    gauges: set[str],
    mappings: SeriesMappings | None = None,
    snap: Snap | None = None,
    out: Decoded | None = None,
) -> Decoded:
    """Samples → observations (and records of levels of known series, with ``mappings``),
    added to ``out`` if given (its samples so far: the ordinal of the first here)."""
    if out is None:
        out = Decoded()
    index = out.samples
    totals, total_sids = out.totals, out.total_sids
    record = mappings.record if mappings is not None and snap is not None else None
    for s, samples, histograms in series:
        n = len(samples)
        first = index
        index += n
        out.samples += n
        if histograms:
            out.skip(SKIP_HISTOGRAM, histograms)
        if s is None or not n:
            continue
        name = s.name
        if s.problem is not None:
            reason, field, error = s.problem
            raw = f"{name[:200]} ({s.n_labels} labels, {n} samples)"
            out.errors.append(RecordError(first, field, error, reason, raw))
            continue
        if not s.wanted:
            out.skip(SKIP_UNMAPPED, n)
            continue
        family, labels, sid, template = s.family, s.labels, s.sid, s.template
        if counters or gauges:
            is_counter = name in counters or family in counters
            if not is_counter and name not in gauges and family not in gauges:
                is_counter = family != name  # no metadata: the name's suffix says
        else:
            is_counter = family != name
        k = first - 1
        for v, t_ms in samples:
            k += 1
            t_ns = t_ms * 1_000_000
            # Checked before a running total can become a counter's state: a sample refused
            # only after conversion would still have moved its series' baseline.
            if not 0 < t_ns <= MAX_NS:
                out.errors.append(
                    RecordError(
                        k,
                        "timestamp",
                        f"sample timestamp {t_ms} ms is out of range: expected "
                        f"milliseconds since 1970 up to {MAX_NS // 1_000_000}",
                        Reason.INVALID_TIMESTAMP,
                        name[:200],
                    )
                )
                continue
            if -_EXACT_INT < v < _EXACT_INT and v == int(v):
                value = Decimal(int(v))  # the usual sample: a whole number, no checks needed
            elif v != v:  # NaN
                stale = _is_stale(v)
                if stale and not is_counter:
                    value = ZERO  # the series ended: so did its level
                else:
                    out.skip(SKIP_STALE if stale else SKIP_NAN)
                    continue
            else:
                try:
                    value = parse_value(v)  # finite, |v| < 1e21, at most 18 places
                except DecimalError as exc:
                    out.errors.append(
                        RecordError(k, "value", str(exc), Reason.INVALID_VALUE, name[:200])
                    )
                    continue
            if is_counter:
                totals.append((k, t_ns, value, template))
                total_sids.append(sid)
                continue
            nk = f"{sid}:{t_ns}"
            if record is not None:
                assert snap is not None
                rec = record(snap, sid, value, t_ns)  # its natural key is nk
                if rec is not None:
                    out.records.append(rec)
                    continue
            out.levels.append(
                Observation(SOURCE, name, labels, value, ObservationKind.LEVEL, t_ns, nk)
            )
            out.level_index.append(k)
            out.level_sids.append(sid)
    return out


def _is_stale(v: float) -> bool:
    return bool(_UNPACK.unpack(_PACK.pack(v))[0] == STALE_NAN_BITS)


class RemoteWriteReceiver:
    """Turns remote-write requests into committed usage (``handle`` is the HTTP endpoint).

    Series are remembered by their label bytes (``SeriesCache``) and how they map by their id
    (``pipeline.cumulative.SeriesMappings``, per catalog snapshot): a known series' samples
    are read from the wire without building messages and become records without the
    validator. Without ``catalog`` and ``clock`` every sample goes through the validator and
    totals are not checked for their time before converting (tests of the parts only).
    """

    def __init__(
        self,
        rules: Sequence[Rule],
        sink: ObservationSink,
        committer: Committer,
        store: Any,
        limits: IngestConfig,
        telemetry: Any,
        retry_after_s: float,
        *,
        catalog: Callable[[], Catalog] | None = None,
        clock: Clock | None = None,
        max_cached_series: int = 250_000,
    ) -> None:
        self._wanted = _Wanted(rules)
        self._sink = sink
        self._committer = committer
        self._limits = limits
        self._telemetry = telemetry
        self._retry_after_s = retry_after_s
        # Decoding and converting hold the GIL throughout: requests that take turns at them
        # every switch interval only evict each other's data from the caches, so one computes
        # at a time (commits, which wait, are not under it).
        self._computing = threading.Lock()
        self.series = SeriesCache(self._wanted, max_cached_series)
        self.mappings = (
            SeriesMappings(SOURCE, Mapper(rules), catalog, clock, limits, max_cached_series)
            if catalog is not None and clock is not None
            else None
        )
        self.totals = Totals(
            TotalGroups(store, STATE_PREFIX, max_cached=max_cached_series),
            sink,
            committer,
            window=TimeWindow(clock, limits) if clock is not None else None,
            mappings=self.mappings,
            serial=self._computing,
        )

    def batch(self, body: bytes) -> tuple[Batch, Decoded]:
        """Decode and validate one request body (``DecodeError`` for a bad body)."""
        with self._computing:
            return self._batch(body)

    def _batch(self, body: bytes) -> tuple[Batch, Decoded]:
        raw = decompress(body, self._limits.max_decompressed_bytes)
        mappings = self.mappings
        snap = mappings.snapshot() if mappings is not None else None
        scan = prompb.scan(raw, self.series.known)
        if scan is not None:
            scanned, n = scan
            self._check_size(n)
            decoded = self._scanned(scanned, mappings, snap)
        else:
            req = parse(raw)
            self._check_size(sum(len(ts.samples) for ts in req.timeseries))
            counters = {m.metric_family_name for m in req.metadata if m.type == prompb.COUNTER}
            gauges = {m.metric_family_name for m in req.metadata if m.type != prompb.COUNTER}
            decoded = observations(
                _message_series(req, self._wanted), counters, gauges, mappings, snap
            )
        if decoded.levels:
            batch = self._sink.observations(decoded.levels, SOURCE)
            if mappings is not None and snap is not None:
                mappings.learn(snap, decoded.level_sids, decoded.levels, batch)
            for i, e in enumerate(batch.errors):
                batch.errors[i] = RecordError(
                    decoded.level_index[e.index], e.field, e.error, e.reason, e.raw
                )
            batch.records.extend(decoded.records)
        else:
            batch = Batch(SOURCE, decoded.records)
        batch.errors.extend(decoded.errors)
        return batch, decoded

    def _scanned(
        self,
        scanned: prompb.Scanned,
        mappings: SeriesMappings | None,
        snap: Snap | None,
    ) -> Decoded:
        """``observations`` of a scanned request (no metadata: names say what is a counter),
        the usual sample inline: the one sample of a counter series some rule may match, a
        whole number at a valid time, is a running total as ``observations`` would make it.
        Every other series goes through ``observations``."""
        out = Decoded()
        totals, sids = out.totals, out.total_sids
        known, get = self.series.known.get, self.series.get
        none: set[str] = set()
        k = 0  # the ordinal of the next sample
        valid: dict[int, int] = {}  # a request's few times: ms → ns (0: out of range)
        for labels, v, t_ms, more in scanned:
            s = known(labels) or get(labels)
            if more is None:
                if s.counter:
                    t_ns = valid.get(t_ms)
                    if t_ns is None:
                        t_ns = t_ms * 1_000_000
                        t_ns = valid[t_ms] = t_ns if 0 < t_ns <= MAX_NS else 0
                    if t_ns and -_EXACT_INT < v < _EXACT_INT and v.is_integer():
                        totals.append((k, t_ns, Decimal(int(v)), s.template))
                        sids.append(s.sid)
                        k += 1
                        continue
                samples = [(v, t_ms)]
            else:
                samples = more
            if s.problem is None and not s.wanted and samples:
                out.skip(SKIP_UNMAPPED, len(samples))
                k += len(samples)
                continue
            out.samples = k
            observations(((s, samples, 0),), none, none, mappings, snap, out)
            k = out.samples
        out.samples = k
        return out

    def _check_size(self, samples: int) -> None:
        if samples > self._limits.max_batch_records:
            raise DecodeError(
                413,
                f"{samples} samples exceed the limit of "
                f"{self._limits.max_batch_records} per request",
            )

    def receive(self, body: bytes) -> Batch:
        """``batch`` and ``commit`` of one request body, counted (blocking; one worker thread
        for both: every hop between the event loop and a worker costs both of them CPU)."""
        batch, decoded = self.batch(body)
        t = self._telemetry
        t.received.labels(SOURCE.value).inc(decoded.samples)
        for reason, n in decoded.skipped.items():
            t.remote_write_skipped.labels(reason).inc(n)
        self.commit(batch, decoded)
        return batch

    def commit(self, batch: Batch, decoded: Decoded) -> CommitResult:
        """Convert the request's running totals and commit (blocking; on a worker thread)."""
        if decoded.totals:
            return self.totals.commit(batch, sids=decoded.total_sids, totals=decoded.totals)
        return self._committer.submit_sync(batch)

    async def handle(self, request: Request) -> Response:
        t = self._telemetry
        started = time.perf_counter()
        try:
            check_content_type(
                request.headers.get("content-type"), request.headers.get("content-encoding")
            )
            body = await read_body(request, self._limits.max_body_bytes)
        except DecodeError as exc:
            t.requests.labels(SOURCE.value, str(exc.status)).inc()
            return error_response(exc.status, exc.message)
        except ClientDisconnect:
            t.requests.labels(SOURCE.value, "499").inc()
            return error_response(400, "client disconnected before the body was complete")
        try:
            batch = await run_in_threadpool(self.receive, body)
        except DecodeError as exc:  # (raised by batch, before anything commits)
            t.requests.labels(SOURCE.value, str(exc.status)).inc()
            return error_response(exc.status, exc.message)
        except outcomes.REFUSALS as exc:  # (raised by commit)
            # Only senders known to retry a 429 get one; Prometheus drops the data on a 429
            # unless retry_on_http_429 is set, but retries every 5xx.
            vector = request.headers.get("user-agent", "").startswith("Vector/")
            a = outcomes.answer(exc, self._retry_after_s, no_429=not vector)
            t.requests.labels(SOURCE.value, a.code).inc()
            return error_response(a.http, a.message, a.headers())
        t.batch_seconds.labels(SOURCE.value).observe(time.perf_counter() - started)
        if batch.errors:
            t.requests.labels(SOURCE.value, "400").inc()
            message, fields = invalid_samples(batch.errors)
            return error_response(400, message, **fields)
        t.requests.labels(SOURCE.value, "204").inc()
        return Response(status_code=204)


def invalid_samples(errors: Sequence[RecordError]) -> tuple[str, dict[str, Any]]:
    """The 400 answer (the ``Error`` shape): its message, how many samples were refused, and
    the first ``MAX_ERRORS`` of them as "sample <ordinal>: <field>: <error> (<reason>)"."""
    refused = sorted(errors, key=lambda e: e.index)
    rejected = len({e.index for e in refused})
    return f"{rejected} invalid samples (the valid ones were stored)", {
        "rejected": rejected,
        "errors": [
            f"sample {e.index}: {e.field}: {e.error} ({e.reason.value})"
            for e in refused[:MAX_ERRORS]
        ],
    }
