"""Gateway health: records accepted, duplicate and rejected by receiver and reason, request
outcomes, batch and commit latency, queue depth, the Prometheus query receiver's lag and
errors, exporter outboxes and deliveries, scheduled jobs.

Counters and the queue are per replica (summed); the Prometheus receiver's and exporters'
gauges describe shared work that runs on one replica at a time (``max``).
"""

from __future__ import annotations

from meter_gateway.dashboards._grafana import (
    GREEN,
    JSON,
    NEUTRAL,
    ORANGE,
    RED,
    Layout,
    dashboard,
    query_variable,
    stat,
    target,
    thresholds,
    timeseries,
)

UID = "meter-gateway-health"

SEL = 'instance=~"$instance", receiver=~"$receiver"'
INSTANCE = 'instance=~"$instance"'
LATENCY_TH = thresholds(GREEN, (0.5, ORANGE), (2, RED))
LAG_TH = thresholds(GREEN, (300, ORANGE), (900, RED))


def rate(metric: str, by: str = "", sel: str = SEL) -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{{{sel}}}[$__rate_interval]))"


def quantile(q: float, metric: str, by: str, sel: str) -> str:
    buckets = f"rate({metric}_bucket{{{sel}}}[$__rate_interval])"
    return f"histogram_quantile({q}, sum by (le, {by}) ({buckets}))"


def share(part: str) -> str:
    return f"{rate(part)} / {rate('meter_gateway_records_received_total')}"


def build() -> JSON:
    lay = Layout()
    lay.row("Ingest")
    for title, desc, expr, unit, th in (
        (
            "Accepted",
            "Records committed per second.",
            rate("meter_gateway_records_accepted_total"),
            "suffix: rec/s",
            None,
        ),
        (
            "Rejected",
            "Share of received records that were rejected (kept in the rejected store).",
            share("meter_gateway_records_rejected_total"),
            "percentunit",
            thresholds(GREEN, (0.01, ORANGE), (0.05, RED)),
        ),
        (
            "Duplicates",
            "Share of received records already counted (retries, replays).",
            share("meter_gateway_records_duplicate_total"),
            "percentunit",
            thresholds(GREEN, (0.2, ORANGE), (0.5, RED)),
        ),
        (
            "Commit queue",
            "Records waiting for the group commit, all replicas.",
            f"sum(meter_gateway_queue_records{{{INSTANCE}}})",
            "short",
            thresholds(GREEN, (10_000, ORANGE), (50_000, RED)),
        ),
    ):
        lay.add(
            stat(title, desc, [target(expr, title)], unit=unit, th=th or NEUTRAL),
            w=6,
            h=5,
        )
    lay.add(
        timeseries(
            "Records by outcome",
            "Records per second, accepted, duplicate and rejected, by receiver.",
            [
                target(
                    rate("meter_gateway_records_accepted_total", "receiver"),
                    "{{receiver}} accepted",
                    ref="A",
                ),
                target(
                    rate("meter_gateway_records_duplicate_total", "receiver"),
                    "{{receiver}} duplicate",
                    ref="B",
                ),
                target(
                    rate("meter_gateway_records_rejected_total", "receiver"),
                    "{{receiver}} rejected",
                    ref="C",
                ),
            ],
            unit="suffix: rec/s",
        ),
        w=12,
        h=9,
    )
    lay.add(
        timeseries(
            "Rejected records by reason",
            "Rejected records per second by receiver and reason; GET /v1/rejected lists them.",
            [
                target(
                    rate("meter_gateway_records_rejected_total", "receiver, reason"),
                    "{{receiver}} {{reason}}",
                )
            ],
            unit="suffix: rec/s",
            stack=True,
        ),
        w=12,
        h=9,
    )
    lay.add(
        timeseries(
            "Requests by status",
            "Ingest requests per second by receiver and status code (429: overloaded).",
            [
                target(
                    rate("meter_gateway_requests_total", "receiver, code"), "{{receiver}} {{code}}"
                )
            ],
            unit="reqps",
            stack=True,
        ),
        w=12,
        h=9,
    )
    lay.add(
        timeseries(
            "OTLP points skipped",
            "OTLP data points that added no record, by reason (no value, repeated, baseline, "
            "unchanged).",
            [
                target(
                    rate("meter_gateway_otlp_points_skipped_total", "reason", INSTANCE),
                    "{{reason}}",
                )
            ],
            unit="suffix: points/s",
            stack=True,
        ),
        w=12,
        h=9,
    )
    lay.row("Latency and queue")
    lay.add(
        timeseries(
            "Batch latency",
            "From receiving a batch to answering it (durably committed), by receiver.",
            [
                target(
                    quantile(0.5, "meter_gateway_batch_duration_seconds", "receiver", SEL),
                    "{{receiver}} p50",
                    ref="A",
                ),
                target(
                    quantile(0.99, "meter_gateway_batch_duration_seconds", "receiver", SEL),
                    "{{receiver}} p99",
                    ref="B",
                ),
            ],
            unit="s",
            th=LATENCY_TH,
        ),
        w=12,
        h=9,
    )
    lay.add(
        timeseries(
            "Commit latency",
            "One group commit, fsync included, by replica.",
            [
                target(
                    quantile(0.5, "meter_gateway_commit_duration_seconds", "instance", INSTANCE),
                    "{{instance}} p50",
                    ref="A",
                ),
                target(
                    quantile(0.99, "meter_gateway_commit_duration_seconds", "instance", INSTANCE),
                    "{{instance}} p99",
                    ref="B",
                ),
            ],
            unit="s",
            th=LATENCY_TH,
        ),
        w=12,
        h=9,
    )
    lay.add(
        timeseries(
            "Commit queue depth",
            "Records waiting for commit, by replica; a full queue answers 429.",
            [
                target(
                    f"max by (instance) (meter_gateway_queue_records{{{INSTANCE}}})", "{{instance}}"
                )
            ],
            th=thresholds(GREEN, (10_000, ORANGE), (50_000, RED)),
        ),
        w=12,
        h=9,
    )
    lay.add(
        timeseries(
            "Records per commit and commit failures",
            "Average group-commit size, and group commits the store failed.",
            [
                target(
                    f"{rate('meter_gateway_commit_records_sum', 'instance', INSTANCE)} / "
                    f"{rate('meter_gateway_commit_records_count', 'instance', INSTANCE)}",
                    "{{instance}} records per commit",
                    ref="A",
                ),
                target(
                    "sum by (instance) (increase(meter_gateway_commit_failures_total"
                    f"{{{INSTANCE}}}[$__rate_interval]))",
                    "{{instance}} failed commits",
                    ref="B",
                ),
            ],
        ),
        w=12,
        h=9,
    )
    lay.row("Prometheus query receiver")
    lay.add(
        timeseries(
            "Query lag",
            "How far the newest window read for each dimension is behind now.",
            [
                target(
                    "max by (dimension) (meter_gateway_prometheus_query_lag_seconds)",
                    "{{dimension}}",
                )
            ],
            unit="s",
            th=LAG_TH,
        ),
        w=8,
        h=9,
    )
    lay.add(
        timeseries(
            "Samples read",
            "Samples read from Prometheus per second, by dimension.",
            [
                target(
                    "sum by (dimension) "
                    "(rate(meter_gateway_prometheus_samples_read_total[$__rate_interval]))",
                    "{{dimension}}",
                )
            ],
            unit="suffix: samples/s",
        ),
        w=8,
        h=9,
    )
    lay.add(
        timeseries(
            "Query errors",
            "Failed Prometheus queries by dimension and error; each is retried.",
            [
                target(
                    "sum by (dimension, error) "
                    "(increase(meter_gateway_prometheus_query_errors_total[$__rate_interval]))",
                    "{{dimension}} {{error}}",
                )
            ],
            th=thresholds(GREEN, (1, RED)),
        ),
        w=8,
        h=9,
    )
    lay.row("Exporters and scheduled jobs")
    lay.add(
        timeseries(
            "Exporter outbox",
            "Events waiting for delivery, by exporter.",
            [target("max by (exporter) (meter_gateway_exporter_outbox_events)", "{{exporter}}")],
        ),
        w=6,
        h=9,
    )
    lay.add(
        timeseries(
            "Oldest undelivered event",
            "Age of the oldest event waiting in each exporter's outbox.",
            [
                target(
                    "max by (exporter) (meter_gateway_exporter_outbox_oldest_age_seconds)",
                    "{{exporter}}",
                )
            ],
            unit="s",
            th=thresholds(GREEN, (300, ORANGE), (900, RED)),
        ),
        w=6,
        h=9,
    )
    lay.add(
        timeseries(
            "Exporter deliveries by outcome",
            "Delivery attempts per second by exporter and outcome.",
            [
                target(
                    "sum by (exporter, outcome) "
                    "(rate(meter_gateway_exporter_deliveries_total[$__rate_interval]))",
                    "{{exporter}} {{outcome}}",
                )
            ],
            unit="suffix: deliveries/s",
        ),
        w=6,
        h=9,
    )
    lay.add(
        timeseries(
            "Exporter failures",
            "Failed delivery attempts by exporter; each is retried with backoff.",
            [
                target(
                    "sum by (exporter) (increase(meter_gateway_exporter_deliveries_total"
                    '{outcome="error"}[$__rate_interval]))',
                    "{{exporter}}",
                )
            ],
            th=thresholds(GREEN, (1, RED)),
        ),
        w=6,
        h=9,
    )
    lay.add(
        timeseries(
            "Scheduled job runs",
            "Completed runs of scheduled jobs per second (Prometheus queries, meters, outboxes), "
            "by job.",
            [target(rate("meter_gateway_job_runs_total", "job", INSTANCE), "{{job}}")],
            unit="suffix: runs/s",
        ),
        w=12,
        h=9,
    )
    lay.add(
        timeseries(
            "Scheduled job errors",
            "Failed runs of scheduled jobs by job; each is retried with backoff.",
            [
                target(
                    "sum by (job) (increase(meter_gateway_job_errors_total"
                    f"{{{INSTANCE}}}[$__rate_interval]))",
                    "{{job}}",
                )
            ],
            th=thresholds(GREEN, (1, RED)),
        ),
        w=12,
        h=9,
    )
    return dashboard(
        uid=UID,
        title="Meter gateway · Health",
        description="Ingest outcomes, latency, queues, Prometheus receiver, exporters and jobs.",
        layout=lay,
        time_from="now-3h",
        refresh="30s",
        variables=[
            query_variable("instance", "Replica", "meter_gateway_build_info"),
            query_variable(
                "receiver",
                "Receiver",
                'meter_gateway_records_received_total{instance=~"$instance"}',
            ),
        ],
    )
