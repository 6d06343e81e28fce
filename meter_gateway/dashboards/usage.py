"""Usage monitoring: per customer and dimension usage, period to date and over time, top
customers, meters against their capacity, live ingest rate.

Period gauges come from the shared store and every replica reports the same value, so they are
de-duplicated with ``max by (customer, dimension)`` before anything is added up.
"""

from __future__ import annotations

from meter_gateway.dashboards._grafana import (
    GREEN,
    JSON,
    ORANGE,
    RED,
    Layout,
    bargauge,
    dashboard,
    query_variable,
    stat,
    table,
    target,
    thresholds,
    timeseries,
)

UID = "meter-gateway-usage"

SEL = 'customer=~"$customer", dimension=~"$dimension"'
USAGE = f"max by (customer, dimension) (meter_gateway_period_usage{{{SEL}}})"
QUANTITY = f"max by (customer, dimension) (meter_gateway_period_billable_quantity{{{SEL}}})"
CAPACITY_TH = thresholds(GREEN, (0.8, ORANGE), (1, RED))


def meter(family: str) -> str:
    """A per-meter gauge (``value``, ``capacity``, ``usage_ratio``), one series per meter."""
    return f"max by (meter, customer, dimension) (meter_gateway_meter_{family}{{{SEL}}})"


def build() -> JSON:
    lay = Layout()
    lay.row("Current billing period")
    lay.add(
        stat(
            "Customers with usage",
            "Customers with non-zero usage in the current billing period.",
            [
                target(
                    f"count(max by (customer) (meter_gateway_period_usage{{{SEL}}} > 0))",
                    "customers",
                    instant=True,
                )
            ],
            decimals=0,
        ),
        w=6,
        h=5,
    )
    lay.add(
        stat(
            "Live ingest rate",
            "Usage records committed per second, all receivers and replicas.",
            [
                target(
                    "sum(rate(meter_gateway_records_accepted_total[$__rate_interval]))",
                    "records/s",
                )
            ],
            unit="suffix: rec/s",
        ),
        w=6,
        h=5,
    )
    lay.add(
        stat(
            "Records accepted in range",
            "Usage records committed in the dashboard's time range.",
            [
                target(
                    "sum(increase(meter_gateway_records_accepted_total[$__range]))",
                    "records",
                    instant=True,
                )
            ],
            decimals=0,
        ),
        w=6,
        h=5,
    )
    lay.add(
        stat(
            "Meters at or over capacity",
            "Meters whose value has reached their capacity in the current reset period.",
            [
                target(
                    f"count({meter('usage_ratio')} >= 1) or vector(0)",
                    "meters",
                    instant=True,
                )
            ],
            th=thresholds(GREEN, (1, RED)),
            decimals=0,
        ),
        w=6,
        h=5,
    )
    lay.add(
        table(
            "Period to date by customer and dimension",
            "Aggregated usage and billable quantity (after the dimension's interval, "
            "increment and rounding) in the current billing period.",
            [
                target(USAGE, ref="A", instant=True, table=True),
                target(QUANTITY, ref="B", instant=True, table=True),
            ],
            {"A": "Usage", "B": "Billable quantity"},
            sort_by="Usage",
        ),
        w=12,
        h=10,
    )
    lay.add(
        bargauge(
            "Top customers by usage",
            "The ten customers with the most usage of each selected dimension this period.",
            [
                target(
                    f"topk by (dimension) (10, {USAGE})",
                    "{{dimension}} · {{customer}}",
                    instant=True,
                )
            ],
        ),
        w=12,
        h=10,
    )
    lay.row("Usage over time")
    lay.add(
        timeseries(
            "Usage, period to date",
            "Aggregated usage so far in the billing period; it drops to zero when a new "
            "period starts.",
            [target(USAGE, "{{customer}} · {{dimension}}")],
        ),
        w=12,
        h=9,
    )
    lay.add(
        timeseries(
            "Usage rate (per hour)",
            "How fast period usage grows, extrapolated to an hour.",
            [
                target(
                    "clamp_min(max by (customer, dimension) "
                    f"(deriv(meter_gateway_period_usage{{{SEL}}}[$__rate_interval])) * 3600, 0)",
                    "{{customer}} · {{dimension}}",
                )
            ],
        ),
        w=12,
        h=9,
    )
    lay.add(
        timeseries(
            "Billable quantity, period to date",
            "What the invoice will count for each customer and dimension so far.",
            [target(QUANTITY, "{{customer}} · {{dimension}}")],
        ),
        w=12,
        h=9,
    )
    lay.add(
        timeseries(
            "Live ingest rate by receiver",
            "Usage records committed per second, by the receiver that took them.",
            [
                target(
                    "sum by (receiver) "
                    "(rate(meter_gateway_records_accepted_total[$__rate_interval]))",
                    "{{receiver}}",
                )
            ],
            unit="suffix: rec/s",
            stack=True,
        ),
        w=12,
        h=9,
    )
    lay.row("Meters")
    lay.add(
        bargauge(
            "Meter capacity used",
            "Each meter's value as a share of its capacity in the current reset period.",
            [target(meter("usage_ratio"), "{{meter}} · {{customer}}", instant=True)],
            unit="percentunit",
            th=CAPACITY_TH,
            hi=1,
        ),
        w=12,
        h=9,
    )
    lay.add(
        timeseries(
            "Meter value and capacity",
            "Meter values against their capacity.",
            [
                target(meter("value"), "{{meter}} · {{customer}}", ref="A"),
                target(meter("capacity"), "{{meter}} · {{customer}} capacity", ref="B"),
            ],
        ),
        w=12,
        h=9,
    )
    return dashboard(
        uid=UID,
        title="Meter gateway · Usage",
        description="Per customer and dimension usage, period to date and over time.",
        layout=lay,
        variables=[
            query_variable("customer", "Customer", "meter_gateway_period_usage"),
            query_variable(
                "dimension",
                "Dimension",
                'meter_gateway_period_usage{customer=~"$customer"}',
            ),
        ],
    )
