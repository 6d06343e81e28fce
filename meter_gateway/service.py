"""The gateway service: builds every component from the config and owns their lifetimes.

Components are handed what they need (store, clock, telemetry, the next stage); nothing reaches
for a global. ``Gateway.close`` drains the commit queue before closing the store.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from zoneinfo import ZoneInfo

from meter_gateway.api.auth import KeyRing
from meter_gateway.catalog import CatalogService
from meter_gateway.clock import Clock, SystemClock
from meter_gateway.config import Config
from meter_gateway.decimals import EXACT, ZERO, fmt
from meter_gateway.pipeline.cumulative import StreamTable, Totals
from meter_gateway.pipeline.ingest import Ingestor
from meter_gateway.pipeline.mapping import Mapper
from meter_gateway.pipeline.validate import Validator
from meter_gateway.pricing import round_money
from meter_gateway.scheduler import Scheduler
from meter_gateway.store import Store, open_store
from meter_gateway.telemetry import PeriodUsage, PeriodUsageCollector, Telemetry
from meter_gateway.usage import current_period, period_usage, summary
from receivers import prometheus_query
from receivers.otlp import OtlpMetrics

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
        self.clock = clock or SystemClock()
        self.tz = ZoneInfo(config.billing.timezone)
        self.telemetry = Telemetry()
        self.keys = KeyRing(config.auth.api_keys, os.environ if environ is None else environ)
        if not self.keys.enabled:
            log.warning("no API keys configured: the API is open to anyone who can reach it")
        ingest = config.ingest
        self.store = store or open_store(
            config.store.url, int(ingest.dedup_window.total_seconds()), self.clock.now_ns()
        )
        self.catalog = CatalogService(self.store, config)
        self.mapper = Mapper(config.rules)
        self.validator = Validator(lambda: self.catalog.current, self.clock, ingest, self.mapper)
        self.ingestor = Ingestor(
            self.store,
            self.clock,
            self.telemetry,
            ingest.max_queue_records,
            ingest.max_commit_records,
            ingest.retry_after.total_seconds(),
        )
        # Running totals from senders without start times (Vector absolute counters).
        self.totals = Totals(StreamTable(self.store, "vector/"), self.validator, self.ingestor)
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
        self.telemetry.add_collector(PeriodUsageCollector(self._period_usage))
        # Scheduled work (Prometheus queries, meters, exporter outboxes) registers its jobs
        # here; each runs under a store lease, so on one replica at a time.
        self.scheduler = Scheduler(
            self.store,
            self.clock,
            on_error=lambda job: self.telemetry.job_errors.labels(job).inc(),
            on_run=lambda job: self.telemetry.job_runs.labels(job).inc(),
        )
        if config.receivers.prometheus is not None:
            for job in prometheus_query.build_jobs(
                config.receivers.prometheus,
                lambda mapper: Validator(lambda: self.catalog.current, self.clock, ingest, mapper),
                self.store,
                self.ingestor,
                self.telemetry,
                self._aggregation,
                ingest.late_arrival_limit.total_seconds(),
            ):
                self.scheduler.add(job)
        self.ready = True

    def _aggregation(self, dimension: str) -> str | None:
        dim = self.catalog.current.dimensions.get(dimension)
        return None if dim is None else dim.aggregation

    def start(self) -> None:
        """Start background work (the server calls this once it is listening)."""
        self.scheduler.start()

    def _period_usage(self) -> Iterable[PeriodUsage]:
        catalog = self.catalog.current
        start, end = current_period(self.clock.now_ns(), self.tz)
        now = min(self.clock.now_ns() + 1, end)
        customers = sorted({c for c, _ in self.store.pairs(None, None, now)})
        for c in customers:
            if c not in catalog.customers:
                continue
            s = summary(self.store, catalog, c, start, now, self.tz)
            currency = s.currency or "USD"
            for line in s.lines:
                dim = line.dimension
                usage = period_usage(self.store, catalog, c, dim, start, now)
                cost = EXACT.multiply(line.quantity, dim.unit_cost or ZERO)
                yield PeriodUsage(
                    c,
                    dim.id,
                    currency,
                    fmt(usage if usage is not None else ZERO),
                    fmt(line.quantity),
                    fmt(line.amount if line.amount is not None else ZERO),
                    fmt(round_money(cost, currency)),
                )

    def close(self) -> None:
        self.ready = False
        self.scheduler.close()
        self.ingestor.close()
        self.store.close()
