"""The events the gateway forwards (meters' thresholds and resets, finalized invoices).

Every event is one JSON envelope ``{"id", "type", "createdAt", "data"}``; ``id`` is stable (the
same threshold of the same period always has the same id), so receivers deduplicate on it. An
``EventRoute`` (``exporters.outbox.Router``) turns an event into one outbox row per exporter
that subscribes to its type; the caller writes those rows in its own transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol

import orjson

from meter_gateway.pipeline.timestamps import format_timestamp
from meter_gateway.store.base import OutboxEvent

EventType = Literal["threshold_reached", "meter_reset", "invoice_finalized"]
EVENT_TYPES: tuple[EventType, ...] = ("threshold_reached", "meter_reset", "invoice_finalized")


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
