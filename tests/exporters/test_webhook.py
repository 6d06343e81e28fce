"""The webhook exporter: signed JSON POSTs from a durable outbox, retried with backoff, every
meter event delivered exactly once to a real receiver that was down for a while, across
gateway restarts."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporters.outbox import DeliveryJob
from exporters.webhook import SIGNATURE_HEADER, WebhookSink, sign, verify_signature
from meter_gateway.clock import TEST_CLOCK_OFFSET_FILE_ENV, FixedClock
from meter_gateway.store.base import OutboxEvent
from tests.exporters.receiver import WebhookReceiver
from tests.gatewayproc import BASE_CONFIG, INGEST_KEY, GatewayProcess
from tests.helpers import eventually, open_store

NS = 1_000_000_000
SECRET = "whsec-test-0123456789abcdef"
T0 = int(datetime(2031, 3, 10, 12, 0, tzinfo=UTC).timestamp()) * NS
DAY = 86400 * NS
DELIVERIES = "meter_gateway_exporter_deliveries_total"


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver()
    yield r
    r.stop()


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    body = b'{"id":"e1"}'
    # printf '1700000000.{"id":"e1"}' | openssl dgst -sha256 -hmac "$SECRET"
    expected = "v1=f867771a9b5f6739ee24c940f756c0a2e21dfe0108d8655d46d997e500f4d8d0"
    assert sign(SECRET, 1_700_000_000, body) == expected
    headers = {"x-meter-gateway-timestamp": "1700000000", SIGNATURE_HEADER: expected}
    assert verify_signature(SECRET, headers, body, now_s=1_700_000_100)
    assert not verify_signature(SECRET, headers, body + b" ", now_s=1_700_000_100)
    assert not verify_signature("another-secret-0123456", headers, body, now_s=1_700_000_100)
    assert not verify_signature(SECRET, headers, body, now_s=1_700_000_000 + 301)  # stale


def test_delivery_retries_with_backoff_until_the_receiver_answers_2xx(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    store = open_store(tmp_path)
    clock = FixedClock(T0)
    receiver.status = 503
    receiver.start()
    outcomes: list[bool] = []
    sink = WebhookSink("hook", receiver.url, SECRET, clock)
    job = DeliveryJob(store, sink, clock, 1.0, 8.0, None, lambda _, ok: outcomes.append(ok))
    payload = b'{"id":"e1","type":"meter_reset"}'
    store.job_commit({}, [OutboxEvent("hook", "e1", "meter_reset", payload, T0)], None, T0)

    delays = [job.run(clock.now_ns())]
    for _ in range(4):  # each retry waits for its backoff: 1, 2, 4, 8 (capped) seconds
        assert job.run(clock.now_ns()) == 5.0  # nothing due yet: just the poll interval
        clock.advance(delays[-1])
        delays.append(job.run(clock.now_ns()))
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert outcomes == [False] * 5
    (item,) = store.outbox_claim("hook", clock.now_ns() + 8 * NS, 10)
    assert item.attempts == 5
    assert "HTTP 503" in (item.last_error or "")

    receiver.status = 200
    clock.advance(8)
    job.run(clock.now_ns())
    assert outcomes[-1] is True
    assert store.outbox_claim("hook", clock.now_ns() + DAY, 10) == []
    (got,) = receiver.received
    assert got.body == payload
    assert got.headers["X-Meter-Gateway-Event-Id"] == "e1"
    assert verify_signature(SECRET, got.headers, got.body, clock.now_ns() // NS)
    job.close()
    store.close()


def test_max_attempts_gives_an_event_up_and_keeps_it(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    clock = FixedClock(T0)
    # nothing listens on this port: connection refused
    sink = WebhookSink("hook", receiver_url_nobody_listens(), SECRET, clock)
    job = DeliveryJob(store, sink, clock, 0.5, 1.0, max_attempts=2)
    store.job_commit({}, [OutboxEvent("hook", "e1", "meter_reset", b"{}", T0)], None, T0)
    job.run(clock.now_ns())
    clock.advance(1)
    job.run(clock.now_ns())
    (stats,) = store.outbox_stats()
    assert (stats.pending, stats.dead) == (0, 1)
    job.close()
    store.close()


def receiver_url_nobody_listens() -> str:
    return WebhookReceiver().url


# --- end to end: a real gateway process, a real receiver that is down for a while ----------


def set_offset(path: Path, gateway_now_ns: int) -> None:
    """Make the gateway's clock read ``gateway_now_ns`` now (atomically replaced file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(gateway_now_ns - time.time_ns()))
    os.replace(tmp, path)


def metric(gw: GatewayProcess, name: str, **labels: str) -> float | None:
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def ingest(gw: GatewayProcess, offset_file: Path, value: str, rid: str) -> None:
    now_ns = time.time_ns() + int(offset_file.read_text())
    ts = datetime.fromtimestamp((now_ns - NS) / NS, tz=UTC).isoformat().replace("+00:00", "Z")
    record = {
        "id": rid,
        "timestamp": ts,
        "customerId": "dumm-ai",
        "dimensionId": "data-processed",
        "recordValue": value,
    }
    with gw.client(INGEST_KEY) as c:
        r = c.post("/v1/usage", json=record)
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == 1


def test_every_meter_event_arrives_exactly_once_after_the_receiver_comes_back(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    offset_file = tmp_path / "clock-offset"
    set_offset(offset_file, T0)
    config = {
        **BASE_CONFIG,
        "meters": [
            {
                "id": "dumm-data",
                "customer": "dumm-ai",
                "dimension": "data-processed",
                "reset": "daily",
                "capacity": "10",
                "thresholds": [{"percent": "50"}, {"value": "8"}, {"percent": "100"}],
            }
        ],
        "exporters": {
            "webhooks": [
                {
                    "name": "hook",
                    "url": receiver.url,
                    "secret": SECRET,
                    "timeout": "2s",
                    "backoff_initial": "50ms",
                    "backoff_max": "200ms",
                }
            ]
        },
    }
    gw = GatewayProcess(tmp_path, config, env={TEST_CLOCK_OFFSET_FILE_ENV: str(offset_file)})

    def pending() -> float | None:
        return metric(gw, "meter_gateway_exporter_outbox_events", exporter="hook")

    gw.start()
    try:
        # Day 1, receiver down: 6 of 10 reaches 50 %; the gateway keeps trying.
        ingest(gw, offset_file, "6", "r1")
        eventually(lambda: pending() == 1, "the 50 % threshold queued")
        eventually(
            lambda: (
                (
                    metric(
                        gw,
                        "meter_gateway_exporter_deliveries_total",
                        exporter="hook",
                        outcome="error",
                    )
                    or 0
                )
                > 0
            ),
            "a failed delivery",
        )
        gw.stop()
        gw.start()  # restarted with the event still pending
        ingest(gw, offset_file, "3", "r2")  # 9: reaches 8, not 100 %
        eventually(lambda: pending() == 2, "the value-8 threshold queued")
        # Midnight passes: the reset forwards day 1's total.
        set_offset(offset_file, T0 + DAY)
        eventually(lambda: pending() == 3, "the reset queued")
        ingest(gw, offset_file, "11", "r3")  # day 2: all three at once
        eventually(lambda: pending() == 6, "day 2's thresholds queued")
        gw.stop()
        gw.start()
        assert receiver.received == []
        receiver.start()
        eventually(lambda: pending() == 0, "the outbox drained")
    finally:
        code = gw.stop()
    assert code == 0

    ids = Counter(r.headers["X-Meter-Gateway-Event-Id"] for r in receiver.received)
    assert ids == {
        "dumm-data/2031-03-10T00:00:00Z/threshold/percent:50": 1,
        "dumm-data/2031-03-10T00:00:00Z/threshold/value:8": 1,
        "dumm-data/2031-03-10T00:00:00Z/reset": 1,
        "dumm-data/2031-03-11T00:00:00Z/threshold/percent:50": 1,
        "dumm-data/2031-03-11T00:00:00Z/threshold/value:8": 1,
        "dumm-data/2031-03-11T00:00:00Z/threshold/percent:100": 1,
    }
    events = {}
    for r in receiver.received:
        assert verify_signature(
            SECRET, r.headers, r.body, int(r.headers["X-Meter-Gateway-Timestamp"])
        )
        body = orjson.loads(r.body)
        assert body["id"] == r.headers["X-Meter-Gateway-Event-Id"]
        events[body["id"]] = body
    reset = events["dumm-data/2031-03-10T00:00:00Z/reset"]
    assert reset["type"] == "meter_reset"
    assert reset["data"]["total"] == "9"  # the golden record of day 1
    assert reset["data"]["periodEnd"] == "2031-03-11T00:00:00Z"
    day2 = events["dumm-data/2031-03-11T00:00:00Z/threshold/percent:100"]
    assert (day2["type"], day2["data"]["value"], day2["data"]["threshold"]["limit"]) == (
        "threshold_reached",
        "11",
        "10",
    )
