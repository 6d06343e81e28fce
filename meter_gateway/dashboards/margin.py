"""Profit margin: revenue, cost and margin (absolute and %) per customer and dimension, the
lowest-margin customers, and margin over time, in one currency at a time.

Revenue is the priced line amount of the current billing period so far — usage lines, and
the recurring fee and the credit line as the pseudo-dimensions ``fee/<offering>`` and
``credits/<unit>``, so a customer's revenue is the rating's total (what the draft invoice
shows before manual items, which are revenue only once invoiced) — cost is billable
quantity × the dimension's ``unit_cost`` and margin their difference, all computed by the
gateway. Every replica reports the same totals, so each series
is de-duplicated with ``max by (customer, dimension, currency)`` before it is summed.
"""

from __future__ import annotations

from meter_gateway.dashboards._grafana import (
    GREEN,
    JSON,
    NEUTRAL,
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

UID = "meter-gateway-margin"

SEL = 'currency="$currency", customer=~"$customer", dimension=~"$dimension"'
MARGIN_PCT_TH = thresholds(RED, (0, ORANGE), (0.3, GREEN))
MARGIN_TH = thresholds(RED, (0, GREEN))
REVENUE_NOTE = (
    "Revenue holds every rated line: usage, the recurring fee (dimension fee/<offering>) and "
    "the credit line (credits/<unit>; the dimensions it converts show their cost only), so a "
    "customer's revenue is the draft invoice's total without its manual items (not revenue "
    "until invoiced)."
)


def money(family: str, by: str = "") -> str:
    """``revenue``, ``cost`` or ``margin`` of the period so far, summed ``by`` the labels."""
    grouping = f" by ({by})" if by else ""
    return (
        f"sum{grouping} (max by (customer, dimension, currency) "
        f"(meter_gateway_period_{family}{{{SEL}}}))"
    )


def margin(by: str = "") -> str:
    """Revenue − cost as the gateway computes it (exact decimals, rounded lines)."""
    return money("margin", by)


def margin_ratio(by: str = "") -> str:
    """Margin as a share of revenue; groups without revenue have none (not ±Inf)."""
    return f"{margin(by)} / ({money('revenue', by)} > 0)"


def build() -> JSON:
    lay = Layout()
    lay.row("Current billing period ($currency)")
    for title, desc, expr, unit, th in (
        ("Revenue", f"Billed so far this period. {REVENUE_NOTE}", money("revenue"), "short", None),
        ("Cost", "Billable quantity × unit cost so far.", money("cost"), "short", None),
        ("Margin", "Revenue − cost.", margin(), "short", MARGIN_TH),
        ("Margin %", "(Revenue − cost) ÷ revenue.", margin_ratio(), "percentunit", MARGIN_PCT_TH),
    ):
        lay.add(
            stat(
                title,
                desc,
                [target(expr, title, instant=True)],
                unit=unit,
                decimals=2 if unit == "short" else 1,
                th=th or NEUTRAL,
            ),
            w=6,
            h=5,
        )
    for by, name in (("customer", "customer"), ("dimension", "dimension")):
        lay.add(
            table(
                f"Revenue, cost and margin by {name}",
                f"Current billing period so far, per {name}, in $currency. {REVENUE_NOTE}",
                [
                    target(money("revenue", by), ref="A", instant=True, table=True),
                    target(money("cost", by), ref="B", instant=True, table=True),
                    target(margin(by), ref="C", instant=True, table=True),
                    target(f"100 * {margin_ratio(by)}", ref="D", instant=True, table=True),
                ],
                {"A": "Revenue", "B": "Cost", "C": "Margin", "D": "Margin %"},
                sort_by="Revenue",
                decimals=2,
            ),
            w=12,
            h=10,
        )
    for by in ("customer", "dimension"):
        lay.add(
            bargauge(
                f"Lowest-margin {by}s",
                f"The ten {by}s with the smallest margin as a share of their revenue.",
                [target(f"bottomk(10, {margin_ratio(by)})", f"{{{{{by}}}}}", instant=True)],
                unit="percentunit",
                th=MARGIN_PCT_TH,
                lo=-1,
                hi=1,
                decimals=1,
            ),
            w=12,
            h=10,
        )
    lay.add(
        table(
            "Prepaid wallet balance",
            "Credit left in each customer's prepaid wallet, in $currency; it is drawn down "
            "when invoices are finalized.",
            [
                target(
                    "max by (customer) (meter_gateway_wallet_balance"
                    '{currency="$currency", customer=~"$customer"})',
                    ref="A",
                    instant=True,
                    table=True,
                )
            ],
            {"A": "Balance"},
            sort_by="Balance",
            descending=False,  # who runs out first
            decimals=2,
        ),
        w=24,
        h=8,
    )
    lay.row("Over time")
    lay.add(
        timeseries(
            "Revenue and cost, period to date",
            "All selected customers and dimensions; both restart at zero each period. "
            + REVENUE_NOTE,
            [
                target(money("revenue"), "revenue", ref="A"),
                target(money("cost"), "cost", ref="B"),
            ],
            decimals=2,
        ),
        w=12,
        h=9,
    )
    lay.add(
        timeseries(
            "Margin by customer, period to date",
            "Revenue − cost per customer.",
            [target(margin("customer"), "{{customer}}")],
            th=MARGIN_TH,
            decimals=2,
        ),
        w=12,
        h=9,
    )
    lay.add(
        timeseries(
            "Margin % by customer",
            "(Revenue − cost) ÷ revenue per customer.",
            [target(margin_ratio("customer"), "{{customer}}")],
            unit="percentunit",
            th=MARGIN_PCT_TH,
            decimals=1,
        ),
        w=12,
        h=9,
    )
    lay.add(
        timeseries(
            "Margin % by dimension",
            "(Revenue − cost) ÷ revenue per dimension.",
            [target(margin_ratio("dimension"), "{{dimension}}")],
            unit="percentunit",
            th=MARGIN_PCT_TH,
            decimals=1,
        ),
        w=12,
        h=9,
    )
    return dashboard(
        uid=UID,
        title="Meter gateway · Profit margin",
        description="Revenue, cost and margin per customer and dimension, current billing period.",
        layout=lay,
        variables=[
            query_variable(
                "currency",
                "Currency",
                "meter_gateway_period_revenue",
                multi=False,
                description="Amounts in different currencies are never added up.",
            ),
            query_variable(
                "customer", "Customer", 'meter_gateway_period_revenue{currency="$currency"}'
            ),
            query_variable(
                "dimension",
                "Dimension",
                'meter_gateway_period_revenue{currency="$currency", customer=~"$customer"}',
            ),
        ],
    )
