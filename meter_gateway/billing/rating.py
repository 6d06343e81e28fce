"""The one rating path (SPEC §9): a customer's usage and money for a period, as of a moment.

``rate`` turns (customer, period ``[from, to)``, ``asOf``) into lines — dimension, usage,
quantity, unit, tier breakdown, amount (exact and rounded), cost, warnings — and the totals.
usage-summary, draft and finalized invoices, margin, the ``meter_gateway_period_*`` gauges and
meters all read it; nothing else turns usage into a period quantity or an amount.

Usage is measured up to ``asOf = min(now, to)`` and never extrapolated: a time-weighted level
is integrated to ``asOf`` and divided by the whole period (``aggregation.engine.aggregate``).
A quantity that comes out below zero (a ``weighted_sum`` level driven under zero) is billed as
0 and its line says why in ``warnings``; the raw aggregate stays in ``usage``.

Plans (SPEC 11): a charge's ``included`` units are free (priced on max(0, quantity -
included)); a charge with ``credits_per_unit`` turns its quantity into the offering's credits,
and all of them are priced on the one credit line; an offering's recurring fee gives the fee
lines of the cycles this period carries (``billing.fees``). The total holds all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from zoneinfo import ZoneInfo

from meter_gateway import pricing
from meter_gateway.aggregation.engine import period
from meter_gateway.billing.fees import FeeCycle, billed_cycles
from meter_gateway.catalog import Catalog
from meter_gateway.config import Charge, CreditUnit, Dimension, Fee, Offering
from meter_gateway.decimals import EXACT, ZERO, fmt
from meter_gateway.store.base import UsageReader
from meter_gateway.usage import current_period

__all__ = [
    "CreditLine",
    "FeeLine",
    "Line",
    "Quantity",
    "Rating",
    "as_of",
    "current",
    "pricing_charge",
    "quantity",
    "rate",
]


def as_of(now_ns: int, from_ns: int, to_ns: int) -> int:
    """Where a period ``[from, to)`` read at ``now_ns`` is measured up to: min(now, to), and
    never before ``from`` (a period that has not begun has measured nothing)."""
    return max(from_ns, min(now_ns, to_ns))


@dataclass(frozen=True, slots=True)
class Quantity:
    """One dimension's usage over a period, measured up to ``as_of``."""

    usage: Decimal | None  # the period as one window: what GET /v1/usage?window=month shows
    raw: Decimal  # Σ over the aggregation intervals of rounding(aggregate / increment)
    billable: Decimal  # what is billed: raw, or 0 when raw is negative
    warnings: tuple[str, ...] = ()


def quantity(
    store: UsageReader,
    customer: str,
    dim: Dimension,
    from_ns: int,
    to_ns: int,
    as_of_ns: int,
    tz: ZoneInfo,
) -> Quantity:
    """The billable quantity of ``dim`` for ``customer`` in ``[from_ns, to_ns)`` (SPEC §2, §9)."""
    if to_ns <= from_ns:
        return Quantity(None, ZERO, ZERO)
    usage, raw = period(store, customer, dim, from_ns, to_ns, tz, as_of_ns)
    if raw >= 0:
        return Quantity(usage, raw, raw)
    warning = (
        f"the billable quantity came out negative ({fmt(raw)}): billed as 0; "
        f"the {dim.aggregation} usage behind it is in GET /v1/usage"
    )
    return Quantity(usage, raw, ZERO, (warning,))


@dataclass(frozen=True, slots=True)
class Line:
    """One dimension of a rating. ``charge`` is None for a dimension the offering meters but
    does not bill (then ``priced`` and ``amount`` are None too)."""

    dimension: Dimension
    usage: Decimal | None
    quantity: Decimal  # the billable quantity, never negative (included units not taken off)
    charge: pricing.Charge | None
    priced: pricing.PricedAmount | None  # the exact amount and its tier breakdown
    amount: Decimal | None  # rounded to the currency's minor unit, once
    cost: Decimal  # quantity × unit_cost, rounded like amounts (exact without a currency)
    warnings: tuple[str, ...]
    included: Decimal | None = None  # the charge's free units of the period
    billed: Decimal | None = None  # max(0, quantity − included): what is priced (or converted)
    credits_per_unit: Decimal | None = None  # a charge in credits: priced on the credit line
    credits: Decimal | None = None  # billed × credits_per_unit

    @property
    def revenue(self) -> Decimal:
        """What the line bills (0 when it is not billed, or billed in credits)."""
        return self.amount if self.amount is not None else ZERO

    @property
    def margin(self) -> Decimal:
        return EXACT.subtract(self.revenue, self.cost)


@dataclass(frozen=True, slots=True)
class CreditLine:
    """The offering's custom unit: the credits the charges converted (``conversions``, their
    lines), less the included credits, priced on one line."""

    unit: CreditUnit
    conversions: tuple[Line, ...]
    credits: Decimal  # Σ of the conversions' credits
    billed: Decimal  # max(0, credits − included)
    charge: pricing.Charge
    priced: pricing.PricedAmount
    amount: Decimal


@dataclass(frozen=True, slots=True)
class FeeLine:
    """A recurring fee of one cycle (``billing.fees``), rounded like every line."""

    fee: Fee
    cycle: FeeCycle
    amount: Decimal


@dataclass(frozen=True, slots=True)
class Rating:
    customer: str
    from_ns: int
    to_ns: int
    as_of_ns: int
    offering: Offering | None
    lines: tuple[Line, ...]
    fees: tuple[FeeLine, ...] = ()
    credit: CreditLine | None = None

    @property
    def currency(self) -> str | None:
        """The offering's currency; None for a customer without an offering (nothing billed)."""
        return None if self.offering is None else self.offering.currency

    @property
    def total(self) -> Decimal | None:
        """The sum of the rounded line amounts (SPEC §3): usage, credits and fees; None
        without an offering."""
        if self.currency is None:
            return None
        return self.revenue

    @property
    def revenue(self) -> Decimal:
        amounts = [ln.revenue for ln in self.lines] + [f.amount for f in self.fees]
        if self.credit is not None:
            amounts.append(self.credit.amount)
        return self._money(sum(amounts, ZERO))

    @property
    def cost(self) -> Decimal:
        return self._money(sum((ln.cost for ln in self.lines), ZERO))

    @property
    def margin(self) -> Decimal:
        return EXACT.subtract(self.revenue, self.cost)

    def _money(self, amount: Decimal) -> Decimal:
        # sums of rounded amounts are exact; this only gives them the minor unit's places
        return amount if self.currency is None else pricing.round_money(amount, self.currency)


def pricing_charge(charge: Charge | CreditUnit, dim: Dimension | None = None) -> pricing.Charge:
    """The pricing model of a configured charge (a per-unit charge defaults to the dimension's
    price) or credit unit."""
    unit_price = charge.unit_price
    if charge.model == "per_unit" and unit_price is None:
        unit_price = dim.price if dim is not None and dim.price is not None else ZERO
    return pricing.Charge(
        model=charge.model,
        unit_price=unit_price,
        tiers=tuple(pricing.Tier(t.up_to, t.unit_price, t.flat_fee) for t in charge.tiers),
        package_size=charge.package_size,
        package_price=charge.package_price,
        free_units=charge.free_units,
    )


def _line(
    store: UsageReader,
    customer: str,
    dim: Dimension,
    charge: Charge | None,
    currency: str | None,
    from_ns: int,
    to_ns: int,
    as_of_ns: int,
    tz: ZoneInfo,
) -> Line:
    q = quantity(store, customer, dim, from_ns, to_ns, as_of_ns, tz)
    pc = priced = amount = None
    included = rate = credits = None
    billed = q.billable
    if charge is not None:
        included, rate = charge.included, charge.credits_per_unit
        if included is not None:
            billed = max(EXACT.subtract(q.billable, included), ZERO)
    if charge is not None and currency is not None:
        if rate is not None:
            credits = EXACT.multiply(billed, rate)
        else:
            pc = pricing_charge(charge, dim)
            priced = pricing.price(pc, billed)
            amount = pricing.round_money(priced.amount, currency)
    cost = EXACT.multiply(q.billable, dim.unit_cost or ZERO)
    if currency is not None:
        cost = pricing.round_money(cost, currency)
    return Line(
        dim, q.usage, q.billable, pc, priced, amount, cost, q.warnings,
        included, billed, rate, credits,
    )  # fmt: skip


def _credit_line(unit: CreditUnit, lines: Sequence[Line], currency: str) -> CreditLine:
    conversions = tuple(ln for ln in lines if ln.credits is not None)
    credits = sum((ln.credits for ln in conversions if ln.credits is not None), ZERO)
    billed = credits
    if unit.included is not None:
        billed = max(EXACT.subtract(credits, unit.included), ZERO)
    pc = pricing_charge(unit)
    priced = pricing.price(pc, billed)
    amount = pricing.round_money(priced.amount, currency)
    return CreditLine(unit, conversions, credits, billed, pc, priced, amount)


def _fee_lines(
    customer_id: str, catalog: Catalog, offering: Offering, from_ns: int, to_ns: int, tz: ZoneInfo
) -> tuple[FeeLine, ...]:
    fee = offering.fee
    if fee is None:
        return ()
    customer = catalog.customers[customer_id]
    return tuple(
        FeeLine(fee, c, pricing.round_money(c.exact, offering.currency))
        for c in billed_cycles(customer, fee, tz, from_ns, to_ns)
    )


def rate(
    store: UsageReader,
    catalog: Catalog,
    customer_id: str,
    from_ns: int,
    to_ns: int,
    as_of_ns: int,
    tz: ZoneInfo,
    *,
    charged_only: bool = False,
) -> Rating:
    """Rate a customer's period ``[from_ns, to_ns)`` measured up to ``as_of_ns``.

    Lines: one per charge of the customer's offering, in the offering's order (a charge
    appears even with no usage), then — unless ``charged_only`` (invoices) — every other
    dimension the customer has usage of, metered but not billed, by id. A charge whose
    dimension is not in the catalog raises ``KeyError``. Dimensions and offerings are those
    in effect at ``from_ns`` (``Catalog.at``: a change with ``effective_from`` never rates a
    period that started before it).
    """
    catalog = catalog.at(from_ns)  # the definitions that rate a period starting then
    customer = catalog.customers[customer_id]
    offering = catalog.offerings.get(customer.offering) if customer.offering else None
    charges = {c.dimension: c for c in offering.charges} if offering is not None else {}
    dim_ids = list(charges)
    if not charged_only:
        used = {d for _, d in store.pairs(customer_id, None, as_of_ns)}
        dim_ids += sorted(d for d in used - set(charges) if d in catalog.dimensions)
    currency = None if offering is None else offering.currency
    lines = tuple(
        _line(
            store,
            customer_id,
            catalog.dimensions[d],
            charges.get(d),
            currency,
            from_ns,
            to_ns,
            as_of_ns,
            tz,
        )
        for d in dim_ids
    )
    if offering is None:
        return Rating(customer_id, from_ns, to_ns, as_of_ns, None, lines)
    credit = None
    if offering.credit is not None:
        credit = _credit_line(offering.credit, lines, offering.currency)
    fees = _fee_lines(customer_id, catalog, offering, from_ns, to_ns, tz)
    return Rating(customer_id, from_ns, to_ns, as_of_ns, offering, lines, fees, credit)


def current(store: UsageReader, catalog: Catalog, now_ns: int, tz: ZoneInfo) -> Sequence[Rating]:
    """Every catalog customer with usage, rated for the billing period holding ``now_ns``."""
    start, end = current_period(now_ns, tz)
    at = as_of(now_ns, start, end)
    customers = sorted({c for c, _ in store.pairs(None, None, at)})
    return [
        rate(store, catalog, c, start, end, at, tz) for c in customers if c in catalog.customers
    ]
