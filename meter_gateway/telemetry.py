"""The gateway's own metrics, declared in one place, on one registry made per service.

Every name starts with ``meter_gateway_``; units are suffixes; ``receiver`` label values are
``model.Source`` values and ``reason`` label values are ``model.Reason`` values.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from meter_gateway import __version__

log = logging.getLogger(__name__)

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_SIZES = (1, 10, 100, 1_000, 5_000, 10_000, 50_000, 100_000)


class Telemetry:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry(auto_describe=True)
        self.info = Info("meter_gateway_build", "Version of the running gateway.", registry=r)
        self.info.info({"version": __version__})
        self.received = Counter(
            "meter_gateway_records_received_total",
            "Records received, before validation and dedup.",
            ["receiver"],
            registry=r,
        )
        self.accepted = Counter(
            "meter_gateway_records_accepted_total",
            "Records committed as new usage.",
            ["receiver"],
            registry=r,
        )
        self.duplicates = Counter(
            "meter_gateway_records_duplicate_total",
            "Records recognised as already counted (same id or natural "
            "key within the dedup window).",
            ["receiver"],
            registry=r,
        )
        self.rejected = Counter(
            "meter_gateway_records_rejected_total",
            "Records rejected and kept in the rejected-records store.",
            ["receiver", "reason"],
            registry=r,
        )
        self.requests = Counter(
            "meter_gateway_requests_total",
            "Ingest requests by outcome. code: the HTTP status answered, on every transport; "
            "an OTLP/gRPC call counts under the HTTP status of its gRPC code (OK 200, "
            "INVALID_ARGUMENT 400, UNAUTHENTICATED 401, PERMISSION_DENIED 403, "
            "RESOURCE_EXHAUSTED 429, INTERNAL 500, UNAVAILABLE 503); 499: the client went away "
            "before its body was complete (meter_gateway.pipeline.outcomes).",
            ["receiver", "code"],
            registry=r,
        )
        self.overloaded = Counter(
            "meter_gateway_overloaded_total",
            "Requests and batches turned away with 429 / RESOURCE_EXHAUSTED: the ingest memory "
            "budget was spent, the commit queue was full, or commits were behind.",
            ["receiver"],
            registry=r,
        )
        self.inflight_bytes = Gauge(
            "meter_gateway_inflight_bytes",
            "Estimated memory held by ingest in flight (bodies being read, decoded and "
            "validated; batches queued and being committed), against ingest.max_inflight_bytes.",
            registry=r,
        )
        self.commit_failures = Counter(
            "meter_gateway_commit_failures_total", "Group commits the store failed.", registry=r
        )
        self.batch_seconds = Histogram(
            "meter_gateway_batch_duration_seconds",
            "Time from receiving a batch to answering it.",
            ["receiver"],
            buckets=_LATENCY,
            registry=r,
        )
        self.commit_seconds = Histogram(
            "meter_gateway_commit_duration_seconds",
            "Time one group commit takes, fsync included.",
            buckets=_LATENCY,
            registry=r,
        )
        self.commit_records = Histogram(
            "meter_gateway_commit_records", "Records per group commit.", buckets=_SIZES, registry=r
        )
        self.queue_records = Gauge(
            "meter_gateway_queue_records", "Records waiting for commit.", registry=r
        )
        self.job_errors = Counter(
            "meter_gateway_job_errors_total",
            "Failed runs of scheduled jobs (Prometheus queries, meters, exporter outboxes); "
            "each is retried with backoff.",
            ["job"],
            registry=r,
        )
        self.job_runs = Counter(
            "meter_gateway_job_runs_total",
            "Completed runs of scheduled jobs on this replica.",
            ["job"],
            registry=r,
        )
        self.exporter_deliveries = Counter(
            "meter_gateway_exporter_deliveries_total",
            "Attempts to deliver an outbox event to an exporter, by outcome (ok, error).",
            ["exporter", "outcome"],
            registry=r,
        )
        self.otlp_skipped = Counter(
            "meter_gateway_otlp_points_skipped_total",
            "OTLP data points that added no record: no_value (NaN or no recorded value), "
            "repeated (a cumulative point already counted), baseline (first point of a "
            "cumulative run with an unknown start), unchanged (a cumulative value that did "
            "not move).",
            ["reason"],
            registry=r,
        )

        self.prometheus_lag_seconds = Gauge(
            "meter_gateway_prometheus_query_lag_seconds",
            "How far the Prometheus query receiver is behind real time: now minus the end of "
            "the last committed window (at least interval + delay while keeping up).",
            ["dimension"],
            registry=r,
        )
        self.prometheus_watermark_seconds = Gauge(
            "meter_gateway_prometheus_query_watermark_seconds",
            "End of the last committed Prometheus query window (Unix seconds): usage before "
            "it is complete.",
            ["dimension"],
            registry=r,
        )
        self.prometheus_samples_read = Counter(
            "meter_gateway_prometheus_samples_read_total",
            "Raw samples the Prometheus query receiver read.",
            ["dimension"],
            registry=r,
        )
        self.prometheus_query_errors = Counter(
            "meter_gateway_prometheus_query_errors_total",
            "Failed reads or commits of Prometheus query windows (retried with backoff; no "
            "window is skipped). error: unavailable, timeout, http_4xx, http_5xx, "
            "bad_response, commit.",
            ["dimension", "error"],
            registry=r,
        )

        self.remote_write_skipped = Counter(
            "meter_gateway_remote_write_samples_skipped_total",
            "Remote-write samples that added no record: unmapped (no rule could match the "
            "series), stale (a staleness marker on a counter), nan, histogram (native "
            "histograms).",
            ["reason"],
            registry=r,
        )

    # receivers.prometheus_query.QueryMetrics
    def prometheus_lag(self, dimension: str, seconds: float) -> None:
        self.prometheus_lag_seconds.labels(dimension).set(seconds)

    def prometheus_watermark(self, dimension: str, end_s: float) -> None:
        self.prometheus_watermark_seconds.labels(dimension).set(end_s)

    def prometheus_samples(self, dimension: str, n: int) -> None:
        self.prometheus_samples_read.labels(dimension).inc(n)

    def prometheus_error(self, dimension: str, error: str) -> None:
        self.prometheus_query_errors.labels(dimension, error).inc()

    def exporter_delivery(self, exporter: str, ok: bool) -> None:
        self.exporter_deliveries.labels(exporter, "ok" if ok else "error").inc()

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)


@dataclass(frozen=True, slots=True)
class PeriodUsage:
    """One customer's and dimension's current billing period so far (exact decimal text), as
    ``billing.rating`` has it. A customer without an offering has no currency: no money series.

    The rating's lines that are not a dimension's have a pseudo-dimension, which cannot be a
    dimension id (``/`` is not allowed in one): ``fee/<offering>`` (the recurring fee cycles the
    period carries) and ``credits/<unit>`` (the credit line pricing the converted usage). They
    have money only (``usage`` and ``quantity`` None: no usage series), so the revenue of a
    customer's rows adds up to the rating's total."""

    customer: str
    dimension: str
    currency: str | None
    usage: str | None
    quantity: str | None
    revenue: str  # the priced line amount; "0" when the offering does not charge the dimension
    cost: str  # billable quantity × the dimension's unit_cost
    margin: str = "0"  # revenue − cost


_PERIOD_FAMILIES = (
    (
        "meter_gateway_period_usage",
        "Aggregated usage in the current billing period so far.",
        "usage",
        False,
    ),
    (
        "meter_gateway_period_billable_quantity",
        "Billable quantity in the current billing period so far.",
        "quantity",
        False,
    ),
    (
        "meter_gateway_period_revenue",
        "Amount billed in the current billing period so far (currency minor-unit rounded); "
        "dimension fee/<offering>: the recurring fee, credits/<unit>: the credit line. Summed "
        "per customer: the rating's total (manual invoice items are not included).",
        "revenue",
        True,
    ),
    (
        "meter_gateway_period_cost",
        "What the usage of the current billing period so far cost (quantity × unit_cost).",
        "cost",
        True,
    ),
    (
        "meter_gateway_period_margin",
        "Revenue minus cost of the current billing period so far.",
        "margin",
        True,
    ),
)


class PeriodUsageCollector(Collector):
    """Per customer and dimension usage, quantity, revenue and cost of the current period.

    Rating every customer takes seconds (tens of seconds with 1,000 customers on a busy
    PostgreSQL), far past a scrape timeout, so a scrape only reads what ``refresh`` computed
    last. A background thread (``start``) refreshes every ``interval_s``, and sooner once
    commits on this replica (``wake``) have settled: ``settle_s`` after the last of them. While
    commits keep coming (ingest under load) it refreshes every ``interval_s``: each refresh
    rates every customer, in the gateway and in the database (whose CPU the gap below does not
    see), and refreshing a busy replica after every commit cost it 8-14% of its ingest
    (bench.mix on PostgreSQL, 300k records, alternating runs: 51,480 and 51,804 records/s,
    settled 59,518 and 55,869). Never sooner than ``max(min_gap_s, 19 × the last refresh's
    duration)`` after the previous one ended, so it takes at most a twentieth of one thread (of
    the GIL, which ingest needs under load: a tenth cost bench.mix 9.8% of it) -- even when
    that gap is longer than ``interval_s``: where rating every customer takes more than a
    twentieth of the interval (a large store), the gauges are refreshed every twenty refresh
    durations instead, and ``meter_gateway_period_computed_timestamp_seconds`` shows how old
    they are. It runs under no lease: every replica exposes the gauges. All rows of one refresh
    are one rating at one instant; ``meter_gateway_period_computed_timestamp_seconds`` says
    which. Every replica reports the same totals (they come from the shared store), so
    dashboards aggregate these with ``max by (customer, dimension)``, never ``sum``.
    """

    def __init__(
        self,
        compute: Callable[[], Iterable[PeriodUsage]],
        interval_s: float = 15.0,
        min_gap_s: float = 1.0,
        settle_s: float = 0.5,
    ) -> None:
        self._compute = compute
        self._interval = interval_s
        self._min_gap = min(min_gap_s, interval_s)
        self._settle = min(settle_s, interval_s)
        self._lock = threading.Lock()  # one refresh at a time
        # rows, when they were computed (Unix seconds), how long that took: swapped as one
        self._last: tuple[list[PeriodUsage], float, float] | None = None
        self._cv = threading.Condition()
        self._dirty = False  # a commit since the last refresh began
        self._woken = 0.0  # monotonic time of the last wake
        self._stopping = False
        self._thread: threading.Thread | None = None

    def refresh(self) -> None:
        """Rate every customer now and keep the rows for scrapes."""
        with self._lock:
            with self._cv:
                self._dirty = False
            started, t0 = time.time(), time.perf_counter()
            rows = list(self._compute())
            self._last = (rows, started, time.perf_counter() - t0)

    def wake(self) -> None:
        """Usage changed: refresh once commits have settled (and the gap allows). Only the
        first wake after a refresh notifies the thread; later ones move the settling time."""
        with self._cv:
            self._woken = time.monotonic()
            if not self._dirty:
                self._dirty = True
                self._cv.notify()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="meter-gateway-period-gauges", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            try:
                self.refresh()
            except Exception:  # the store may be down: keep the last values, try again
                log.warning("the period gauges could not be refreshed", exc_info=True)
            took = 0.0 if self._last is None else self._last[2]
            gap = max(self._min_gap, 19 * took)  # past the interval too: see the class
            deadline = time.monotonic() + self._interval
            with self._cv:
                if self._cv.wait_for(lambda: self._stopping, gap):
                    return
                while not self._stopping:
                    now = time.monotonic()
                    if now >= deadline:
                        break
                    if not self._dirty:
                        self._cv.wait(deadline - now)
                        continue
                    settled = self._woken + self._settle
                    if now >= settled:
                        break
                    self._cv.wait(min(settled, deadline) - now)
                if self._stopping:
                    return

    @staticmethod
    def _families() -> list[tuple[GaugeMetricFamily, str, bool]]:
        return [
            (
                GaugeMetricFamily(
                    name,
                    doc,
                    labels=["customer", "dimension", "currency"]
                    if money
                    else ["customer", "dimension"],
                ),
                attr,
                money,
            )
            for name, doc, attr, money in _PERIOD_FAMILIES
        ]

    @staticmethod
    def _refresh_families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "meter_gateway_period_computed_timestamp_seconds",
                "When the meter_gateway_period_* gauges were computed (Unix seconds).",
            ),
            GaugeMetricFamily(
                "meter_gateway_period_refresh_duration_seconds",
                "How long the last computation of the meter_gateway_period_* gauges took.",
            ),
        )

    def describe(self) -> Iterable[GaugeMetricFamily]:
        # Names only: registering must not run the (store-reading) computation.
        return [f for f, _, _ in self._families()] + list(self._refresh_families())

    def collect(self) -> Iterable[GaugeMetricFamily]:
        last = self._last
        rows = [] if last is None else last[0]
        families = self._families()
        for row in rows:
            for family, attr, money in families:
                labels = [row.customer, row.dimension]
                if money:
                    if row.currency is None:
                        continue
                    labels.append(row.currency)
                value = getattr(row, attr)
                if value is not None:
                    family.add_metric(labels, float(value))
        computed, duration = self._refresh_families()
        if last is not None:
            computed.add_metric([], last[1])
            duration.add_metric([], last[2])
        return [f for f, _, _ in families] + [computed, duration]


@dataclass(frozen=True, slots=True)
class MeterGauge:
    meter: str
    customer: str
    dimension: str
    value: float
    capacity: float | None
    ratio: float | None
    thresholds_reached: int


@dataclass(frozen=True, slots=True)
class BillingGauges:
    """What the billing collector reports at one scrape (computed from the shared store)."""

    meters: list[MeterGauge]
    wallets: list[tuple[str, str, float]]  # customer, currency, balance
    outbox: list[tuple[str, int, float]]  # exporter, pending events, oldest pending age (s)


class BillingCollector(Collector):
    """Meters, wallet balances and exporter outboxes, read from the store at scrape time (at
    most every ``ttl_s``). Like the period gauges, every replica reports the same values:
    aggregate with ``max by``, never ``sum``."""

    def __init__(self, compute: Callable[[], BillingGauges], ttl_s: float = 2.0) -> None:
        self._compute = compute
        self._ttl = ttl_s
        self._lock = threading.Lock()
        self._cached = BillingGauges([], [], [])
        self._at = float("-inf")

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily]:
        mcd = ["meter", "customer", "dimension"]
        return {
            "value": GaugeMetricFamily(
                "meter_gateway_meter_value", "A meter's value in its current period.", labels=mcd
            ),
            "capacity": GaugeMetricFamily(
                "meter_gateway_meter_capacity", "A meter's configured capacity.", labels=mcd
            ),
            "ratio": GaugeMetricFamily(
                "meter_gateway_meter_usage_ratio",
                "A meter's value divided by its capacity (1 = at capacity).",
                labels=mcd,
            ),
            "reached": GaugeMetricFamily(
                "meter_gateway_meter_thresholds_reached",
                "Thresholds a meter has reached in its current period.",
                labels=mcd,
            ),
            "wallet": GaugeMetricFamily(
                "meter_gateway_wallet_balance",
                "Prepaid credit balance of a customer's wallet.",
                labels=["customer", "currency"],
            ),
            "pending": GaugeMetricFamily(
                "meter_gateway_exporter_outbox_events",
                "Events waiting in an exporter's outbox (not yet delivered, not given up).",
                labels=["exporter"],
            ),
            "age": GaugeMetricFamily(
                "meter_gateway_exporter_outbox_oldest_age_seconds",
                "Age of the oldest event waiting in an exporter's outbox (0 when empty).",
                labels=["exporter"],
            ),
        }

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return list(self._families().values())

    def collect(self) -> Iterable[GaugeMetricFamily]:
        with self._lock:
            if time.monotonic() - self._at > self._ttl:
                self._cached = self._compute()
                self._at = time.monotonic()
            g = self._cached
        f = self._families()
        for m in g.meters:
            labels = [m.meter, m.customer, m.dimension]
            f["value"].add_metric(labels, m.value)
            f["reached"].add_metric(labels, m.thresholds_reached)
            if m.capacity is not None:
                f["capacity"].add_metric(labels, m.capacity)
            if m.ratio is not None:
                f["ratio"].add_metric(labels, m.ratio)
        for customer, currency, balance in g.wallets:
            f["wallet"].add_metric([customer, currency], balance)
        for exporter, pending, age in g.outbox:
            f["pending"].add_metric([exporter], pending)
            f["age"].add_metric([exporter], age)
        return list(f.values())
