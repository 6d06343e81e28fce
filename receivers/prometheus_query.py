"""Prometheus query receiver: metered series read from a Prometheus server, turned into exact
usage per closed window (``receivers.prometheus`` in the config; SPEC §4, WIRE_FORMATS.md).

Each configured series is one scheduled job. A run reads the windows that closed at least
``delay`` ago and were not committed yet (at most ``max_step_s`` of them per query, so catching
up after downtime goes in bounded steps) with one range selector over raw samples — never
``increase()``, which extrapolates — and commits their usage together with the new watermark
and each series' last sample in one transaction. A restart therefore neither skips nor repeats
a window, and a window's records carry natural keys (series + window), so a window that is
somehow read twice still counts once.

Counters: the increase is the sum of positive steps between consecutive raw samples, starting
from the last sample of the previous window; a drop is a counter reset and adds the new value.
A sample belongs to the window ``[start, end)`` its timestamp falls in, so one exactly on a
boundary (which Prometheus 2.x range selectors return in both windows) counts once. On the
receiver's first run every existing series only sets a baseline; a series first seen later
counts from zero (SPEC §6).

Gauges are levels. The series of one customer are summed into that customer's level (each
series holds its last value until its next sample; a series with no sample in a whole window
has gone, and its level is 0 from that window's start). For ``sum`` dimensions the level is
integrated over time (level × seconds per window: pod-seconds, GB-seconds); for every other
aggregation the gateway gets the level at each window's start and at every change, which is
exactly what ``time_weighted_avg``, ``last``, ``max`` and ``min`` need.

The window logic (``windows_due``, ``counter_increments``, ``gauge_windows``) is pure and takes
time as an argument; ``PrometheusQueryJob`` is the I/O around it.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Literal, Protocol

import orjson

from meter_gateway.config import PrometheusReceiverConfig, Rule, RuleMatch
from meter_gateway.decimals import EXACT, MAX_PLACES, ZERO
from meter_gateway.model import Batch, Observation, ObservationKind, Source
from meter_gateway.pipeline.cumulative import Committer, ObservationSink, StateReader
from meter_gateway.pipeline.mapping import Mapper
from meter_gateway.promql import parse_selector

log = logging.getLogger(__name__)

NS = 1_000_000_000
MS = 1_000_000
STATE_PREFIX = "prometheus/"
_QUANTUM = Decimal(1).scaleb(-MAX_PLACES)


class QueryError(StrEnum):
    """Why a read from Prometheus failed; label values of
    ``meter_gateway_prometheus_query_errors_total``."""

    UNAVAILABLE = "unavailable"  # connection refused or reset, DNS
    TIMEOUT = "timeout"
    HTTP_4XX = "http_4xx"  # the query or the credentials are wrong: fix the config
    HTTP_5XX = "http_5xx"
    BAD_RESPONSE = "bad_response"  # not the JSON shape the API documents
    COMMIT = "commit"  # the store did not commit the window's usage


class QueryFailed(Exception):
    """A window could not be read or committed; the scheduler retries the job with backoff."""

    def __init__(self, error: QueryError, detail: str) -> None:
        super().__init__(f"{error.value}: {detail}")
        self.error = error


# --- pure window logic -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    t_ms: int
    value: Decimal


@dataclass(frozen=True, slots=True)
class SeriesState:
    """A series' last committed sample (persisted per series)."""

    labels: dict[str, str]
    t_ms: int
    value: Decimal

    def encode(self) -> bytes:
        return orjson.dumps({"l": self.labels, "t": self.t_ms, "v": str(self.value)})

    @staticmethod
    def decode(raw: bytes) -> SeriesState:
        d = orjson.loads(raw)
        return SeriesState(d["l"], int(d["t"]), Decimal(d["v"]))


def series_key(labels: Mapping[str, str]) -> str:
    return hashlib.blake2b(orjson.dumps(sorted(labels.items())), digest_size=16).hexdigest()


def windows_due(
    watermark_ns: int | None, now_ns: int, interval_ns: int, delay_ns: int, max_windows: int
) -> list[tuple[int, int]]:
    """The windows ``[start, end)`` to read now: aligned to ``interval`` since the epoch, closed
    at least ``delay`` ago, after the watermark, at most ``max_windows``. Without a watermark
    (the first run) the answer is the single window that closed last: it is read only for
    baselines."""
    last_end = (now_ns - delay_ns) // interval_ns * interval_ns
    if watermark_ns is None:
        return [(last_end - interval_ns, last_end)]
    out: list[tuple[int, int]] = []
    start = watermark_ns
    while len(out) < max_windows:
        end = (start // interval_ns + 1) * interval_ns  # aligned even if the interval changed
        if end > last_end:
            break
        out.append((start, end))
        start = end
    return out


def _window_of(t_ns: int, bounds: Sequence[tuple[int, int]]) -> int:
    for i, (s, e) in enumerate(bounds):
        if s <= t_ns < e:
            return i
    return -1


def counter_increments(
    carried: SeriesState | None,
    samples: Sequence[Sample],
    windows: Sequence[tuple[int, int]],
    from_zero: bool,
) -> tuple[list[Decimal], Sample | None]:
    """One counter series over consecutive windows: the exact increase in each window and the
    last sample (to carry into the next run; None if there was none).

    Steps are taken from the carried sample on; a sample at or before the carried one is
    already counted. A series with nothing carried starts from 0 when ``from_zero`` (first
    seen after the receiver started) and from its first sample otherwise (a baseline).
    """
    out = [ZERO] * len(windows)
    prev: Decimal | None = None if carried is None else carried.value
    last_t = -1 if carried is None else carried.t_ms
    last: Sample | None = None
    for smp in sorted(samples, key=lambda x: x.t_ms):
        if smp.t_ms <= last_t:
            continue
        i = _window_of(smp.t_ms * MS, windows)
        if i < 0:
            continue
        if prev is None:
            step = smp.value if from_zero else ZERO
        elif smp.value >= prev:
            step = EXACT.subtract(smp.value, prev)
        else:  # a counter reset: it counted from zero again
            step = smp.value
        out[i] = EXACT.add(out[i], step)
        prev, last_t, last = smp.value, smp.t_ms, smp
    return out, last


@dataclass(frozen=True, slots=True)
class GaugeSeries:
    carried: SeriesState | None
    samples: Sequence[Sample]


@dataclass(slots=True)
class GaugeResult:
    """One customer's summed level over the windows: ``levels`` are the (time ns, level) points
    to emit — each window's start while any series is alive, then every change — and
    ``integrals`` the level × seconds of each window."""

    levels: list[tuple[int, Decimal]] = field(default_factory=list)
    integrals: list[Decimal] = field(default_factory=list)


def gauge_windows(
    series: Mapping[str, GaugeSeries], windows: Sequence[tuple[int, int]]
) -> tuple[GaugeResult, dict[str, Sample | None]]:
    """The summed level of one customer's gauge series over consecutive windows.

    Returns the result and, per series, the sample to carry (None: the series has gone, forget
    it). A series holds its carried level from the first window's start; a series with no
    sample in a window after its last one has gone: it counts 0 from that window's start.
    """
    events: list[tuple[int, str, Decimal | None]] = []
    level: dict[str, Decimal] = {}
    carry: dict[str, Sample | None] = {}
    for sid, gs in series.items():
        last: Sample | None = None
        latest: int | None = None
        if gs.carried is not None:
            level[sid] = gs.carried.value
            last, latest = Sample(gs.carried.t_ms, gs.carried.value), -1
        for smp in sorted(gs.samples, key=lambda x: x.t_ms):
            if last is not None and smp.t_ms <= last.t_ms:
                continue
            i = _window_of(smp.t_ms * MS, windows)
            if i < 0:
                continue
            events.append((smp.t_ms * MS, sid, smp.value))
            last, latest = smp, i
        if latest is not None and latest + 1 < len(windows):
            events.append((windows[latest + 1][0], sid, None))
            carry[sid] = None
        else:
            carry[sid] = last
    events.sort(key=lambda e: e[0])
    result = GaugeResult()
    current = sum(level.values(), ZERO)
    k = 0
    for start, end in windows:
        integral = ZERO
        if level:
            result.levels.append((start, current))
        t = start
        while k < len(events) and events[k][0] < end:
            et, sid, value = events[k]
            k += 1
            integral = EXACT.add(integral, EXACT.multiply(current, Decimal(et - t)))
            t = et
            if value is None:
                level.pop(sid, None)
            else:
                level[sid] = value
            new = sum(level.values(), ZERO)
            if new != current:
                current = new
                if result.levels and result.levels[-1][0] == et:
                    result.levels[-1] = (et, current)
                else:
                    result.levels.append((et, current))
        integral = EXACT.add(integral, EXACT.multiply(current, Decimal(end - t)))
        result.integrals.append(EXACT.divide(integral, Decimal(NS)))
    return result, carry


def exact_value(raw: object) -> Decimal | None:
    """A sample value as Prometheus writes it (a float64's shortest text) → the exact decimal
    of that text; None for NaN, ±Inf and anything that is not a number."""
    if not isinstance(raw, str) or len(raw) > 400:
        return None
    try:
        v = Decimal(raw)
    except InvalidOperation:
        return None
    return v if v.is_finite() else None


def clamp_places(v: Decimal) -> Decimal:
    """At most 18 decimal places (the precision of a usage record), rounded half-even."""
    exp = v.as_tuple().exponent
    if isinstance(exp, int) and exp < -MAX_PLACES:
        return v.quantize(_QUANTUM, context=EXACT)
    return v


# --- I/O ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RawSeries:
    labels: dict[str, str]
    samples: list[Sample]
    skipped: int  # NaN/Inf or unparsable sample values


class SampleSource(Protocol):
    """Raw samples of a selector in ``(end - span, end]`` (``prometheus_api_client`` below)."""

    def range_samples(self, selector: str, span_ms: int, end_ms: int) -> list[RawSeries]: ...


def parse_matrix(result: object) -> list[RawSeries]:
    """The ``data.result`` of a range-selector query → series; raises ``QueryFailed``."""
    if not isinstance(result, list):
        raise QueryFailed(QueryError.BAD_RESPONSE, "result is not a list")
    out: list[RawSeries] = []
    for item in result:
        if not isinstance(item, dict):
            raise QueryFailed(QueryError.BAD_RESPONSE, "a series is not an object")
        metric, values = item.get("metric"), item.get("values")
        if not isinstance(metric, dict) or not isinstance(values, list):
            raise QueryFailed(QueryError.BAD_RESPONSE, "a series lacks metric or values")
        labels = {str(k): str(v) for k, v in metric.items()}
        samples: list[Sample] = []
        skipped = 0
        for pair in values:
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                raise QueryFailed(QueryError.BAD_RESPONSE, "a sample is not [time, value]")
            t, raw = pair
            if not isinstance(t, int | float) or isinstance(t, bool):
                raise QueryFailed(QueryError.BAD_RESPONSE, f"sample time {t!r} is not a number")
            value = exact_value(raw)
            if value is None:
                skipped += 1
                continue
            # Times are seconds with millisecond precision; round, never truncate, the float.
            samples.append(Sample(round(t * 1000), value))
        out.append(RawSeries(labels, samples, skipped))
    return out


class PrometheusApi:
    """``SampleSource`` over ``prometheus_api_client.PrometheusConnect`` (which retries 408,
    429 and 5xx three times before giving up)."""

    def __init__(
        self, url: str, headers: Mapping[str, str] | None = None, timeout_s: float = 30.0
    ) -> None:
        from prometheus_api_client import PrometheusConnect

        self._timeout = timeout_s
        self._client = PrometheusConnect(
            url=url.rstrip("/"), headers=dict(headers or {}), disable_ssl=False
        )

    def range_samples(self, selector: str, span_ms: int, end_ms: int) -> list[RawSeries]:
        import requests
        from prometheus_api_client.exceptions import PrometheusApiClientException

        params = {"time": f"{end_ms // 1000}.{end_ms % 1000:03d}"}
        try:
            result = self._client.custom_query(
                f"{selector}[{span_ms}ms]", params=params, timeout=self._timeout
            )
        except requests.exceptions.Timeout as exc:
            raise QueryFailed(QueryError.TIMEOUT, str(exc)) from exc
        except requests.exceptions.RetryError as exc:
            code = re.search(r"too many (\d)\d\d error", str(exc))
            kind = QueryError.HTTP_4XX if code and code.group(1) == "4" else QueryError.HTTP_5XX
            raise QueryFailed(kind, str(exc)) from exc
        except requests.exceptions.ConnectionError as exc:
            # Read timeouts come back wrapped once the client's own retries are used up.
            kind = QueryError.TIMEOUT if "timed out" in str(exc) else QueryError.UNAVAILABLE
            raise QueryFailed(kind, str(exc)[:500]) from exc
        except PrometheusApiClientException as exc:
            m = re.search(r"HTTP Status Code (\d)", str(exc))
            kind = QueryError.HTTP_4XX if m and m.group(1) == "4" else QueryError.HTTP_5XX
            raise QueryFailed(kind, str(exc)[:500]) from exc
        except (ValueError, KeyError, TypeError) as exc:  # JSON that is not the API's shape
            raise QueryFailed(QueryError.BAD_RESPONSE, str(exc)[:500]) from exc
        except requests.exceptions.RequestException as exc:
            raise QueryFailed(QueryError.UNAVAILABLE, str(exc)) from exc
        return parse_matrix(result)


@dataclass(frozen=True, slots=True)
class SeriesSpec:
    """One configured metered series, resolved (a measurement template filled the gaps)."""

    dimension: str
    query: str
    customer_label: str
    kind: Literal["counter", "gauge"]
    scale: Decimal

    @property
    def id(self) -> str:
        ident = orjson.dumps([self.query, self.customer_label, self.kind])
        return f"{self.dimension}/{hashlib.blake2b(ident, digest_size=6).hexdigest()}"


class QueryMetrics(Protocol):
    """Where a job reports (``telemetry.Telemetry`` has these methods' metrics)."""

    def prometheus_lag(self, dimension: str, seconds: float) -> None: ...

    def prometheus_watermark(self, dimension: str, end_s: float) -> None: ...

    def prometheus_samples(self, dimension: str, n: int) -> None: ...

    def prometheus_error(self, dimension: str, error: str) -> None: ...


class PrometheusQueryJob:
    """One metered series as a scheduled job (``scheduler.Job``): ``run(now_ns)`` reads and
    commits every closed window after the watermark, in steps of at most ``max_step_s``."""

    def __init__(
        self,
        spec: SeriesSpec,
        source: SampleSource,
        state: StateReader,
        sink: ObservationSink,
        committer: Committer,
        metrics: QueryMetrics,
        aggregation: Callable[[str], str | None],
        interval_s: float,
        delay_s: float,
        max_step_s: float = 900.0,
        forget_after_s: float = 35 * 86400.0,
        baseline_lookback_s: float = 300.0,
        name: str | None = None,
    ) -> None:
        parse_selector(spec.query)
        self.spec = spec
        self.name = name or f"prometheus:{spec.id}"
        self._source = source
        self._state = state
        self._sink = sink
        self._committer = committer
        self._metrics = metrics
        self._aggregation = aggregation
        self._interval = int(interval_s * NS)
        self._delay = int(delay_s * NS)
        self._max_windows = max(1, int(max_step_s * NS) // self._interval)
        self._forget_ms = int(forget_after_s * 1000)
        self._lookback = int(baseline_lookback_s * NS)
        self._prefix = f"{STATE_PREFIX}{spec.id}/"
        self._wm_key = self._prefix + "wm"
        self._series_prefix = self._prefix + "s/"

    def watermark(self) -> int | None:
        raw = self._state.state_get([self._wm_key]).get(self._wm_key)
        return None if raw is None else int(raw)

    def run(self, now_ns: int) -> float:
        wm = self.watermark()
        if wm is not None:
            self._metrics.prometheus_lag(self.spec.dimension, (now_ns - wm) / NS)
            self._metrics.prometheus_watermark(self.spec.dimension, wm / NS)
        windows = windows_due(wm, now_ns, self._interval, self._delay, self._max_windows)
        if windows:
            try:
                wm = self._step(wm, windows, now_ns)
            except QueryFailed as exc:
                self._metrics.prometheus_error(self.spec.dimension, exc.error.value)
                raise
            self._metrics.prometheus_lag(self.spec.dimension, (now_ns - wm) / NS)
            self._metrics.prometheus_watermark(self.spec.dimension, wm / NS)
            if windows_due(wm, now_ns, self._interval, self._delay, 1):
                return 0.0  # still catching up
        assert wm is not None  # the first run always has one (baseline) window
        next_due = wm + self._interval + self._delay
        return max(0.05, (next_due - now_ns) / NS)

    def _step(self, wm: int | None, windows: list[tuple[int, int]], now_ns: int) -> int:
        first_run = wm is None
        start, end = windows[0][0], windows[-1][1]
        read_end = end
        if first_run:
            # Baselines are what each series had when the receiver first ran (now), looking
            # back as far as Prometheus' own lookback; counting starts after them.
            start, read_end = min(start, end - self._lookback), max(end, now_ns)
        # One millisecond more than the span: a sample exactly on ``start`` is in every
        # Prometheus version's range (2.x includes both ends, 3.x excludes the left one).
        span_ms = (read_end - start) // MS + 1
        raw = self._source.range_samples(self.spec.query, span_ms, read_end // MS)
        self._metrics.prometheus_samples(self.spec.dimension, sum(len(s.samples) for s in raw))
        stored = {
            k[len(self._series_prefix) :]: SeriesState.decode(v)
            for k, v in self._state.state_scan(self._series_prefix).items()
        }
        batch_state: dict[str, bytes | None] = {self._wm_key: str(end).encode()}
        observations: list[Observation] = []
        fetched = {series_key(s.labels): s for s in raw}
        if first_run:
            # Baselines only: the last sample of each series so far.
            for sid, s in fetched.items():
                if s.samples:
                    last = max(s.samples, key=lambda x: x.t_ms)
                    batch_state[self._series_prefix + sid] = SeriesState(
                        s.labels, last.t_ms, last.value
                    ).encode()
        elif self.spec.kind == "counter":
            observations = self._counters(fetched, stored, windows, end, batch_state)
        else:
            observations = self._gauges(fetched, stored, windows, batch_state)
        batch = (
            self._sink.observations(observations, Source.PROMETHEUS)
            if observations
            else Batch(Source.PROMETHEUS)
        )
        batch.state.update(batch_state)
        try:
            self._committer.submit_sync(batch, 120.0)
        except Exception as exc:
            raise QueryFailed(QueryError.COMMIT, str(exc) or type(exc).__name__) from exc
        return end

    def _counters(
        self,
        fetched: Mapping[str, RawSeries],
        stored: Mapping[str, SeriesState],
        windows: list[tuple[int, int]],
        end: int,
        batch_state: dict[str, bytes | None],
    ) -> list[Observation]:
        out: list[Observation] = []
        name = parse_selector(self.spec.query)
        for sid, s in fetched.items():
            carried = stored.get(sid)
            increments, last = counter_increments(carried, s.samples, windows, from_zero=True)
            if last is not None:
                batch_state[self._series_prefix + sid] = SeriesState(
                    s.labels, last.t_ms, last.value
                ).encode()
            attrs = dict(s.labels)
            metric = attrs.pop("__name__", name)
            for (w_start, _), inc in zip(windows, increments, strict=True):
                amount = clamp_places(EXACT.multiply(inc, self.spec.scale))
                if amount == 0:
                    continue
                out.append(
                    Observation(
                        Source.PROMETHEUS,
                        metric,
                        attrs,
                        amount,
                        ObservationKind.AMOUNT,
                        w_start,
                        f"{self.spec.id}|{sid}|{w_start}",
                    )
                )
        # Counters that have been silent longer than the late-arrival horizon are forgotten.
        for sid, st in stored.items():
            if sid not in fetched and end // MS - st.t_ms > self._forget_ms:
                batch_state[self._series_prefix + sid] = None
        return out

    def _gauges(
        self,
        fetched: Mapping[str, RawSeries],
        stored: Mapping[str, SeriesState],
        windows: list[tuple[int, int]],
        batch_state: dict[str, bytes | None],
    ) -> list[Observation]:
        label = self.spec.customer_label
        groups: dict[str | None, dict[str, GaugeSeries]] = {}
        labels_of: dict[str, dict[str, str]] = {}
        name = parse_selector(self.spec.query)
        for sid in set(fetched) | set(stored):
            s = fetched.get(sid)
            carried = stored.get(sid)
            labels = s.labels if s is not None else carried.labels if carried else {}
            labels_of[sid] = labels
            groups.setdefault(labels.get(label), {})[sid] = GaugeSeries(
                carried, s.samples if s is not None else []
            )
        integrate = self._aggregation(self.spec.dimension) == "sum"
        out: list[Observation] = []
        for customer, series in sorted(groups.items(), key=lambda g: g[0] or ""):
            result, carry = gauge_windows(series, windows)
            for sid, smp in carry.items():
                key = self._series_prefix + sid
                if smp is None:
                    batch_state[key] = None
                else:
                    batch_state[key] = SeriesState(labels_of[sid], smp.t_ms, smp.value).encode()
            metric = next(
                (labels_of[sid].get("__name__") for sid in series if "__name__" in labels_of[sid]),
                name,
            )
            attrs = {} if customer is None else {label: customer}
            ident = f"{self.spec.id}|{orjson.dumps(attrs).decode()}"
            if integrate:
                for (w_start, _), amount in zip(windows, result.integrals, strict=True):
                    value = clamp_places(EXACT.multiply(amount, self.spec.scale))
                    if value == 0:
                        continue
                    out.append(
                        Observation(
                            Source.PROMETHEUS,
                            metric or "",
                            attrs,
                            value,
                            ObservationKind.AMOUNT,
                            w_start,
                            f"{ident}|{w_start}|integral",
                        )
                    )
                continue
            for t, level in result.levels:
                out.append(
                    Observation(
                        Source.PROMETHEUS,
                        metric or "",
                        attrs,
                        clamp_places(EXACT.multiply(level, self.spec.scale)),
                        ObservationKind.LEVEL,
                        t,
                        f"{ident}|{t}",
                    )
                )
        return out


def build_jobs(
    config: PrometheusReceiverConfig,
    sink_for: Callable[[Mapper], ObservationSink],
    state: StateReader,
    committer: Committer,
    metrics: QueryMetrics,
    aggregation: Callable[[str], str | None],
    forget_after_s: float,
    source: SampleSource | None = None,
) -> list[PrometheusQueryJob]:
    """One job per configured series (templates are already filled in by the config). Each
    series maps through its own rule: its dimension, its customer label; the receiver applies
    the scale itself, so values are clamped to 18 places after scaling, not before."""
    api = source or PrometheusApi(config.url, config.headers)
    jobs: list[PrometheusQueryJob] = []
    for i, s in enumerate(config.series):
        spec = SeriesSpec(s.dimension, s.query, s.customer_label, s.kind, s.scale)
        rule = Rule(
            match=RuleMatch(source="prometheus"),
            dimension=s.dimension,
            customer_attribute=s.customer_label,
        )
        jobs.append(
            PrometheusQueryJob(
                spec,
                api,
                state,
                sink_for(Mapper([rule])),
                committer,
                metrics,
                aggregation,
                config.interval.total_seconds(),
                config.delay.total_seconds(),
                forget_after_s=forget_after_s,
                name=f"prometheus:{i}:{spec.id}",
            )
        )
    return jobs
