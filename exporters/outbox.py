"""The durable outbox between the gateway's events and the exporters that forward them.

Events are written to the store's outbox in the same transaction as the state change that
produced them (a meter's fired threshold, a finalized invoice), one row per subscribed exporter.
A ``DeliveryJob`` per exporter runs on the scheduler (under a lease: one replica at a time),
claims due rows oldest first, hands each to its ``Sink`` and marks it delivered, or records the
failure and retries it with exponential backoff. Delivery is at-least-once: a crash between a
sink accepting an event and the mark repeats it, with the same event id.

A sink raises ``DeliveryError`` when it cannot take events now (the round stops: the receiver is
likely down), ``EventError`` when this one event failed (it backs off alone and the round goes
on) and ``Skip`` when the event is not for it (marked delivered, counted, never retried).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from meter_gateway.billing.events import EventType, envelope
from meter_gateway.clock import Clock
from meter_gateway.store.base import BillingStore, OutboxEvent, OutboxItem

log = logging.getLogger(__name__)

NS = 1_000_000_000
DELIVERED_RETENTION_NS = 7 * 86400 * NS


class DeliveryError(Exception):
    """The sink could not take the event; it stays pending and is retried."""


class EventError(DeliveryError):
    """This event failed and the sink is fine (e.g. Stripe refused one customer's invoice): it
    is retried with its own backoff while the job goes on with the next events."""


class Skip(Exception):
    """The event does not concern this sink (e.g. a customer without a Stripe id): marked
    delivered without being sent, logged and counted, never retried."""


class Sink(Protocol):
    """Where an exporter puts an event. ``deliver`` returns once the event is safely taken
    (a 2xx, an fsynced line) and raises ``DeliveryError`` otherwise."""

    name: str

    def deliver(self, item: OutboxItem) -> None: ...

    def close(self) -> None: ...


class Router:
    """An ``EventRoute``: which exporters get which event types (None: all of them)."""

    def __init__(self, subscriptions: Mapping[str, frozenset[str] | None]) -> None:
        self._subs = dict(subscriptions)

    @property
    def exporters(self) -> list[str]:
        return sorted(self._subs)

    def __call__(
        self, type: EventType, event_id: str, data: Mapping[str, Any], created_ns: int
    ) -> list[OutboxEvent]:
        names = [n for n, types in sorted(self._subs.items()) if types is None or type in types]
        if not names:
            return []
        payload = envelope(type, event_id, data, created_ns)
        return [OutboxEvent(n, event_id, type, payload, created_ns) for n in names]


class DeliveryJob:
    """Forwards one exporter's pending events; a scheduler job named ``exporter:<name>``."""

    def __init__(
        self,
        store: BillingStore,
        sink: Sink,
        clock: Clock,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 300.0,
        max_attempts: int | None = None,
        on_delivery: Callable[[str, bool], None] | None = None,
        batch: int = 100,
        poll_s: float = 5.0,
        on_skip: Callable[[str], None] | None = None,
    ) -> None:
        self.name = f"exporter:{sink.name}"
        self.exporter = sink.name
        self._store = store
        self._sink = sink
        self._clock = clock
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._max_attempts = max_attempts
        self._on_delivery = on_delivery
        self._on_skip = on_skip
        self._batch = batch
        self._poll_s = poll_s
        self._last_purge_ns = 0

    def backoff_s(self, attempts: int) -> float:
        """Seconds before the next try after ``attempts`` failed ones: initial · 2^(n−1), capped."""
        initial, cap = self._backoff
        return float(min(cap, initial * 2 ** min(attempts - 1, 40)))

    def run(self, now_ns: int) -> float:
        items = self._store.outbox_claim(self.exporter, now_ns, self._batch)
        for item in items:
            try:
                self._sink.deliver(item)
            except Skip as skip:
                log.warning("exporter %s: event %s skipped: %s", self.exporter, item.event_id, skip)
                self._store.outbox_delivered(self.exporter, [item.seq], self._clock.now_ns())
                if self._on_skip is not None:
                    self._on_skip(self.exporter)
                continue
            except Exception as exc:
                attempts = item.attempts + 1
                give_up = self._max_attempts is not None and attempts >= self._max_attempts
                delay = self.backoff_s(attempts)
                now = self._clock.now_ns()
                self._store.outbox_failed(
                    self.exporter,
                    item.seq,
                    str(exc) or type(exc).__name__,
                    None if give_up else now + int(delay * NS),
                    now,
                )
                self._count(False)
                log.warning(
                    "exporter %s: event %s attempt %d failed%s: %s",
                    self.exporter,
                    item.event_id,
                    attempts,
                    " (given up)" if give_up else f", retry in {delay:g}s",
                    exc,
                )
                if isinstance(exc, EventError):
                    continue  # only this event is in trouble
                # The receiver is likely down: stop this round rather than fail every event.
                return delay
            self._store.outbox_delivered(self.exporter, [item.seq], self._clock.now_ns())
            self._count(True)
        if now_ns - self._last_purge_ns > 3600 * NS:
            self._store.outbox_purge(now_ns - DELIVERED_RETENTION_NS)
            self._last_purge_ns = now_ns
        return 0.0 if len(items) == self._batch else self._poll_s

    def close(self) -> None:
        self._sink.close()

    def _count(self, ok: bool) -> None:
        if self._on_delivery is not None:
            self._on_delivery(self.exporter, ok)
