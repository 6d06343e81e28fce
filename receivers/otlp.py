"""OTLP metrics → observations, shared by the gRPC and the HTTP receiver.

``OtlpMetrics.export`` walks one ``ExportMetricsServiceRequest``: delta sums and histograms
become amounts, gauges levels, and cumulative sums, histograms and summaries are turned into
deltas per stream (``convert``) against state that commits in the same transaction as the
records. Every point is identified by its stream and time, so a retried export counts once: a
delta point by its dedup key, a cumulative point by its series' state, whose time it does not
pass (a repeat adds nothing), committed in the same transaction as its amount. An amount of a
running total carries no dedup key of its own: it would only repeat that, at the cost of a
digest, a dedup probe and a key in the dedup window per point.

Streams, as WIRE_FORMATS.md "OTLP metrics" defines them: resource, scope, metric name, unit,
type, temporality, monotonicity and point attributes identify a *series*; its start time tells
one run of the counter from the next. Per series the state keeps (start, last time, last value),
in one row per metric of a resource and scope (``pipeline.cumulative.StreamGroups``): a request
commits one state row per metric it carries, not one per point.
On a series' first point a start before the time is a true start (the whole value is the delta),
a start equal to the time (or unset) is unknown and only sets the baseline. A later start time is
a new run (an app restart): its value counts from zero again. A drop in a monotonic sum or a
histogram count is a reset. A point at or before the last time seen is a repeat and adds nothing,
and a step of zero adds no record (the state still moves). State of series silent for longer
than the late-arrival limit is forgotten, hourly.

Histograms (explicit and exponential) and summaries carry two observations, ``<name>.count``
and ``<name>.sum``; a point is rejected as unmapped only when neither maps. NaN points and points
flagged ``NO_RECORDED_VALUE`` are skipped.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NamedTuple, Protocol

import orjson
from google.protobuf import json_format  # type: ignore[import-untyped]
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from meter_gateway.catalog import Catalog
from meter_gateway.clock import Clock
from meter_gateway.config import IngestConfig, Rule
from meter_gateway.decimals import EXACT, MAX_ABS, MAX_PLACES, ZERO, DecimalError, parse_value
from meter_gateway.model import (
    Batch,
    CommitResult,
    Observation,
    ObservationKind,
    Reason,
    RecordError,
    Source,
    UsageRecord,
    dedup_prefix,
)
from meter_gateway.pipeline.cumulative import (
    STATE_CONFLICT_RETRIES,
    Committer,
    GroupEntry,
    InexactStep,
    Level,
    ObservationSink,
    SeriesMapping,
    StateReader,
    StreamGroups,
    StreamsBusy,
    convert,
    group_entry_state,
    level_decimal,
    line,
)
from meter_gateway.pipeline.mapping import Mapped, Unmapped
from meter_gateway.pipeline.validate import time_window_error
from meter_gateway.telemetry import Telemetry
from receivers.otlp_codec import is_series_key, read_number_point

log = logging.getLogger(__name__)

STATE_PREFIX = "otlp/"
NS = 1_000_000_000
DELTA, CUMULATIVE = 1, 2
NO_RECORDED_VALUE = 1  # DataPointFlags.DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK
MAX_ATTRIBUTES = 128  # per point or resource; more is rejected as too_large
MAX_ERROR_MESSAGES = 5  # distinct messages quoted in a partial success
EXPIRY_INTERVAL_NS = 3600 * 1_000_000_000  # how often stale cumulative series are forgotten
# How much longer than the late-arrival limit a series' state is kept: it is what makes a resent
# total add nothing, so it outlives the oldest total any replica accepts (its clock may be
# behind, and a request may wait for holds and its commit after its totals were checked).
EXPIRY_MARGIN_NS = 3600 * 1_000_000_000
WALKERS = 2  # exports walked at once (the rest wait for a turn, committing ones do not count)

AMOUNT, LEVEL = ObservationKind.AMOUNT, ObservationKind.LEVEL
OTLP = Source.OTLP
# The validator's dedup digest of an OTLP natural key is model.dedup_key("otlp", key); the hot
# path hashes on from its prefix state itself (natural keys are ASCII; tests check they agree).
_KEY_HASH = dedup_prefix(OTLP.value)
_MAX_CACHED_KEY = 1024  # bytes of serialized attributes worth remembering


def _put_bounded(cache: dict[Any, Any], key: Any, value: Any, limit: int) -> None:
    """Insert into a memo that is simply emptied when full (its entries are all recomputable)."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value


def natural_dedup_key(natural_key: str) -> bytes:
    h = _KEY_HASH.copy()
    h.update(natural_key.encode())
    return h.digest()


# Why a point added nothing; label values of meter_gateway_otlp_points_skipped_total.
SKIP_NO_VALUE = "no_value"  # NaN or NO_RECORDED_VALUE (the other reasons: pipeline.cumulative)


# --- the stages this receiver is handed (and ObservationSink, Committer, StateReader from
# pipeline.cumulative, which every receiver of running totals shares) -------------------------


class RuleMatcher(Protocol):
    """The mapping rules (``pipeline.mapping.Mapper``)."""

    rules: tuple[Rule, ...]

    def map(self, obs: Observation) -> Mapped | Unmapped: ...


# --- errors and results ----------------------------------------------------------------------


class OtlpError(Exception):
    """A request the receiver refuses as a whole; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class ExportOutcome:
    points: int
    accepted: int
    duplicates: int
    rejected: int  # data points rejected (partial success)
    error_message: str


# --- decoding --------------------------------------------------------------------------------


def decode_protobuf(body: bytes) -> Any:
    """An ``ExportMetricsServiceRequest`` from protobuf bytes; unknown fields are ignored."""
    request = ExportMetricsServiceRequest()
    try:
        request.ParseFromString(body)
    except (DecodeError, RecursionError, ValueError) as exc:
        raise OtlpError(
            400, f"body is not a valid OTLP ExportMetricsServiceRequest protobuf: {exc}"
        ) from None
    return request


def decode_json(body: bytes) -> Any:
    """An ``ExportMetricsServiceRequest`` from OTLP/JSON.

    64-bit integers may be strings or numbers, enums are integers, unknown fields are ignored,
    and trace and span ids of exemplars are hex (protobuf's JSON mapping expects base64).
    """
    try:
        doc = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise OtlpError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise OtlpError(400, "expected a JSON object with resourceMetrics")
    _hex_ids_to_base64(doc)
    request = ExportMetricsServiceRequest()
    try:
        json_format.ParseDict(doc, request, ignore_unknown_fields=True)
    except (json_format.ParseError, RecursionError, ValueError, TypeError) as exc:
        raise OtlpError(400, f"body is not a valid OTLP/JSON metrics request: {exc}") from None
    return request


def _hex_ids_to_base64(doc: dict[str, Any]) -> None:
    for rm in _dicts(doc.get("resourceMetrics")):
        for sm in _dicts(rm.get("scopeMetrics")):
            for metric in _dicts(sm.get("metrics")):
                for kind in ("sum", "gauge", "histogram", "exponentialHistogram"):
                    data = metric.get(kind)
                    if not isinstance(data, dict):
                        continue
                    for point in _dicts(data.get("dataPoints")):
                        for ex in _dicts(point.get("exemplars")):
                            for key in ("traceId", "spanId", "trace_id", "span_id"):
                                v = ex.get(key)
                                if isinstance(v, str) and v:
                                    try:
                                        ex[key] = base64.b64encode(bytes.fromhex(v)).decode()
                                    except ValueError:
                                        raise OtlpError(
                                            400, f"exemplar {key} {v[:40]!r} is not hex"
                                        ) from None


def _dicts(v: Any) -> Iterable[dict[str, Any]]:
    return [x for x in v if isinstance(x, dict)] if isinstance(v, list) else []


def count_points(request: Any) -> int:
    n = 0
    for rm in request.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                if kind is not None:
                    n += len(getattr(m, kind).data_points)
    return n


# --- attributes ------------------------------------------------------------------------------


def any_value_text(v: Any) -> str:
    """An OTLP ``AnyValue`` as the text mapping rules compare with."""
    which = v.WhichOneof("value")
    if which == "string_value":
        return str(v.string_value)
    if which == "int_value":
        return str(v.int_value)
    if which == "bool_value":
        return "true" if v.bool_value else "false"
    if which == "double_value":
        return repr(v.double_value)
    if which is None:
        return ""
    return orjson.dumps(_any_json(v)).decode()


def _any_json(v: Any) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_any_json(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _any_json(kv.value) for kv in v.kvlist_value.values}
    if which == "bytes_value":
        return base64.b64encode(v.bytes_value).decode()
    if which == "double_value":
        d = v.double_value
        return d if d == d and d not in (float("inf"), float("-inf")) else repr(d)
    if which is None:
        return None
    return getattr(v, which)


def attributes(kvs: Any, max_bytes: int) -> dict[str, str] | str:
    """Attributes as text, or why they are refused (too many, too large)."""
    if len(kvs) > MAX_ATTRIBUTES:
        return f"{len(kvs)} attributes; at most {MAX_ATTRIBUTES} are accepted"
    out: dict[str, str] = {}
    size = 0
    for kv in kvs:
        v = kv.value
        text = v.string_value if v.WhichOneof("value") == "string_value" else any_value_text(v)
        out[kv.key] = text
        size += len(kv.key) + len(text)
    if size > max_bytes:
        return f"attributes take {size} bytes; at most {max_bytes} are accepted"
    return out


# --- cumulative → delta ----------------------------------------------------------------------


# --- the receiver ----------------------------------------------------------------------------


class _About(NamedTuple):
    """What a cumulative point's slow paths need besides its numbers (one per series)."""

    name: str
    attrs: dict[str, str]
    resource: dict[str, str]
    monotonic: bool
    want_count: bool = True  # histograms: whether the count half is mapped


# A cumulative point waiting for its series' state: (ordinal, series id, group (its state's
# row: the metric's, ``StreamGroups``), start, time, value (an int for an ``asInt``), sum
# (histograms), whether a histogram, index of its ``_About`` in ``_Export.about``). Atoms
# only, on purpose: the garbage collector stops tracking such a tuple at its first pass, while
# one holding the attributes would be scanned, and promoted, until the request has committed.
_Cumulative = tuple[int, str, str, int, int, Level, Decimal | None, bool, int]


class _PointSeries(NamedTuple):
    """The series of a number point, remembered by its bytes from its attributes on."""

    sid: str
    attrs: dict[str, str]
    about: _About  # as a cumulative point needs it


class _Export:
    """What one request turns into: records, observations still to validate, errors."""

    def __init__(
        self, serial: int, lo: int, hi: int, oldest: int, newest: int, limits: IngestConfig
    ) -> None:
        self.serial = serial  # of the catalog snapshot (catalog.Catalog.serial)
        self.lo, self.hi = lo, hi  # times the fast path takes (inside the validator's)
        self.oldest, self.newest = oldest, newest  # times the validator accepts
        self._limits = limits
        self.records: list[UsageRecord] = []  # points of series whose mapping is known
        self.slow: list[Observation] = []  # points the validator has to see
        self.slow_ordinals: list[int] = []
        self.slow_keys: list[str] = []
        self.cumulative: list[_Cumulative] = []
        self.about: list[_About] = []  # of the cumulative points
        self.groups: dict[str, set[str]] = {}  # their groups and series (group → series ids)
        self.errors: list[RecordError] = []
        self.skipped: dict[str, int] = {}
        self.points = 0

    def reject(
        self, ordinal: int, reason: Reason, field: str, error: str, name: str, detail: Any = None
    ) -> None:
        raw = orjson.dumps({"metric": name, "point": detail}, default=str).decode()[:8192]
        self.errors.append(RecordError(ordinal, field, error, reason, raw))

    def validate(self, key: str, obs: Observation, ordinal: int) -> None:
        """Leave ``obs`` (of the series ``key``) to the validator."""
        self.slow.append(obs)
        self.slow_ordinals.append(ordinal)
        self.slow_keys.append(key)

    def out_of_time(self, ordinal: int, t: int, name: str) -> bool:
        """Reject a running total the validator would refuse for its time (as it would), before
        it can become its series' state: a total from the far future would make every later
        point an old repeat, one from long ago their baseline."""
        if self.oldest <= t <= self.newest:
            return False
        refusal = time_window_error(t, self.oldest, self.newest, self._limits)
        assert refusal is not None
        self.reject(ordinal, refusal[0], "timeUnixNano", refusal[1], name, t)
        return True

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def mark(self) -> tuple[int, int, list[RecordError], dict[str, int]]:
        """What a conversion is about to add to (``rewind`` takes it back out)."""
        return len(self.records), len(self.slow), list(self.errors), dict(self.skipped)

    def rewind(self, mark: tuple[int, int, list[RecordError], dict[str, int]]) -> None:
        n_records, n_slow, self.errors, self.skipped = mark
        del self.records[n_records:]
        del self.slow[n_slow:], self.slow_ordinals[n_slow:], self.slow_keys[n_slow:]


class OtlpMetrics:
    """Turns OTLP metric exports into committed usage; one instance serves both protocols.

    ``export`` is synchronous and blocks until the batch is durable: run it on a worker thread.
    It raises ``OtlpError`` (bad request), ``StreamsBusy``, and the ingestor's ``Overloaded``,
    ``CommitFailed`` and ``ShuttingDown``.

    Mapping depends only on a point's series (name, attributes, resource), so the validator
    sees the first point of each series; once it accepted one, later points of that series
    under the same catalog snapshot become records directly (``_record``), as long as their
    value is plainly within bounds and their time well inside the accepted range. Anything else
    goes through the validator, which stays the one judge of what is valid and why not.
    """

    def __init__(
        self,
        sink: ObservationSink,
        rules: RuleMatcher,
        committer: Committer,
        state: StateReader,
        catalog: Callable[[], Catalog],
        clock: Clock,
        limits: IngestConfig,
        telemetry: Telemetry,
        commit_timeout_s: float = 60.0,
        max_cached_series: int = 250_000,
    ) -> None:
        self._sink = sink
        self._rules = rules
        self._committer = committer
        self.streams = StreamGroups(state, STATE_PREFIX, max_cached_series)
        self._catalog = catalog
        self._clock = clock
        self._telemetry = telemetry
        self._max_points = limits.max_batch_records
        self._max_attr_bytes = limits.metadata_max_bytes
        # A minute inside the validator's own bounds, so a fast-path record is never one the
        # validator would have refused a moment later.
        self._late_ns = int(limits.late_arrival_limit.total_seconds() - 60) * NS
        self._future_ns = int(limits.future_tolerance.total_seconds()) * NS
        self._commit_timeout = commit_timeout_s
        self._state = state
        self._expire_after_ns = int(limits.late_arrival_limit.total_seconds()) * NS
        self._limits = limits
        self._expired_at = clock.now_ns()
        self._max_cached = max_cached_series
        self._series: dict[tuple[Any, ...], str] = {}
        # per metric (its base series id): a point's bytes from its attributes on → its series
        self._tails: dict[str, dict[bytes, _PointSeries]] = {}
        self._tails_size = 0  # entries of all of them (at most max_cached_series)
        self._mapped: dict[str, SeriesMapping] = {}
        self._halves: dict[str, tuple[bool, bool]] = {}
        # Walking an export is pure Python: with every gRPC and HTTP worker walking at once,
        # they take turns at the GIL with the commit pipeline (one turn in several for it), and
        # bench.otlp measured fewer points/s with more concurrent exports. Others wait here,
        # off the GIL.
        self._walkers = threading.BoundedSemaphore(WALKERS)

    def export(self, request: Any) -> ExportOutcome:
        n = count_points(request)
        if n > self._max_points:
            raise OtlpError(
                413,
                f"export holds {n} data points; at most {self._max_points} are accepted per "
                "request (lower the exporter's max_export_batch_size)",
            )
        now = self._clock.now_ns()
        if now - self._expired_at >= EXPIRY_INTERVAL_NS:
            self._expired_at = now
            threading.Thread(
                target=self._expire_quietly,
                args=(now - self._expire_after_ns - EXPIRY_MARGIN_NS,),
                name="otlp-expire-streams",
                daemon=True,
            ).start()
        ex = _Export(
            self._catalog().serial,
            now - self._late_ns,
            now + self._future_ns,
            now - self._expire_after_ns,
            now + self._future_ns,
            self._limits,
        )
        with self._walkers:
            self._walk(request, ex)
        t = self._telemetry
        t.received.labels(OTLP.value).inc(ex.points)
        if not ex.cumulative:
            outcome = self._commit(ex, {}, {})
            assert outcome is not None  # no state expectations: no conflict
        else:
            members = {gid: sids for gid, sids in ex.groups.items() if sids}
            with self.streams.hold(set(members)):
                for _ in range(STATE_CONFLICT_RETRIES):
                    mark = ex.mark()
                    view = self.streams.load(members)
                    with self._walkers:
                        changes = view.changes(self._convert(ex, view.states))
                    done = self._commit(ex, changes.state, changes.expect)
                    if done is not None:
                        outcome = done
                        self.streams.committed(changes)
                        break
                    # Another replica moved these groups first: reload them, convert again.
                    self.streams.forget(members)
                    ex.rewind(mark)
                else:
                    raise StreamsBusy("cumulative series kept moving on other replicas")
        for reason, count in ex.skipped.items():
            t.otlp_skipped.labels(reason).inc(count)
        return outcome

    def expire_streams(self, before_ns: int, limit: int = 10_000) -> int:
        """Forget cumulative series whose last point is older than ``before_ns``.

        Run hourly with ``before_ns`` = now − the late-arrival limit − ``EXPIRY_MARGIN_NS``: no
        point that old would be accepted anyway, so no resent one can count again. (A series
        silent that long that comes back with the same start time counts as a new series.)
        Returns how many were forgotten.
        """
        stale = self.streams.stale(before_ns, limit)
        if not stale:
            return 0
        groups = {gid for gid in stale if gid}
        with self.streams.hold(groups):
            # what is committed now, under the holds
            changes, gone = self.streams.expire(stale, before_ns)
            if gone:
                batch = Batch(OTLP, state=changes.state, state_expect=changes.expect)
                # Only if no other replica moved them meanwhile (else: not stale after all).
                if self._committer.submit_sync(batch, self._commit_timeout).conflict:
                    self.streams.forget(groups)
                    return 0
                self.streams.committed(changes)
        return gone

    def _expire_quietly(self, before_ns: int) -> None:
        try:
            n = self.expire_streams(before_ns)
            if n:
                log.info("forgot %d cumulative OTLP series not seen for the late-arrival limit", n)
        except Exception:
            log.exception("expiring cumulative OTLP series failed; will retry in an hour")

    def _commit(
        self, ex: _Export, state: dict[str, bytes | None], expect: dict[str, bytes | None]
    ) -> ExportOutcome | None:
        """Validate what is left and commit with the series' new ``state`` (``Batch.state``);
        None when the state expectations failed."""
        errors = ex.errors
        if ex.slow:
            checked = self._sink.observations(ex.slow, OTLP)
            self._learn(ex, checked)
            ordinals = ex.slow_ordinals
            errors.extend(
                RecordError(ordinals[e.index], e.field, e.error, e.reason, e.raw)
                for e in checked.errors
            )
            ex.records.extend(checked.records)
            errors.sort(key=lambda e: e.index)
        batch = Batch(OTLP, ex.records, errors)
        batch.state = state
        batch.state_expect = expect
        if batch.records or batch.errors or batch.state:
            result = self._committer.submit_sync(batch, self._commit_timeout)
            if result.conflict:
                return None
        else:
            result = CommitResult(0, 0, 0)
        return ExportOutcome(
            ex.points,
            result.accepted,
            result.duplicates,
            len({e.index for e in errors}),
            _summarize(errors, ex.points),
        )

    def _learn(self, ex: _Export, checked: Batch) -> None:
        """Remember how the series of accepted observations map."""
        refused = {e.index for e in checked.errors}
        records = iter(checked.records)
        mapped = self._mapped
        if len(mapped) >= self._max_cached:
            mapped.clear()
        for i, obs in enumerate(ex.slow):
            if i in refused:
                continue
            record = next(records)
            key = ex.slow_keys[i]
            m = mapped.get(key)
            if (m is not None and m.serial == ex.serial) or record.value < 0:
                continue
            rule = self._rules.map(obs)
            if not isinstance(rule, Mapped):
                continue
            scale = self._rules.rules[rule.rule_index].scale
            mapped[key] = SeriesMapping(
                ex.serial,
                record.customer_id,
                record.dimension_id,
                None if scale == 1 else scale,
                record.metadata or {},
                record.unique_value,
            )

    def _emit(
        self,
        ex: _Export,
        key: str,
        name: str,
        attrs: dict[str, str],
        resource: dict[str, str],
        value: Decimal,
        kind: ObservationKind,
        t: int,
        natural_key: str | None,
        ordinal: int,
    ) -> None:
        """A record of ``value``: at once when ``_record`` can make it, else by the validator;
        deduplicated by ``natural_key`` (None: a cumulative point's, by its series' state)."""
        if not self._record(ex, key, value, t, natural_key):
            ex.validate(
                key, Observation(OTLP, name, attrs, value, kind, t, natural_key, resource), ordinal
            )

    def _record(
        self, ex: _Export, key: str, value: Decimal, t: int, natural_key: str | None
    ) -> bool:
        """The fast path, the one place records skip the validator: a record straight from
        how the validator mapped the series ``key`` under this catalog, when the point is
        plainly acceptable (time well inside the accepted range; after the rule's scale,
        0 <= value < 1e21 with at most 18 places). False leaves the point to the validator,
        which says what is wrong with it."""
        m = self._mapped.get(key)
        if m is None or m.serial != ex.serial or not ex.lo <= t <= ex.hi:
            return False
        if m.scale is None:
            v = value  # an int, a parse_value'd double or a step between two: ≤ 18 places
        else:
            v = EXACT.multiply(value, m.scale)
            if v.as_tuple().exponent < -MAX_PLACES:  # type: ignore[operator]
                return False
        if not ZERO <= v < MAX_ABS:
            return False
        if natural_key is None:
            digest = None
        else:
            h = _KEY_HASH.copy()
            h.update(natural_key.encode())
            digest = h.digest()
        ex.records.append(
            UsageRecord(t, m.customer, m.dimension, v, None, m.metadata, OTLP, digest, m.unique)
        )
        return True

    # --- walking the request -----------------------------------------------------------------

    def _series_id(self, identity: tuple[Any, ...]) -> str:
        sid = self._series.get(identity)
        if sid is None:
            sid = hashlib.blake2b(orjson.dumps(identity), digest_size=16).hexdigest()
            _put_bounded(self._series, identity, sid, self._max_cached)
        return sid

    def _walk(self, request: Any, ex: _Export) -> None:
        max_bytes = self._max_attr_bytes
        ordinal = -1
        for rm in request.resource_metrics:
            resource = attributes(rm.resource.attributes, max_bytes)
            res_id = (
                orjson.dumps(sorted(resource.items())).decode()
                if isinstance(resource, dict)
                else ""
            )
            for sm in rm.scope_metrics:
                scope = sm.scope
                scope_attrs = attributes(scope.attributes, max_bytes)
                scope_id = (
                    scope.name,
                    scope.version,
                    tuple(sorted(scope_attrs.items())) if isinstance(scope_attrs, dict) else (),
                )
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    if kind is None:
                        continue
                    data = getattr(m, kind)
                    points = data.data_points
                    first = ordinal + 1
                    ordinal += len(points)
                    ex.points += len(points)
                    if not isinstance(resource, dict) or not isinstance(scope_attrs, dict):
                        where = "resource" if isinstance(resource, str) else "scope"
                        why = resource if isinstance(resource, str) else scope_attrs
                        for i in range(len(points)):
                            ex.reject(
                                first + i,
                                Reason.TOO_LARGE,
                                f"{where}.attributes",
                                f"{where} attributes refused: {why}",
                                m.name,
                            )
                        continue
                    if kind == "sum":
                        self._numbers(ex, m, data, first, resource, res_id, scope_id, True)
                    elif kind == "gauge":
                        self._numbers(ex, m, data, first, resource, res_id, scope_id, False)
                    else:
                        self._distributions(ex, m, kind, data, first, resource, res_id, scope_id)

    def _bad_temporality(
        self, ex: _Export, m: Any, kind: str, temporality: int, first: int
    ) -> None:
        for i in range(len(getattr(m, kind).data_points)):
            ex.reject(
                first + i,
                Reason.INVALID_VALUE,
                "aggregationTemporality",
                f"{kind} {m.name!r} has aggregation temporality {temporality}; "
                "expected 1 (delta) or 2 (cumulative)",
                m.name,
            )

    def _point_series(
        self,
        base: tuple[Any, ...],
        base_id: str,
        p: Any,
        tail: bytes | None,
        known: dict[bytes, _PointSeries],
        about: tuple[str, dict[str, str], bool],
    ) -> _PointSeries | str:
        """A number point's series, or why its attributes are refused.

        Remembered in ``known`` (the metric's) by ``tail``, the point's bytes from its
        attributes on (``otlp_codec``), when those bytes can stand for its attributes and
        flags. Callers remember only points whose flags were read and found without
        NO_RECORDED_VALUE. ``about``: the metric's name, the resource and monotonicity.
        """
        found = known.get(tail) if tail is not None else None
        if found is not None:
            return found
        attrs = attributes(p.attributes, self._max_attr_bytes)
        if isinstance(attrs, str):
            return attrs
        sid = self._series_id((base, tuple(sorted(attrs.items()))))
        name, resource, monotonic = about
        entry = _PointSeries(sid, attrs, _About(name, attrs, resource, monotonic))
        if tail is not None and len(tail) <= _MAX_CACHED_KEY and is_series_key(tail):
            if self._tails_size >= self._max_cached:  # all metrics' together: start over
                known.clear()
                self._tails, self._tails_size = {base_id: known}, 0
            known[tail] = entry
            self._tails_size += 1
        return entry

    def _numbers(
        self,
        ex: _Export,
        m: Any,
        data: Any,
        first: int,
        resource: dict[str, str],
        res_id: str,
        scope_id: tuple[Any, ...],
        is_sum: bool,
    ) -> None:
        name = m.name
        if is_sum:
            temporality = data.aggregation_temporality
            monotonic = bool(data.is_monotonic)
            if temporality not in (DELTA, CUMULATIVE):
                self._bad_temporality(ex, m, "sum", temporality, first)
                return
        else:
            temporality, monotonic = 0, False
        type_ = "sum" if is_sum else "gauge"
        base = (res_id, scope_id, name, m.unit, type_, temporality, monotonic)
        base_id = self._series_id(base)
        known = self._tails.get(base_id)
        if known is None:
            if len(self._tails) >= self._max_cached:
                self._tails, self._tails_size = {}, 0
            known = self._tails[base_id] = {}
        point_series, record = self._point_series, self._record
        about = (name, resource, monotonic)
        # the series of the metric's group (``StreamGroups``), when cumulative
        in_group = (
            ex.groups.setdefault(base_id, set()) if temporality == CUMULATIVE else set()
        ).add
        waiting, abouts = ex.cumulative.append, ex.about
        oldest, newest = ex.oldest, ex.newest
        kind = AMOUNT if is_sum else LEVEL
        cumulative = temporality == CUMULATIVE
        ordinal = first - 1
        for p in data.data_points:
            ordinal += 1
            # A point of a known series is read from its bytes (otlp_codec); anything else
            # (a new series, no time, no value, flagged…) field by field.
            decoded = read_number_point(p.SerializeToString())
            number: int | float
            if decoded is None:
                series = tail = None
            else:
                start, t, number, tail = decoded
                series = known.get(tail)
            if series is None:
                if p.flags & NO_RECORDED_VALUE:
                    ex.skip(SKIP_NO_VALUE)
                    continue
                which = p.WhichOneof("value")
                if which is None:
                    ex.reject(
                        ordinal,
                        Reason.MISSING_FIELD,
                        "value",
                        "data point has neither asInt nor asDouble",
                        name,
                    )
                    continue
                number = p.as_int if which == "as_int" else p.as_double
                start, t = p.start_time_unix_nano, p.time_unix_nano
            level: Level  # a running total stays an int (``StreamGroups``' plain step)
            if type(number) is int:
                level = number
            elif number != number:  # NaN: no value
                ex.skip(SKIP_NO_VALUE)
                continue
            else:
                try:
                    level = parse_value(number)
                except DecimalError as exc:
                    why = str(exc)
                    ex.reject(ordinal, Reason.INVALID_VALUE, "asDouble", why, name, repr(number))
                    continue
            if series is None:
                if not t:
                    ex.reject(
                        ordinal, Reason.INVALID_TIMESTAMP, "timeUnixNano", "timeUnixNano is 0", name
                    )
                    continue
                found = point_series(base, base_id, p, tail, known, about)
                if isinstance(found, str):
                    ex.reject(ordinal, Reason.TOO_LARGE, "attributes", found, name)
                    continue
                series = found
            sid = series.sid
            if cumulative:
                if not oldest <= t <= newest and ex.out_of_time(ordinal, t, name):
                    continue
                waiting((ordinal, sid, base_id, start, t, level, None, False, len(abouts)))
                abouts.append(series.about)
                in_group(sid)
                continue
            value = level_decimal(level)
            if is_sum:
                if monotonic and number < 0:
                    ex.reject(
                        ordinal,
                        Reason.NEGATIVE_VALUE,
                        "value",
                        f"monotonic delta sum {name!r} has a negative value {value}",
                        name,
                    )
                    continue
                nk = f"{sid}:{start}:{t}"
            else:
                nk = f"{sid}:{t}"
            if not record(ex, sid, value, t, nk):  # the hot path: _emit without a call
                obs = Observation(OTLP, name, series.attrs, value, kind, t, nk, resource)
                ex.validate(sid, obs, ordinal)

    def _wanted_halves(
        self, sid: str, name: str, attrs: dict[str, str], resource: dict[str, str], t: int
    ) -> tuple[bool, bool]:
        """Which of a distribution's count and sum some rule maps; (True, _) when neither, so
        that validation rejects the point with its reason."""
        halves = self._halves.get(sid)
        if halves is None:
            probes = [
                Observation(OTLP, f"{name}.{part}", attrs, ZERO, AMOUNT, t, None, resource)
                for part in ("count", "sum")
            ]
            want_count, want_sum = (isinstance(self._rules.map(o), Mapped) for o in probes)
            halves = (want_count or not want_sum, want_sum)
            _put_bounded(self._halves, sid, halves, self._max_cached)
        return halves

    def _distributions(
        self,
        ex: _Export,
        m: Any,
        kind: str,
        data: Any,
        first: int,
        resource: dict[str, str],
        res_id: str,
        scope_id: tuple[Any, ...],
    ) -> None:
        name = m.name
        temporality = CUMULATIVE if kind == "summary" else data.aggregation_temporality
        if temporality not in (DELTA, CUMULATIVE):
            self._bad_temporality(ex, m, kind, temporality, first)
            return
        base = (res_id, scope_id, name, m.unit, kind, temporality, True)
        base_id = self._series_id(base)
        count_name, sum_name = f"{name}.count", f"{name}.sum"
        ordinal = first - 1
        for p in data.data_points:
            ordinal += 1
            if p.flags & NO_RECORDED_VALUE:
                ex.skip(SKIP_NO_VALUE)
                continue
            t = p.time_unix_nano
            if not t:
                ex.reject(
                    ordinal, Reason.INVALID_TIMESTAMP, "timeUnixNano", "timeUnixNano is 0", name
                )
                continue
            attrs = attributes(p.attributes, self._max_attr_bytes)
            if isinstance(attrs, str):
                ex.reject(ordinal, Reason.TOO_LARGE, "attributes", attrs, name)
                continue
            total: Decimal | None = None
            if (kind == "summary" or p.HasField("sum")) and p.sum == p.sum:  # NaN: count only
                try:
                    total = parse_value(p.sum)
                except DecimalError as exc:
                    ex.reject(ordinal, Reason.INVALID_VALUE, "sum", str(exc), name, repr(p.sum))
                    continue
            count = Decimal(p.count)
            sid = self._series_id((base, tuple(sorted(attrs.items()))))
            want_count, want_sum = self._wanted_halves(sid, name, attrs, resource, t)
            if not want_sum:
                total = None
            start = p.start_time_unix_nano
            if temporality == CUMULATIVE:
                if ex.out_of_time(ordinal, t, name):
                    continue
                ex.cumulative.append(
                    (ordinal, sid, base_id, start, t, count, total, True, len(ex.about))
                )
                ex.about.append(_About(name, attrs, resource, True, want_count))
                ex.groups.setdefault(base_id, set()).add(sid)
                continue
            if want_count:
                nk = f"{sid}:c:{start}:{t}"
                self._emit(
                    ex, sid + "c", count_name, attrs, resource, count, AMOUNT, t, nk, ordinal
                )
            if total is not None:
                nk = f"{sid}:s:{start}:{t}"
                self._emit(ex, sid + "s", sum_name, attrs, resource, total, AMOUNT, t, nk, ordinal)

    def _convert(self, ex: _Export, states: Mapping[str, GroupEntry]) -> dict[str, GroupEntry]:
        """Cumulative points → amounts; returns the series whose state moved (new entries)."""
        points = ex.cumulative
        changed: dict[str, GroupEntry] = {}
        state_of: Callable[[str], GroupEntry | None] = states.get
        if sum(map(len, ex.groups.values())) < len(points):
            points = sorted(points, key=lambda c: c[4])  # several points of one series, by time

            def state_of(sid: str) -> GroupEntry | None:
                return changed.get(sid) or states.get(sid)

        emit, record, abouts = self._emit, self._record, ex.about
        span_start = span_time = -1
        span = ""
        for ordinal, sid, _, start, t, value, total, histogram, k in points:
            if start != span_start or t != span_time:  # a metric's points usually share both
                span_start, span_time, span = start, t, f"{start}:{t}"
            state = state_of(sid)
            if (
                state is not None
                and not histogram
                and start == state[0]
                and t > state[1]
                and value > state[2]
            ):
                # convert()'s plain step, inline: the common case. Two ints (asInt totals)
                # subtract as ints; anything else is two parse_value'd totals, at most 39
                # digits, which the exact context subtracts exactly.
                last = state[2]
                if type(value) is int and type(last) is int:
                    delta = Decimal(value - last)
                else:
                    delta = EXACT.subtract(value, last)
                changed[sid] = (start, t, value, None, f"{sid}:{span} {value}")  # line()'s
                if not record(ex, sid, delta, t, None):
                    a = abouts[k]
                    obs = Observation(OTLP, a.name, a.attrs, delta, AMOUNT, t, None, a.resource)
                    ex.validate(sid, obs, ordinal)
                continue
            a = abouts[k]
            try:
                step = convert(
                    None if state is None else group_entry_state(state),
                    start,
                    t,
                    level_decimal(value),
                    total,
                    a.monotonic,
                )
            except InexactStep as exc:
                ex.reject(ordinal, Reason.INVALID_VALUE, "value", str(exc), a.name)
                continue
            if step.state is not None:  # (start, t, value, total): kept as given, an int an int
                changed[sid] = (start, t, value, total, line(sid, start, t, value, total))
            if step.kind != "delta":
                if step.kind == "stale":
                    ex.reject(
                        ordinal,
                        Reason.INVALID_TIMESTAMP,
                        "startTimeUnixNano",
                        f"start time {start} is older than the start of the series' current "
                        "run: a point of an earlier run arrived after a newer one",
                        a.name,
                    )
                else:
                    ex.skip(step.kind)
                continue
            name, attrs, resource = a.name, a.attrs, a.resource
            if not histogram:
                emit(ex, sid, name, attrs, resource, step.delta, AMOUNT, t, None, ordinal)
                continue
            if a.want_count:
                count = f"{name}.count"
                emit(ex, sid + "c", count, attrs, resource, step.delta, AMOUNT, t, None, ordinal)
            if step.delta_sum is not None:
                sums = f"{name}.sum"
                emit(ex, sid + "s", sums, attrs, resource, step.delta_sum, AMOUNT, t, None, ordinal)
        return changed


def _summarize(errors: Sequence[RecordError], points: int) -> str:
    if not errors:
        return ""
    rejected = len({e.index for e in errors})
    seen: dict[str, int] = {}
    for e in errors:
        seen[e.error] = seen.get(e.error, 0) + 1
    quoted = list(seen.items())[:MAX_ERROR_MESSAGES]
    parts = [f"{msg} ({n} points)" if n > 1 else msg for msg, n in quoted]
    more = len(seen) - MAX_ERROR_MESSAGES
    tail = f"; and {more} more kinds of error" if more > 0 else ""
    return f"{rejected} of {points} data points rejected: " + "; ".join(parts) + tail
