"""Billing cycles (SPEC 11): each customer with ``billing`` is invoiced per cycle by itself.

A customer's cycles are ``interval`` long (``month`` or ``year``) and start at local midnight of
``anchor_day`` in the cycle's time zone (``cycle_containing``, a pure function of (time,
billing, zone) in ``billing.periods``); they are clipped to the customer's ``[start, end)``.
``CycleJob`` runs on the scheduler under the ``billing-cycles`` lease: it finds cycles that
closed at least ``finalize_after`` ago and that have no finalized invoice, and for each, oldest
first, creates and finalizes its invoice in ONE fenced store transaction that also moves the
customer's watermark (``cycles/<customer>``: every cycle before ``through`` is settled). Exactly
once across replicas and restarts: the lease fence, the watermark written with the invoice, and the
store's unique index on a customer's finalized period.

Where cycles begin: at the customer's ``start``; without one, at the cycle in progress when the
job first saw the customer's ``billing`` (set ``start`` to invoice earlier cycles). A voided
invoice of a cycle reopens the cycle (``cycles/<customer>/reopened/<from>``); the job invoices
it again ``finalize_after`` after the void, unless an invoice for it was finalized meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

from meter_gateway.billing.invoices import InvoiceError, Invoices
from meter_gateway.billing.periods import (
    bounds,
    current_cycle,
    cycle_containing,
    cycles_from,
    is_cycle,
    zone,
)
from meter_gateway.catalog import Catalog
from meter_gateway.config import Customer
from meter_gateway.store.base import BillingStore, InvoiceRow, PeriodInvoicedError

__all__ = [  # the cycle arithmetic is billing.periods'; callers find it here too
    "JOB_NAME",
    "CycleJob",
    "bounds",
    "current_cycle",
    "cycle_containing",
    "cycles_from",
    "is_cycle",
    "reopen",
    "zone",
]

log = logging.getLogger(__name__)

NS = 1_000_000_000
JOB_NAME = "billing-cycles"
STATE_PREFIX = "cycles/"
REOPENED = "/reopened/"
#: Cycles closed in one run; a run that has more continues at once (renewing its lease).
MAX_CYCLES_PER_RUN = 50
#: How often the job looks when nothing is due sooner (a catalog change may add customers).
POLL_S = 30.0
# --- job state -------------------------------------------------------------------------------


def state_key(customer: str) -> str:
    return f"{STATE_PREFIX}{customer}"


def reopened_key(customer: str, from_ns: int) -> str:
    return f"{STATE_PREFIX}{customer}{REOPENED}{from_ns:020d}"


def reopen(
    row: InvoiceRow, catalog: Catalog, default_tz: ZoneInfo
) -> dict[str, dict[str, Any] | None] | None:
    """The job state a void writes (``Invoices.reopen``): a void invoice of a cycle (made by
    the job, or by hand for exactly a cycle's period) reopens that cycle."""
    customer = catalog.customers.get(row.customer)
    if row.from_ns is None or row.to_ns is None or row.voided_ns is None:
        return None
    if row.origin != "cycle":
        if customer is None or customer.billing is None:
            return None
        if not is_cycle(customer, zone(customer.billing, default_tz), row.from_ns, row.to_ns):
            return None
    mark = {"from": row.from_ns, "to": row.to_ns, "voidedAt": row.voided_ns, "invoiceId": row.id}
    return {reopened_key(row.customer, row.from_ns): mark}


# --- the job ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Due:
    end: int
    customer: str
    start: int
    states: dict[str, dict[str, Any] | None]


class CycleJob:
    """The scheduled job that invoices closed cycles; see the module docstring."""

    name = JOB_NAME

    def __init__(
        self,
        store: BillingStore,
        invoices: Invoices,
        catalog: Callable[[], Catalog],
        tz: ZoneInfo,
        holder: Callable[[], str],
    ) -> None:
        self._store = store
        self._invoices = invoices
        self._catalog = catalog
        self._tz = tz
        self._holder = holder

    def run(self, now_ns: int) -> float:
        catalog = self._catalog()
        stored = self._store.job_state(STATE_PREFIX)
        fence = (self.name, self._holder())
        due: list[_Due] = []
        first_seen: dict[str, dict[str, Any] | None] = {}
        next_s = POLL_S
        for customer in sorted(catalog.customers.values(), key=lambda c: c.id):
            if customer.billing is None:
                continue
            found, wait_s, new_state = self._due(customer, stored, now_ns)
            due += found
            next_s = min(next_s, wait_s)
            if new_state is not None:
                first_seen[state_key(customer.id)] = new_state
        if first_seen:
            self._store.job_commit(first_seen, [], fence, now_ns)
        due.sort(key=lambda d: (d.end, d.customer, d.start))
        skipped: set[str] = set()
        for d in due[:MAX_CYCLES_PER_RUN]:
            if d.customer in skipped:
                continue  # an earlier cycle of it failed: keep its cycles in order
            if not self._close(catalog, d, fence, now_ns):
                skipped.add(d.customer)
        if len(due) > MAX_CYCLES_PER_RUN:
            return 0.0
        return max(next_s, 0.0)

    def _due(
        self, customer: Customer, stored: Mapping[str, dict[str, Any]], now_ns: int
    ) -> tuple[list[_Due], float, dict[str, Any] | None]:
        """(the customer's due cycles, seconds until its next one is due, its first state)."""
        billing = customer.billing
        assert billing is not None
        tz = zone(billing, self._tz)
        after_ns = billing.finalize_after // timedelta(microseconds=1) * 1000
        key = state_key(customer.id)
        state = stored.get(key)
        new_state = None
        if state is None:
            start, _ = bounds(customer)
            through = start if start is not None else cycle_containing(customer, tz, now_ns)[0]
            new_state = {"through": through}
        else:
            through = int(state["through"])
        found: list[_Due] = []
        wait_s = POLL_S
        for lo, hi in cycles_from(customer, tz, through):
            if hi + after_ns > now_ns:
                wait_s = (hi + after_ns - now_ns) / NS
                break
            reopened = reopened_key(customer.id, lo)
            found.append(_Due(hi, customer.id, lo, {key: {"through": hi}, reopened: None}))
            if len(found) > MAX_CYCLES_PER_RUN:
                break
        prefix = key + REOPENED
        for k, mark in stored.items():
            if not k.startswith(prefix) or int(mark["to"]) > through:
                continue  # not reopened, or a cycle the watermark has yet to reach
            ready = int(mark["voidedAt"]) + after_ns
            if ready > now_ns:
                wait_s = min(wait_s, (ready - now_ns) / NS)
                continue
            found.append(_Due(int(mark["to"]), customer.id, int(mark["from"]), {k: None}))
        return found, wait_s, new_state

    def _close(self, catalog: Catalog, d: _Due, fence: tuple[str, str], now_ns: int) -> bool:
        """Invoice one due cycle (or settle it when there is nothing to invoice); False when
        it failed and the customer's later cycles must wait."""
        customer = catalog.customers[d.customer]
        if customer.offering is None or customer.offering not in catalog.offerings:
            # Nothing to invoice: the cycle is settled without an invoice.
            self._store.job_commit(d.states, [], fence, now_ns)
            return True
        try:
            row = self._invoices.issue(d.customer, d.start, d.end, fence, d.states)
        except PeriodInvoicedError:
            # Invoiced already (by hand, or before a restart): only the watermark moves.
            self._store.job_commit(d.states, [], fence, now_ns)
            return True
        except InvoiceError as exc:
            log.warning(
                "billing cycle of %s [%d, %d) not invoiced: %s", d.customer, d.start, d.end, exc
            )
            return False
        log.info("invoiced %s's billing cycle as %s (%s)", d.customer, row.number, row.id)
        return True
