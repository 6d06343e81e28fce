"""The events the gateway forwards (meters' thresholds and resets, finalized and void invoices).

Every event is one JSON envelope ``{"id", "type", "createdAt", "data"}``; ``id`` is stable (the
same threshold of the same period always has the same id), so receivers deduplicate on it. An
``EventRoute`` (``exporters.outbox.Router``) turns an event into one outbox row per exporter
that subscribes to its type; the caller writes those rows in its own transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal, Protocol

import orjson

from meter_gateway.pipeline.timestamps import format_timestamp
from meter_gateway.store.base import OutboxEvent

EventType = Literal["threshold_reached", "meter_reset", "invoice.finalized", "invoice.voided"]
EVENT_TYPES: tuple[EventType, ...] = (
    "threshold_reached",
    "meter_reset",
    "invoice.finalized",
    "invoice.voided",
)
#: Names an exporter's ``events`` may still use, and the type each stands for: finalized
#: invoices went out as ``invoice_finalized`` before SPEC 11 named them ``invoice.finalized``.
LEGACY_NAMES: Mapping[str, EventType] = {"invoice_finalized": "invoice.finalized"}


def subscription(names: Iterable[str]) -> frozenset[str] | None:
    """The event types an exporter's ``events`` list subscribes to (None: every type), with
    legacy names read as the types they stand for."""
    types = frozenset(LEGACY_NAMES.get(n, n) for n in names)
    return types or None


class EventRoute(Protocol):
    def __call__(
        self, type: EventType, event_id: str, data: Mapping[str, Any], created_ns: int
    ) -> list[OutboxEvent]:
        """Outbox rows for every exporter subscribed to ``type`` (none: an empty list)."""
        ...


def envelope(type: EventType, event_id: str, data: Mapping[str, Any], created_ns: int) -> bytes:
    """The exact bytes delivered for an event (sorted keys: the same event, the same bytes)."""
    body = {"id": event_id, "type": type, "createdAt": format_timestamp(created_ns), "data": data}
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
