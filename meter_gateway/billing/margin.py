"""Revenue, cost and margin per customer and dimension over a period.

Revenue is the priced line amount (rounded, as invoiced); cost is billable quantity × the
dimension's ``unit_cost``, rounded to the same currency's minor unit in ``round_money``;
margin = revenue − cost, exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from zoneinfo import ZoneInfo

from meter_gateway.catalog import Catalog
from meter_gateway.decimals import EXACT, ZERO
from meter_gateway.pricing import round_money
from meter_gateway.store.base import Store
from meter_gateway.usage import summary

DEFAULT_CURRENCY = "USD"


@dataclass(frozen=True, slots=True)
class MarginLine:
    dimension: str
    quantity: Decimal
    revenue: Decimal
    cost: Decimal
    margin: Decimal
    billed: bool  # whether the offering charges this dimension


@dataclass(frozen=True, slots=True)
class Margin:
    customer: str
    currency: str
    lines: list[MarginLine]
    revenue: Decimal
    cost: Decimal
    margin: Decimal


def margin(
    store: Store, catalog: Catalog, customer: str, from_ns: int, to_ns: int, tz: ZoneInfo
) -> Margin:
    s = summary(store, catalog, customer, from_ns, to_ns, tz)
    currency = s.currency or DEFAULT_CURRENCY
    lines = []
    rev_total = cost_total = ZERO
    for ln in s.lines:
        revenue = ln.amount if ln.amount is not None else round_money(ZERO, currency)
        cost = round_money(EXACT.multiply(ln.quantity, ln.dimension.unit_cost or ZERO), currency)
        lines.append(
            MarginLine(
                ln.dimension.id,
                ln.quantity,
                revenue,
                cost,
                EXACT.subtract(revenue, cost),
                ln.amount is not None,
            )
        )
        rev_total = EXACT.add(rev_total, revenue)
        cost_total = EXACT.add(cost_total, cost)
    return Margin(
        customer, currency, lines, rev_total, cost_total, EXACT.subtract(rev_total, cost_total)
    )
