"""The gateway service: builds every component from the config and owns their lifetimes.

Components are handed what they need (store, clock, telemetry, the next stage); nothing reaches
for a global. ``Gateway.close`` drains the commit queue before closing the store.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from zoneinfo import ZoneInfo

from exporters.files import FileSink
from exporters.outbox import DeliveryJob, Router
from exporters.stripe import NAME as STRIPE_EXPORTER
from exporters.stripe import StripeSink
from exporters.webhook import WebhookSink
from meter_gateway import meters
from meter_gateway.billing import cycles, rating
from meter_gateway.billing.events import subscription
from meter_gateway.billing.invoices import Invoices
from meter_gateway.catalog import CatalogService
from meter_gateway.clock import TEST_CLOCK_OFFSET_FILE_ENV, Clock, OffsetFileClock, SystemClock
from meter_gateway.config import Config, StripeExporterConfig
from meter_gateway.decimals import ZERO, fmt
from meter_gateway.keys import KeyRing
from meter_gateway.model import Batch, CommitResult
from meter_gateway.pipeline.admission import Budget, Workers
from meter_gateway.pipeline.cumulative import StreamTable, TimeWindow, Totals
from meter_gateway.pipeline.ingest import Ingestor
from meter_gateway.pipeline.mapping import Mapper
from meter_gateway.pipeline.validate import Validator
from meter_gateway.scheduler import Scheduler
from meter_gateway.store import Store, open_store
from meter_gateway.store.base import sweeping
from meter_gateway.telemetry import (
    BillingCollector,
    BillingGauges,
    MeterGauge,
    PeriodUsage,
    PeriodUsageCollector,
    Telemetry,
)
from meter_gateway.usage import current_period
from receivers import datastore, prometheus_query
from receivers.otlp import OtlpMetrics
from receivers.remote_write import RemoteWriteReceiver

log = logging.getLogger(__name__)


class Gateway:
    def __init__(
        self,
        config: Config,
        clock: Clock | None = None,
        environ: Mapping[str, str] | None = None,
        store: Store | None = None,
    ) -> None:
        self.config = config
        env = os.environ if environ is None else environ
        self.clock = clock or _clock_from(env)
        self.tz = ZoneInfo(config.billing.timezone)
        self.telemetry = Telemetry()
        self.keys = KeyRing(config.auth.api_keys, os.environ if environ is None else environ)
        if not self.keys.enabled:
            log.warning("no API keys configured: the API is open to anyone who can reach it")
        ingest = config.ingest
        self.store = store or open_store(
            config.store.url, int(ingest.dedup_window.total_seconds()), self.clock.now_ns()
        )
        # reloaded when another replica changes the catalog (checked every second, and before
        # usage is turned away for an unknown customer or dimension)
        self.catalog = CatalogService(self.store, config, self.clock)
        self.mapper = Mapper(config.rules)
        self.validator = Validator(
            lambda: self.catalog.current, self.clock, ingest, self.mapper, self.catalog.fresh
        )
        max_delay = ingest.max_queue_delay.total_seconds() or None
        # Large REST bodies are decoded and validated here, off the event loop; two threads
        # (the GIL allows no more CPU) keep the loop's share of it. New ones are refused while
        # that work is more than max_queue_delay behind.
        self.decode_pool = Workers(2, max_delay, ingest.retry_after.total_seconds())
        # After commits (_on_commit): wake the meter job when they touch a metered (customer,
        # dimension), and the period gauges' refresh. The gauges are rated in the background
        # (start) and read by scrapes: rating 1,000 customers takes longer than a scrape may.
        self._meter_waker = meters.CommitWaker(
            lambda: self.catalog.current, lambda: self.scheduler.wake(meters.JOB_NAME)
        )
        self.period_gauges = PeriodUsageCollector(
            self._swept_period_gauges, config.billing.period_gauges_interval.total_seconds()
        )
        self.ingestor = Ingestor(
            self.store,
            self.clock,
            self.telemetry,
            ingest.max_queue_records,
            ingest.max_commit_records,
            ingest.retry_after.total_seconds(),
            on_commit=self._on_commit,
            budget=Budget(
                ingest.max_inflight_bytes,
                ingest.retry_after.total_seconds(),
                self.telemetry.inflight_bytes.set,
            ),
            max_queue_delay_s=max_delay,
        )
        # Running totals from senders without start times (Vector absolute counters).
        self.totals = Totals(
            StreamTable(self.store, "vector/"),
            self.validator,
            self.ingestor,
            window=TimeWindow(self.clock, ingest),
        )
        # OTLP exports (gRPC and HTTP) → observations → validator → ingestor; server.py serves it.
        self.otlp = OtlpMetrics(
            self.validator,
            self.mapper,
            self.ingestor,
            self.store,
            lambda: self.catalog.current,
            self.clock,
            ingest,
            self.telemetry,
        )
        # Prometheus remote write → observations → validator → ingestor; the API serves it.
        self.remote_write = RemoteWriteReceiver(
            config.rules,
            self.validator,
            self.ingestor,
            self.store,
            ingest,
            self.telemetry,
            ingest.retry_after.total_seconds(),
            catalog=lambda: self.catalog.current,
            clock=self.clock,
        )
        self.telemetry.add_collector(self.period_gauges)
        # Scheduled work (Prometheus queries, meters, exporter outboxes) registers its jobs
        # here; each runs under a store lease, so on one replica at a time.
        self.scheduler = Scheduler(
            self.store,
            self.clock,
            on_error=lambda job: self.telemetry.job_errors.labels(job).inc(),
            on_run=lambda job: self.telemetry.job_runs.labels(job).inc(),
        )
        self._build_billing(config, env)
        if config.receivers.prometheus is not None:
            for job in prometheus_query.build_jobs(
                config.receivers.prometheus,
                lambda mapper: Validator(
                    lambda: self.catalog.current, self.clock, ingest, mapper, self.catalog.fresh
                ),
                self.store,
                self.ingestor,
                self.telemetry,
                self._aggregation,
                ingest.late_arrival_limit.total_seconds(),
            ):
                self.scheduler.add(job)
        # Customers' own databases, read forward from a watermark (receivers/datastore.py).
        for ds_job in datastore.build_jobs(
            config.receivers.datastore, self.validator, self.store, self.ingestor
        ):
            self.scheduler.add(ds_job)
        self._draining = False

    @property
    def ready(self) -> bool:
        """What /readyz answers: not while draining, nor while commits fail (full disk,
        database down); ready again once a commit succeeds."""
        return not self._draining and self.ingestor.healthy

    def _on_commit(self, batches: list[Batch], results: list[CommitResult]) -> None:
        """After every commit: the meter job and the period gauges may have work."""
        self._meter_waker(batches, results)
        if any(r.accepted for r in results):
            self.period_gauges.wake()

    def _aggregation(self, dimension: str) -> str | None:
        dim = self.catalog.current.dimensions.get(dimension)
        return None if dim is None else dim.aggregation

    def _build_billing(self, config: Config, environ: Mapping[str, str]) -> None:
        """Exporters (one outbox delivery job each), the meter job, invoices, their metrics."""
        exp = config.exporters
        subs: dict[str, frozenset[str] | None] = {
            e.name: subscription(e.events) for e in exp.webhooks
        }
        subs.update({e.name: subscription(e.events) for e in exp.files})
        if exp.stripe is not None:
            subs[STRIPE_EXPORTER] = subscription(exp.stripe.events)
        self.router = Router(subs)
        self.delivery_jobs: list[DeliveryJob] = []
        for w in exp.webhooks:
            sink = WebhookSink(
                w.name, w.url, w.resolve_secret(environ), self.clock, w.timeout.total_seconds(),
                w.headers,
            )  # fmt: skip
            self.delivery_jobs.append(
                DeliveryJob(
                    self.store,
                    sink,
                    self.clock,
                    w.backoff_initial.total_seconds(),
                    w.backoff_max.total_seconds(),
                    w.max_attempts,
                    self.telemetry.exporter_delivery,
                )
            )
        for f in exp.files:
            self.delivery_jobs.append(
                DeliveryJob(
                    self.store,
                    FileSink(f.name, f.path),
                    self.clock,
                    on_delivery=self.telemetry.exporter_delivery,
                )
            )
        if exp.stripe is not None:
            self.delivery_jobs.append(self._stripe_job(exp.stripe, environ))
        for job in self.delivery_jobs:
            self.scheduler.add(job)
        self.meter_job = meters.MeterJob(
            self.store,
            lambda: self.catalog.current,
            self.tz,
            self.router,
            lambda: self.scheduler.holder,
            self._wake_exporters,
        )
        self.scheduler.add(self.meter_job)
        self.invoices = Invoices(
            self.store,
            lambda: self.catalog.current,
            self.clock,
            self.tz,
            self.router,
            on_events=self._wake_exporters,
            reopen=lambda row, catalog: cycles.reopen(row, catalog, self.tz),
            billing=config.billing,
        )
        self.invoices.backfill_periods()  # invoices stored before periods were columns
        # Closed billing cycles invoice themselves (billing/cycles.py), under their lease.
        self.cycle_job = cycles.CycleJob(
            self.store,
            self.invoices,
            lambda: self.catalog.current,
            self.tz,
            lambda: self.scheduler.holder,
        )
        self.scheduler.add(self.cycle_job)
        self.telemetry.add_collector(BillingCollector(self._billing_gauges))

    def _stripe_job(self, s: StripeExporterConfig, environ: Mapping[str, str]) -> DeliveryJob:
        """Finalized and void invoices to Stripe, for customers with a ``stripe_account_id``."""

        def stripe_customer(customer_id: str) -> str | None:
            customer = self.catalog.current.customers.get(customer_id)
            return None if customer is None else customer.stripe_account_id

        sink = StripeSink(
            s.resolve_api_key(environ),
            self.store,
            stripe_customer,
            self.clock,
            api_base=s.api_base,
            timeout_s=s.timeout.total_seconds(),
            finalize=s.finalize,
            collection_method=s.collection_method,
            days_until_due=s.days_until_due,
        )
        return DeliveryJob(
            self.store,
            sink,
            self.clock,
            s.backoff_initial.total_seconds(),
            s.backoff_max.total_seconds(),
            s.max_attempts,
            self.telemetry.exporter_delivery,
            on_skip=lambda name: self.telemetry.exporter_deliveries.labels(name, "skipped").inc(),
        )

    def _wake_exporters(self) -> None:
        for job in self.delivery_jobs:
            self.scheduler.wake(job.name)

    def _billing_gauges(self) -> BillingGauges:
        now = self.clock.now_ns()
        gauges = []
        for r in meters.readings(self.store, self.catalog.current, self.tz, now):
            ratio = r.ratio
            gauges.append(
                MeterGauge(
                    r.meter.id,
                    r.meter.customer,
                    r.meter.dimension,
                    float(r.value),
                    None if r.meter.capacity is None else float(r.meter.capacity),
                    None if ratio is None else float(ratio),
                    len(r.fired),
                )
            )
        wallets = [(w.customer, w.currency, float(w.balance)) for w in self.store.wallets()]
        stats = {s.exporter: s for s in self.store.outbox_stats()}
        outbox = []
        for name in self.router.exporters:
            s = stats.get(name)
            oldest = None if s is None else s.oldest_pending_ns
            age = 0.0 if oldest is None else max(0.0, (now - oldest) / 1e9)
            outbox.append((name, 0 if s is None else s.pending, age))
        return BillingGauges(gauges, wallets, outbox)

    def start(self) -> None:
        """Start background work (the server calls this once it is listening)."""
        self.scheduler.start()
        self.period_gauges.start()

    def _swept_period_gauges(self) -> list[PeriodUsage]:
        """``_period_gauges`` as one sweep of the store (every customer's period, read in bulk
        where the store can)."""
        with sweeping():
            return list(self._period_gauges())

    def _period_gauges(self) -> Iterable[PeriodUsage]:
        """The current billing period of every customer with usage, as the rating path has it
        (the same lines usage-summary, invoices and margin show), and of every customer whose
        offering has a recurring fee, usage or not. The fee and credit lines are rows of their
        own (``fee/<offering>``, ``credits/<unit>``: money only), so a customer's revenue rows
        add up to the rating's total."""
        catalog, now = self.catalog.current, self.clock.now_ns()
        ratings = list(rating.current(self.store, catalog, now, self.tz))
        rated = {r.customer for r in ratings}
        start, end = current_period(now, self.tz)
        period = catalog.at(start)
        for c in sorted(set(period.customers) - rated):
            offering = period.offerings.get(period.customers[c].offering or "")
            if offering is not None and offering.fee is not None:
                at = rating.as_of(now, start, end)
                ratings.append(rating.rate(self.store, catalog, c, start, end, at, self.tz))
        for r in ratings:
            for line in r.lines:
                yield PeriodUsage(
                    r.customer,
                    line.dimension.id,
                    r.currency,
                    fmt(line.usage if line.usage is not None else ZERO),
                    fmt(line.quantity),
                    fmt(line.revenue),
                    fmt(line.cost),
                    fmt(line.margin),
                )
            if r.offering is not None and r.fees:
                fee = fmt(sum((f.amount for f in r.fees), ZERO))
                yield PeriodUsage(
                    r.customer, f"fee/{r.offering.id}", r.currency, None, None, fee, "0", fee
                )
            if r.credit is not None:
                amount = fmt(r.credit.amount)
                yield PeriodUsage(
                    r.customer,
                    f"credits/{r.credit.unit.unit}",
                    r.currency,
                    None,
                    None,
                    amount,
                    "0",
                    amount,
                )

    def close(self) -> None:
        self._draining = True
        self.period_gauges.close()
        self.scheduler.close()
        for job in self.delivery_jobs:
            job.close()
        self.ingestor.close()
        self.decode_pool.shutdown()
        self.store.close()


def _clock_from(environ: Mapping[str, str]) -> Clock:
    path = environ.get(TEST_CLOCK_OFFSET_FILE_ENV)
    if path:
        log.warning(
            "%s is set: the clock is offset by %s (tests only)", TEST_CLOCK_OFFSET_FILE_ENV, path
        )
        return OffsetFileClock(path)
    return SystemClock()
