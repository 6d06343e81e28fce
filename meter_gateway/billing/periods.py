"""Billing periods as pure functions of (time, customer, zone): a customer's cycles (SPEC 11).

A customer's cycles are ``interval`` long (``month`` or ``year``) and start at local midnight of
``anchor_day`` in the cycle's time zone; they are clipped to the customer's ``[start, end)``.
The billing-cycles job (``billing.cycles``) invoices them; recurring fees (``billing.fees``)
are billed per cycle of the fee's own interval, cut the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from meter_gateway.config import Customer, CustomerBilling

NS = 1_000_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def zone(billing: CustomerBilling, default: ZoneInfo) -> ZoneInfo:
    return default if billing.time_zone is None else ZoneInfo(billing.time_zone)


def ns(dt: datetime) -> int:
    """An aware datetime in nanoseconds since the epoch."""
    return (dt - _EPOCH) // timedelta(microseconds=1) * 1000


def anchor_month(customer: Customer, tz: ZoneInfo) -> int:
    """A yearly cycle's month: the month of the customer's start (in the zone), else January."""
    return 1 if customer.start is None else customer.start.astimezone(tz).month


def _boundary(anchor_day: int, tz: ZoneInfo, year: int, month: int) -> int:
    # A local midnight a DST change skips resolves to the instant of the change.
    return ns(datetime(year, month, anchor_day, tzinfo=tz))


def cycle_containing(customer: Customer, tz: ZoneInfo, t_ns: int) -> tuple[int, int]:
    """The (unclipped) cycle ``[start, end)`` of ``customer`` holding ``t_ns``; ``tz`` is the
    cycle's zone (``zone(billing, default)``)."""
    billing = customer.billing
    assert billing is not None
    month = anchor_month(customer, tz)
    return cycle_of(billing.interval, billing.anchor_day, month, tz, t_ns)


def cycle_of(
    interval: Literal["month", "year"], anchor_day: int, month: int, tz: ZoneInfo, t_ns: int
) -> tuple[int, int]:
    """The cycle ``[start, end)`` holding ``t_ns`` of cycles ``interval`` long that start at
    local midnight of ``anchor_day`` (of ``month``, for yearly ones) in ``tz``."""
    local = datetime.fromtimestamp(t_ns // NS, tz=tz)
    if interval == "month":
        y, m = local.year, local.month
        start = _boundary(anchor_day, tz, y, m)
        if start > t_ns:
            y, m = (y - 1, 12) if m == 1 else (y, m - 1)
            start = _boundary(anchor_day, tz, y, m)
        ny, nm = (y + 1, 1) if m == 12 else (y, m + 1)
        return start, _boundary(anchor_day, tz, ny, nm)
    y = local.year
    start = _boundary(anchor_day, tz, y, month)
    if start > t_ns:
        y -= 1
        start = _boundary(anchor_day, tz, y, month)
    return start, _boundary(anchor_day, tz, y + 1, month)


def bounds(customer: Customer) -> tuple[int | None, int | None]:
    """The customer's ``start`` and ``end`` in ns (None: unbounded)."""
    return (
        None if customer.start is None else ns(customer.start),
        None if customer.end is None else ns(customer.end),
    )


def cycles_from(customer: Customer, tz: ZoneInfo, from_ns: int) -> Iterator[tuple[int, int]]:
    """The customer's cycles from ``from_ns`` on, clipped to its ``[start, end)``: the first
    starts at max(from_ns, start) and ends at the next boundary; they stop at ``end``."""
    start, end = bounds(customer)
    cursor = from_ns if start is None else max(from_ns, start)
    while end is None or cursor < end:
        _, cycle_end = cycle_containing(customer, tz, cursor)
        stop = cycle_end if end is None else min(cycle_end, end)
        yield cursor, stop
        cursor = stop


def is_cycle(customer: Customer, tz: ZoneInfo, from_ns: int, to_ns: int) -> bool:
    """Whether ``[from_ns, to_ns)`` is exactly one of the customer's (clipped) cycles."""
    start, end = bounds(customer)
    cycle_start, cycle_end = cycle_containing(customer, tz, from_ns)
    lo = cycle_start if start is None else max(cycle_start, start)
    hi = cycle_end if end is None else min(cycle_end, end)
    return (from_ns, to_ns) == (lo, hi)


def current_cycle(customer: Customer, tz: ZoneInfo, now_ns: int) -> tuple[int, int]:
    """The customer's cycle holding ``now_ns``, cut where its start or end falls inside (after
    the end: the rest of the cycle the end cut)."""
    start, end = bounds(customer)
    lo, hi = cycle_containing(customer, tz, now_ns)
    if start is not None and start <= now_ns:
        lo = max(lo, start)
    if end is not None:
        if now_ns < end:
            hi = min(hi, end)
        else:
            lo = max(lo, end)
    return lo, hi
