"""Meters (DigitalRoute's model): per customer and dimension, a value that accumulates over a
reset period, with thresholds that push an event the moment they are reached.

``MeterJob`` is a scheduled job (one replica at a time, under the ``meters`` lease), woken after
every commit that touches a metered (customer, dimension). Each run computes every meter's value
from the store (so usage committed by any replica counts), and in ONE fenced store transaction
records what it decided (the period, the thresholds fired in it) and appends the events to the
outbox: ``threshold_reached`` once per threshold per period, and on reset ``meter_reset`` with
the period's total (the "golden record"). Event ids are derived from (meter, period, threshold),
so a run repeated after a crash never queues an event twice. Periods that ended while no replica
ran are closed in order on the next run: thresholds their total reached but nobody reported are
reported (``late: true``), then their reset.

A meter's state is only (period, fired thresholds); its value is always computed from usage, so
late records move the value of the current period (not of closed ones: their golden record has
been sent).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from meter_gateway.aggregation.windows import next_start, truncate
from meter_gateway.billing import cycles, rating
from meter_gateway.billing.events import EventRoute
from meter_gateway.catalog import Catalog
from meter_gateway.config import Customer, Dimension, Meter, MeterThreshold
from meter_gateway.decimals import EXACT, ZERO, fmt
from meter_gateway.model import Batch, CommitResult
from meter_gateway.pipeline.timestamps import format_timestamp
from meter_gateway.store.base import MeteredBillingStore, OutboxEvent
from meter_gateway.usage import current_period

log = logging.getLogger(__name__)

NS = 1_000_000_000
JOB_NAME = "meters"
STATE_PREFIX = "meter/"
MAX_PERIODS_PER_RUN = 500
HUNDRED = Decimal(100)


def period(
    meter: Meter, now_ns: int, tz: ZoneInfo, customer: Customer | None = None
) -> tuple[int, int | None]:
    """The meter's period holding ``now_ns``: [start, end); ``end`` None never resets.
    ``billing_period`` follows the customer's billing cycle (anchor day, its zone) when it has
    ``billing``, else the calendar month in ``tz``."""
    if meter.reset == "daily":
        start = truncate(now_ns, "day", tz)
        return start, next_start(start, "day", tz)
    if meter.reset == "monthly":
        start = truncate(now_ns, "month", tz)
        return start, next_start(start, "month", tz)
    if meter.reset == "billing_period":
        if customer is not None and customer.billing is not None:
            return cycles.current_cycle(customer, cycles.zone(customer.billing, tz), now_ns)
        return current_period(now_ns, tz)
    return 0, None


def limit(threshold: MeterThreshold, capacity: Decimal | None) -> Decimal | None:
    """The value at which the threshold is reached (None: a percent with no capacity)."""
    if threshold.value is not None:
        return threshold.value
    if capacity is None or threshold.percent is None:
        return None
    return EXACT.divide(EXACT.multiply(capacity, threshold.percent), HUNDRED)


def value(
    store: MeteredBillingStore,
    meter: Meter,
    dim: Dimension,
    from_ns: int,
    to_ns: int | None,
    now_ns: int,
    tz: ZoneInfo,
) -> Decimal:
    """The meter's value in its period [from_ns, to_ns) read at ``now_ns``, from the rating
    path (measured to min(now, to), SPEC §9): the usage aggregate or the billable quantity.
    A period without an end (``never``) is measured as [from_ns, now_ns)."""
    to = now_ns if to_ns is None else to_ns
    q = rating.quantity(
        store, meter.customer, dim, from_ns, to, rating.as_of(now_ns, from_ns, to), tz
    )
    if meter.measure == "billable_quantity":
        return q.billable
    return ZERO if q.usage is None else q.usage


@dataclass(frozen=True, slots=True)
class MeterReading:
    """A meter now: for the API and the metrics."""

    meter: Meter
    period_start: int
    period_end: int | None
    value: Decimal
    fired: Mapping[str, int]  # threshold key → when it fired (ns)
    last_reset: Mapping[str, Any] | None

    @property
    def ratio(self) -> Decimal | None:
        cap = self.meter.capacity
        return None if cap is None else EXACT.divide(self.value, cap)

    def to_json(self) -> dict[str, Any]:
        m = self.meter
        thresholds = []
        for t in m.thresholds:
            lim = limit(t, m.capacity)
            fired_ns = self.fired.get(t.key)
            thresholds.append(
                {
                    "key": t.key,
                    "name": t.name,
                    "value": None if t.value is None else fmt(t.value),
                    "percent": None if t.percent is None else fmt(t.percent),
                    "limit": None if lim is None else fmt(lim),
                    "reached": fired_ns is not None,
                    "reachedAt": None if fired_ns is None else format_timestamp(fired_ns),
                }
            )
        ratio = self.ratio
        return {
            "meterId": m.id,
            "customerId": m.customer,
            "dimensionId": m.dimension,
            "reset": m.reset,
            "measure": m.measure,
            "periodStart": format_timestamp(self.period_start),
            "periodEnd": None if self.period_end is None else format_timestamp(self.period_end),
            "value": fmt(self.value),
            "capacity": None if m.capacity is None else fmt(m.capacity),
            "usageRatio": None if ratio is None else fmt(ratio),
            "thresholds": thresholds,
            "lastReset": self.last_reset,
        }


def _signature(meter: Meter) -> str:
    # A state recorded under another customer, dimension, schedule or measure is not this
    # meter's history: it starts over (without a reset event for a period it never measured).
    return f"{meter.customer}|{meter.dimension}|{meter.reset}|{meter.measure}"


class MeterJob:
    """The scheduled job that advances every meter; see the module docstring."""

    name = JOB_NAME

    def __init__(
        self,
        store: MeteredBillingStore,
        catalog: Callable[[], Catalog],
        tz: ZoneInfo,
        route: EventRoute,
        holder: Callable[[], str],
        on_events: Callable[[], None] | None = None,
        poll_s: float = 5.0,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._tz = tz
        self._route = route
        self._holder = holder
        self._on_events = on_events
        self._poll_s = poll_s

    def run(self, now_ns: int) -> float:
        catalog = self._catalog()
        stored = self._store.job_state(STATE_PREFIX)
        states: dict[str, dict[str, Any]] = {}
        events: list[OutboxEvent] = []
        next_due_s = self._poll_s
        for meter in sorted(catalog.meters.values(), key=lambda m: m.id):
            dim = catalog.dimensions.get(meter.dimension)
            if dim is None or meter.customer not in catalog.customers:
                continue
            key = STATE_PREFIX + meter.id
            customer = catalog.customers[meter.customer]
            new_state, new_events, more = self._advance(
                meter, dim, customer, stored.get(key), now_ns
            )
            if new_state is not None:
                states[key] = new_state
            events.extend(new_events)
            if more:
                next_due_s = 0.0
            _, end = period(meter, now_ns, self._tz, customer)
            if end is not None:
                next_due_s = min(next_due_s, (end - now_ns) / NS + 0.001)
        if states or events:
            self._store.job_commit(states, events, (self.name, self._holder()), now_ns)
            if events and self._on_events is not None:
                self._on_events()
        return max(next_due_s, 0.0)

    def _advance(
        self,
        meter: Meter,
        dim: Dimension,
        customer: Customer,
        st: Mapping[str, Any] | None,
        now_ns: int,
    ) -> tuple[dict[str, Any] | None, list[OutboxEvent], bool]:
        tz = self._tz
        changed = False
        if st is None or st.get("signature") != _signature(meter):
            start, end = period(meter, now_ns, tz, customer)
            state: dict[str, Any] = {
                "signature": _signature(meter),
                "periodStart": start,
                "periodEnd": end,
                "fired": {},
                "lastReset": st.get("lastReset") if st is not None else None,
            }
            changed = True
        else:
            state = {**st, "fired": dict(st.get("fired") or {})}
        events: list[OutboxEvent] = []
        closed = 0
        while state["periodEnd"] is not None and state["periodEnd"] <= now_ns:
            if closed == MAX_PERIODS_PER_RUN:
                return state, events, True  # far behind: continue at once, in another run
            start, end = state["periodStart"], state["periodEnd"]
            total = value(self._store, meter, dim, start, end, end, tz)
            events.extend(self._thresholds(meter, state, total, start, end, now_ns, late=True))
            reset = {
                "periodStart": format_timestamp(start),
                "periodEnd": format_timestamp(end),
                "total": fmt(total),
                "at": format_timestamp(now_ns),
            }
            events.extend(
                self._route(
                    "meter_reset",
                    f"{meter.id}/{format_timestamp(start)}/reset",
                    {**self._ids(meter), **reset, "capacity": _opt(meter.capacity)},
                    now_ns,
                )
            )
            nstart, nend = period(meter, end, tz, customer)
            state = {**state, "periodStart": nstart, "periodEnd": nend, "fired": {}}
            state["lastReset"] = reset
            changed = True
            closed += 1
        start, end = state["periodStart"], state["periodEnd"]
        current = value(self._store, meter, dim, start, end, now_ns, tz)
        fired = self._thresholds(meter, state, current, start, end, now_ns, late=False)
        if fired:
            events.extend(fired)
            changed = True
        return (state if changed else None), events, False

    def _thresholds(
        self,
        meter: Meter,
        state: dict[str, Any],
        current: Decimal,
        start: int,
        end: int | None,
        now_ns: int,
        late: bool,
    ) -> list[OutboxEvent]:
        """Events for thresholds ``current`` reaches that have not fired this period; marks
        them fired in ``state``."""
        out: list[OutboxEvent] = []
        fired: dict[str, int] = state["fired"]
        for t in meter.thresholds:
            lim = limit(t, meter.capacity)
            if lim is None or t.key in fired or current < lim:
                continue
            fired[t.key] = now_ns
            data = {
                **self._ids(meter),
                "threshold": {
                    "key": t.key,
                    "name": t.name,
                    "value": _opt(t.value),
                    "percent": _opt(t.percent),
                    "limit": fmt(lim),
                },
                "value": fmt(current),
                "capacity": _opt(meter.capacity),
                "periodStart": format_timestamp(start),
                "periodEnd": None if end is None else format_timestamp(end),
                "late": late,
            }
            event_id = f"{meter.id}/{format_timestamp(start)}/threshold/{t.key}"
            out.extend(self._route("threshold_reached", event_id, data, now_ns))
        return out

    @staticmethod
    def _ids(meter: Meter) -> dict[str, Any]:
        return {
            "meterId": meter.id,
            "customerId": meter.customer,
            "dimensionId": meter.dimension,
            "reset": meter.reset,
            "measure": meter.measure,
        }


def _opt(v: Decimal | None) -> str | None:
    return None if v is None else fmt(v)


def readings(
    store: MeteredBillingStore, catalog: Catalog, tz: ZoneInfo, now_ns: int
) -> list[MeterReading]:
    """Every meter's current reading (value computed now; fired thresholds from the state the
    job recorded for the current period)."""
    stored = store.job_state(STATE_PREFIX)
    out = []
    for meter in sorted(catalog.meters.values(), key=lambda m: m.id):
        r = reading(store, catalog, meter, tz, now_ns, stored.get(STATE_PREFIX + meter.id))
        if r is not None:
            out.append(r)
    return out


def reading(
    store: MeteredBillingStore,
    catalog: Catalog,
    meter: Meter,
    tz: ZoneInfo,
    now_ns: int,
    st: Mapping[str, Any] | None,
) -> MeterReading | None:
    dim = catalog.dimensions.get(meter.dimension)
    if dim is None:
        return None
    start, end = period(meter, now_ns, tz, catalog.customers.get(meter.customer))
    current = value(store, meter, dim, start, end, now_ns, tz)
    fired: Mapping[str, int] = {}
    if st is not None and st.get("signature") == _signature(meter) and st["periodStart"] == start:
        fired = st.get("fired") or {}
    return MeterReading(
        meter, start, end, current, fired, st.get("lastReset") if st is not None else None
    )


class CommitWaker:
    """The ingestor's ``on_commit``: after a commit that added usage for a metered
    (customer, dimension), wake the meter job so thresholds fire at once."""

    def __init__(self, catalog: Callable[[], Catalog], wake: Callable[[], None]) -> None:
        self._catalog = catalog
        self._wake = wake
        self._metered: tuple[Catalog | None, frozenset[tuple[str, str]]] = (None, frozenset())

    def __call__(self, batches: Sequence[Batch], results: Sequence[CommitResult]) -> None:
        if any(r.accepted for r in results):
            metered = self._pairs()
            if metered and any(
                (r.customer_id, r.dimension_id) in metered for b in batches for r in b.records
            ):
                self._wake()

    def _pairs(self) -> frozenset[tuple[str, str]]:
        catalog = self._catalog()
        if self._metered[0] is not catalog:  # snapshots are immutable: recompute on a swap
            pairs = frozenset((m.customer, m.dimension) for m in catalog.meters.values())
            self._metered = (catalog, pairs)
        return self._metered[1]
