"""Recurring fees (SPEC 11): which cycles' fees a period's invoice carries, prorated by days.

A fee's cycles are ``fee.interval`` long and cut like the customer's billing cycles (its
``billing.anchor_day`` and zone; without ``billing``, the 1st in the gateway's zone; a yearly
one starts in the month of the customer's ``start``, else January), clipped to the customer's
``[start, end)``. Each cycle is billed once, on the invoice whose period holds its *billing
point*:

- ``arrears``: the last instant of the cycle (as clipped): the invoice of the period that
  ends it carries it;
- ``advance``: the instant before the cycle starts, so the invoice issued when the cycle
  starts (the previous period's) carries it and a period's invoice carries none for itself;
  the subscription's first cycle, which has no previous period, is billed on the invoice whose
  period holds the subscription's start.

The same rule holds for off-cycle periods: consecutive periods never bill a cycle twice nor
skip one. A cycle subscribed only in part is prorated by whole days in the cycle's zone (a day
begun counts): ``amount × days / days in the cycle``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

from meter_gateway.aggregation.engine import divide
from meter_gateway.billing.periods import NS, anchor_month, bounds, cycle_of, zone
from meter_gateway.config import Customer, Fee
from meter_gateway.decimals import EXACT

__all__ = ["FeeCycle", "billed_cycles"]


@dataclass(frozen=True, slots=True)
class FeeCycle:
    """One cycle's fee on an invoice."""

    cycle_from: int  # the fee's cycle, as the calendar cuts it
    cycle_to: int
    from_ns: int  # the part of it the customer is subscribed for
    to_ns: int
    days: int  # whole days of that part (a day begun counts)
    cycle_days: int
    exact: Decimal  # fee × days / cycle_days (to 18 places when the quotient does not end)

    @property
    def prorated(self) -> bool:
        return self.days != self.cycle_days


def billed_cycles(
    customer: Customer, fee: Fee, default_tz: ZoneInfo, from_ns: int, to_ns: int
) -> list[FeeCycle]:
    """The fee cycles an invoice for ``[from_ns, to_ns)`` carries, in time order."""
    tz = default_tz if customer.billing is None else zone(customer.billing, default_tz)
    anchor = 1 if customer.billing is None else customer.billing.anchor_day
    month = anchor_month(customer, tz)
    start, end = bounds(customer)
    out: list[FeeCycle] = []
    for cs, ce in _cycles(fee, anchor, month, tz, from_ns, to_ns):
        lo = cs if start is None else max(cs, start)
        hi = ce if end is None else min(ce, end)
        if lo >= hi:
            continue  # not subscribed in this cycle
        if not from_ns <= _billing_point(fee, cs, lo, hi, start) < to_ns:
            continue
        days = _days(lo, hi, tz)
        cycle_days = _days(cs, ce, tz)
        exact = divide(EXACT.multiply(fee.amount, days), cycle_days)
        out.append(FeeCycle(cs, ce, lo, hi, days, cycle_days, exact))
    return out


def _billing_point(fee: Fee, cs: int, lo: int, hi: int, start: int | None) -> int:
    """Where a cycle ``[cs, ..)``, subscribed in ``[lo, hi)``, is billed (module docstring)."""
    if fee.timing == "arrears":
        return hi - 1
    return lo if lo == start else cs - 1


def _cycles(
    fee: Fee, anchor: int, month: int, tz: ZoneInfo, from_ns: int, to_ns: int
) -> Iterator[tuple[int, int]]:
    """Every fee cycle whose billing point could fall in ``[from_ns, to_ns)``: from the one
    holding the instant before ``from_ns`` to the one that starts at or holds ``to_ns``."""
    cs, ce = cycle_of(fee.interval, anchor, month, tz, from_ns - 1)
    while cs <= to_ns:
        yield cs, ce
        cs, ce = ce, cycle_of(fee.interval, anchor, month, tz, ce)[1]


def _days(lo: int, hi: int, tz: ZoneInfo) -> int:
    """Local calendar days that ``[lo, hi)`` touches."""
    first = datetime.fromtimestamp(lo // NS, tz=tz).date()
    last = datetime.fromtimestamp((hi - 1) // NS, tz=tz).date()
    return (last - first).days + 1
