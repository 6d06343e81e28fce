"""Usage queries shared by the API, the metrics collector and (later) invoices.

Billing periods are calendar months in the billing time zone; a summary prices each dimension
of the customer's offering with ``pricing`` and rounds each line once, in ``round_money``.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from zoneinfo import ZoneInfo

from meter_gateway import pricing
from meter_gateway.aggregation.engine import aggregate, billable_quantity
from meter_gateway.aggregation.windows import Window, next_start, split, truncate
from meter_gateway.catalog import Catalog
from meter_gateway.config import Charge, Dimension
from meter_gateway.decimals import EXACT, ZERO
from meter_gateway.store.base import Store


@dataclass(frozen=True, slots=True)
class WindowValue:
    start: int
    end: int
    customer: str
    dimension: str
    value: Decimal | None


@dataclass(frozen=True, slots=True)
class SummaryLine:
    dimension: Dimension
    quantity: Decimal
    usage: Decimal | None
    amount: Decimal | None
    priced: pricing.PricedAmount | None


@dataclass(frozen=True, slots=True)
class Summary:
    customer: str
    from_ns: int
    to_ns: int
    currency: str | None
    lines: list[SummaryLine]
    total: Decimal | None


def current_period(now_ns: int, tz: ZoneInfo) -> tuple[int, int]:
    start = truncate(now_ns, "month", tz)
    return start, next_start(start, "month", tz)


def windows(
    store: Store,
    catalog: Catalog,
    customer: str | None,
    dimension: str | None,
    from_ns: int,
    to_ns: int,
    window: Window,
    tz: ZoneInfo,
) -> list[WindowValue]:
    """Every window of every matching (customer, dimension) pair, empty windows included."""
    spans = split(from_ns, to_ns, window, tz)
    if customer is not None and dimension is not None:
        pairs = [(customer, dimension)]
    else:
        pairs = store.pairs(customer, dimension, to_ns)
    out = []
    for c, d in pairs:
        dim = catalog.dimensions.get(d)
        if dim is None:
            continue
        for (s, e), v in zip(spans, aggregate(store, c, dim, spans), strict=True):
            out.append(WindowValue(s, e, c, d, v))
    return out


def to_pricing_charge(charge: Charge, dim: Dimension) -> pricing.Charge:
    unit_price = charge.unit_price
    if charge.model == "per_unit" and unit_price is None:
        unit_price = dim.price if dim.price is not None else ZERO
    return pricing.Charge(
        model=charge.model,
        unit_price=unit_price,
        tiers=tuple(pricing.Tier(t.up_to, t.unit_price, t.flat_fee) for t in charge.tiers),
        package_size=charge.package_size,
        package_price=charge.package_price,
        free_units=charge.free_units,
    )


def summary(
    store: Store, catalog: Catalog, customer_id: str, from_ns: int, to_ns: int, tz: ZoneInfo
) -> Summary:
    customer = catalog.customers[customer_id]
    offering = catalog.offerings.get(customer.offering) if customer.offering else None
    charges = {c.dimension: c for c in offering.charges} if offering else {}
    used = {d for c, d in store.pairs(customer_id, None, to_ns)}
    dim_ids = list(charges) + sorted(used - set(charges))
    lines, total = [], ZERO
    for d in dim_ids:
        dim = catalog.dimensions.get(d)
        if dim is None:
            continue
        quantity = billable_quantity(store, customer_id, dim, from_ns, to_ns, tz)
        amount = priced = None
        if d in charges and offering is not None:
            priced = pricing.price(to_pricing_charge(charges[d], dim), quantity)
            amount = pricing.round_money(priced.amount, offering.currency)
            total = EXACT.add(total, amount)
        lines.append(SummaryLine(dim, quantity, None, amount, priced))
    return Summary(
        customer_id,
        from_ns,
        to_ns,
        offering.currency if offering else None,
        lines,
        pricing.round_money(total, offering.currency) if offering else None,
    )


def period_usage(
    store: Store, catalog: Catalog, customer_id: str, dim: Dimension, from_ns: int, to_ns: int
) -> Decimal | None:
    """The dimension's aggregate over the whole period (one window)."""
    return aggregate(store, customer_id, dim, [(from_ns, to_ns)])[0]
