"""The webhook exporter: each event is one JSON POST, signed with HMAC-SHA256.

Headers: ``X-Meter-Gateway-Event-Id`` (stable: deduplicate on it, delivery is at-least-once),
``X-Meter-Gateway-Event-Type``, ``X-Meter-Gateway-Timestamp`` (Unix seconds) and
``X-Meter-Gateway-Signature: v1=<hex>``, the HMAC-SHA256 under the shared secret of
``<timestamp>.<body>`` (the timestamp's decimal digits, a dot, the exact body bytes). A receiver
checks it with ``verify_signature`` and rejects stale timestamps (replays). Any 2xx is success;
anything else, or no answer within the timeout, is retried with backoff (``exporters.outbox``).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

import httpx

from exporters.outbox import DeliveryError
from meter_gateway import __version__
from meter_gateway.clock import Clock
from meter_gateway.store.base import OutboxItem

NS = 1_000_000_000
EVENT_ID_HEADER = "X-Meter-Gateway-Event-Id"
EVENT_TYPE_HEADER = "X-Meter-Gateway-Event-Type"
TIMESTAMP_HEADER = "X-Meter-Gateway-Timestamp"
SIGNATURE_HEADER = "X-Meter-Gateway-Signature"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header value for a body sent at ``timestamp`` (Unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"v1={mac.hexdigest()}"


def verify_signature(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    now_s: int,
    tolerance_s: int = 300,
) -> bool:
    """For receivers: the signature matches and the timestamp is within ``tolerance_s``."""
    lower = {k.lower(): v for k, v in headers.items()}
    raw_ts = lower.get(TIMESTAMP_HEADER.lower(), "")
    if not raw_ts.isdigit() or abs(now_s - int(raw_ts)) > tolerance_s:
        return False
    expected = sign(secret, int(raw_ts), body)
    return hmac.compare_digest(expected, lower.get(SIGNATURE_HEADER.lower(), ""))


class WebhookSink:
    """POSTs an outbox event's exact payload to one URL."""

    def __init__(
        self,
        name: str,
        url: str,
        secret: str,
        clock: Clock,
        timeout_s: float = 10.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.name = name
        self.url = url
        self._secret = secret
        self._clock = clock
        self._headers = {
            "Content-Type": "application/json",
            "User-Agent": f"meter-gateway/{__version__}",
            **(headers or {}),
        }
        self._client = httpx.Client(timeout=timeout_s, transport=transport)

    def deliver(self, item: OutboxItem) -> None:
        ts = self._clock.now_ns() // NS
        headers = {
            **self._headers,
            EVENT_ID_HEADER: item.event_id,
            EVENT_TYPE_HEADER: item.type,
            TIMESTAMP_HEADER: str(ts),
            SIGNATURE_HEADER: sign(self._secret, ts, item.payload),
        }
        try:
            r = self._client.post(self.url, content=item.payload, headers=headers)
        except httpx.HTTPError as exc:
            raise DeliveryError(f"POST {self.url}: {type(exc).__name__}: {exc}") from exc
        if not 200 <= r.status_code < 300:
            raise DeliveryError(f"POST {self.url}: HTTP {r.status_code}: {r.text[:200]}")

    def close(self) -> None:
        self._client.close()
