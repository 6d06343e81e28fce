"""SPEC §4 Overload and §7 against a running gateway (in-process, served over real HTTP by
uvicorn, on the store of METER_TEST_STORE) whose commits a test can hold: once the ingest
memory budget is spent, requests answer 429 with Retry-After at once, before their bodies are
read; what was accepted is durable and what was refused is not stored; a body larger than the
whole budget is 413; ``/healthz`` answers meanwhile. ``/metrics`` reads the period gauges a
background refresh computed, never rating customers itself.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
import yaml
from prometheus_client.parser import text_string_to_metric_families

from meter_gateway.api.app import create_app
from meter_gateway.config import ConfigError, parse_config
from meter_gateway.model import Batch, CommitResult
from meter_gateway.pipeline.admission import EXPANSION
from meter_gateway.service import Gateway
from meter_gateway.store import Store, open_store
from meter_gateway.telemetry import PeriodUsage, PeriodUsageCollector
from tests.gatewayproc import ADMIN_KEY, BASE_CONFIG, free_port
from tests.helpers import eventually
from tests.pgdb import store_url

RECORDS_PER_BODY = 20


class GatedStore:
    """The real store, whose group commits wait while ``hold`` is clear (one transaction per
    group: the two-stage prepare/apply path is hidden)."""

    prepare = None
    apply = None

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()

    def commit(self, batches: Sequence[Batch], now_ns: int) -> list[CommitResult]:
        self.entered.set()
        assert self.open.wait(60), "the test never let the commit go"
        return self.inner.commit(batches, now_ns)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@contextmanager
def serve(tmp_path: Path, ingest: dict[str, Any]) -> Iterator[tuple[Gateway, GatedStore, str]]:
    config = parse_config(
        yaml.safe_dump({**BASE_CONFIG, "store": {"url": store_url(tmp_path)}, "ingest": ingest})
    )
    store = GatedStore(open_store(config.store.url, 35 * 86400, time.time_ns()))
    gw = Gateway(config, store=store)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(gw), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:  # uvicorn offers no event for this
        time.sleep(0.01)
    try:
        yield gw, store, f"http://127.0.0.1:{port}"
    finally:
        store.open.set()
        server.should_exit = True
        thread.join()
        gw.close()


def body(tag: str, n: int = RECORDS_PER_BODY) -> bytes:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
    return b"".join(
        orjson.dumps(
            {
                "id": f"{tag}-{i}",
                "timestamp": now,
                "customerId": "acme",
                "dimensionId": "data-processed",
                "recordValue": "0.5",
            }
        )
        + b"\n"
        for i in range(n)
    )


def post(url: str, content: Any) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/usage",
        content=content,
        headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/x-ndjson"},
        timeout=60,
    )


def stored_ids(store: GatedStore) -> set[str]:
    rows = store.inner.records("acme", None, 0, 2 * time.time_ns(), None, 100_000)
    return {r.record_id for r in rows if r.record_id is not None}


def wait_for(what: str, predicate: Any, timeout: float = 30) -> None:
    eventually(predicate, what, timeout)


@dataclass
class Sent:
    tag: str
    response: httpx.Response | None = None


def send_in_background(url: str, tag: str) -> tuple[Sent, threading.Thread]:
    sent = Sent(tag)

    def run() -> None:
        sent.response = post(url, body(tag))

    t = threading.Thread(target=run)
    t.start()
    return sent, t


def test_a_spent_budget_answers_429_at_once_and_stores_nothing_of_it(tmp_path: Path) -> None:
    size = len(body("a-0"))
    # room for two requests' estimates, not three
    budget = 2 * size * EXPANSION + size
    with serve(tmp_path, {"max_inflight_bytes": budget, "max_queue_delay": "0s"}) as (
        gw,
        store,
        url,
    ):
        store.open.clear()
        first, t1 = send_in_background(url, "first")
        assert store.entered.wait(30)  # its commit is held
        second, t2 = send_in_background(url, "second")
        wait_for("the second batch to queue", lambda: gw.ingestor.queued_records == 40)

        refused = post(url, body("refused"))
        assert refused.status_code == 429, refused.text
        assert refused.headers["Retry-After"] == "1"
        assert "memory budget" in refused.json()["error"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: reserved as it arrives
            yield body("chunked")

        chunked = post(url, chunks())
        assert chunked.status_code == 429, chunked.text
        # a body larger than the whole budget could never be admitted: 413, not 429
        huge = post(url, body("huge", 20 * RECORDS_PER_BODY))
        assert huge.status_code == 413, huge.text
        assert "ingest.max_inflight_bytes" in huge.json()["error"]
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200

        store.open.set()
        t1.join()
        t2.join()
        for sent in (first, second):
            assert sent.response is not None
            assert sent.response.status_code == 200, sent.response.text
            assert sent.response.json()["accepted"] == RECORDS_PER_BODY
        spent = gw.ingestor.budget
        assert spent is not None
        wait_for("the budget to be given back", lambda: spent.in_use == 0)
        after = post(url, body("after"))
        assert after.status_code == 200, after.text

        ids = stored_ids(store)
        for tag in ("first", "second", "after"):
            assert {f"{tag}-{i}" for i in range(RECORDS_PER_BODY)} <= ids, tag
        assert not {i for i in ids if i.split("-")[0] in ("refused", "chunked", "huge")}
        text = httpx.get(f"{url}/metrics", timeout=10).text
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }
        assert samples["meter_gateway_requests_total", (("code", "429"), ("receiver", "rest"))] == 2
        assert samples["meter_gateway_overloaded_total", (("receiver", "rest"),)] == 2
        assert samples["meter_gateway_inflight_bytes", ()] == 0


def test_concurrent_senders_get_200_or_429_and_only_the_accepted_are_stored(
    tmp_path: Path,
) -> None:
    size = len(body("x-0"))
    budget = 3 * size * EXPANSION
    with serve(tmp_path, {"max_inflight_bytes": budget}) as (_gw, store, url):
        store.open.clear()  # hold the first commit until some sender was refused
        results: dict[str, int] = {}
        lock = threading.Lock()
        refused = threading.Event()

        def sender(k: int) -> None:
            for j in range(4):
                tag = f"s{k}x{j}"
                r = post(url, body(tag))
                with lock:
                    results[tag] = r.status_code
                if r.status_code == 429:
                    assert r.headers["Retry-After"] == "1"
                    refused.set()
                else:
                    assert r.status_code == 200, r.text
                    assert r.json()["accepted"] == RECORDS_PER_BODY

        threads = [threading.Thread(target=sender, args=(k,)) for k in range(12)]
        for t in threads:
            t.start()
        assert refused.wait(60)
        store.open.set()
        for t in threads:
            t.join()
        accepted = {tag for tag, code in results.items() if code == 200}
        assert accepted
        assert len(results) == 48
        expected = {f"{tag}-{i}" for tag in accepted for i in range(RECORDS_PER_BODY)}
        assert stored_ids(store) == expected  # accepted means durable; 429 stores nothing


# --- /metrics reads what the background refresh computed -----------------------------------


def test_a_scrape_never_rates_customers_itself() -> None:
    calls: list[int] = []
    rows = [PeriodUsage("acme", "data-processed", "USD", "2.5", "2.5", "0.2", "0.05", "0.15")]

    def compute() -> list[PeriodUsage]:
        calls.append(1)
        return rows

    collector = PeriodUsageCollector(compute)
    names = {f.name for f in collector.collect()}
    assert "meter_gateway_period_usage" in names
    assert all(not f.samples for f in collector.collect())  # nothing computed yet
    assert calls == []
    collector.refresh()
    for _ in range(3):
        samples = {s.name: s.value for f in collector.collect() for s in f.samples}
    assert calls == [1]
    assert samples["meter_gateway_period_usage"] == 2.5
    assert samples["meter_gateway_period_margin"] == 0.15
    assert samples["meter_gateway_period_computed_timestamp_seconds"] > 0


def test_the_background_refresh_takes_a_twentieth_of_a_thread_even_past_its_interval() -> None:
    """Rating every customer of a large store takes longer than a twentieth of the interval:
    the refresh then waits 19 durations, not the interval, however often commits wake it (it
    holds the GIL that ingest needs)."""
    spans: list[tuple[float, float]] = []

    def compute() -> list[PeriodUsage]:
        t0 = time.monotonic()
        time.sleep(0.05)  # a refresh of 0.05 s against an interval of 0.2 s
        spans.append((t0, time.monotonic()))
        return []

    collector = PeriodUsageCollector(compute, interval_s=0.2, min_gap_s=0.01)
    collector.start()
    try:
        until = time.monotonic() + 3.0
        while time.monotonic() < until:
            collector.wake()  # commits all the time
            time.sleep(0.01)
    finally:
        collector.close()
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(spans)]
    assert len(spans) >= 2
    # 19 times the last duration (>= 0.95 s), where the interval alone would give 0.2 s
    assert min(gaps) >= 0.9, gaps
    assert len(spans) <= 4


def test_the_refresh_waits_for_commits_to_settle_or_the_interval() -> None:
    """While commits keep coming the gauges are refreshed every interval, not after each
    commit (every refresh rates every customer, in the database too); once commits stop, a
    refresh follows ``settle_s`` after the last one."""
    ends: list[float] = []
    collector = PeriodUsageCollector(
        lambda: ends.append(time.monotonic()) or [], interval_s=1.0, min_gap_s=0.01, settle_s=0.2
    )
    collector.start()
    try:
        time.sleep(0.1)  # the first refresh, at start
        busy_from = time.monotonic()
        until = busy_from + 3.0
        while time.monotonic() < until:
            collector.wake()  # a commit every 10 ms
            time.sleep(0.01)
        last_wake = time.monotonic()
        time.sleep(0.7)
    finally:
        collector.close()
    busy = [t for t in ends if busy_from < t <= last_wake]
    # every interval (3 or 4 in 3 s, where a refresh after every commit would give hundreds)
    assert 2 <= len(busy) <= 4, busy
    assert min(b - a for a, b in itertools.pairwise(busy)) >= 0.9, busy
    settled = [t for t in ends if t > last_wake]
    assert len(settled) == 1, (settled, last_wake)
    assert 0.15 <= settled[0] - last_wake <= 0.6, settled[0] - last_wake


def test_metrics_show_the_period_gauges_of_the_last_refresh(tmp_path: Path) -> None:
    with serve(tmp_path, {}) as (gw, _store, url):
        r = post(url, body("p", 5))
        assert r.json()["accepted"] == 5, r.text
        gw.period_gauges.refresh()
        text = httpx.get(f"{url}/metrics", timeout=10).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): Decimal(str(s.value))
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    pair = (("customer", "acme"), ("dimension", "data-processed"))
    money = tuple(sorted((*pair, ("currency", "USD"))))
    assert samples["meter_gateway_period_usage", pair] == Decimal("2.5")
    assert samples["meter_gateway_period_billable_quantity", pair] == Decimal("2.5")
    assert samples["meter_gateway_period_revenue", money] == Decimal("0.2")  # 2.5 x $0.08
    assert samples["meter_gateway_period_cost", money] == Decimal("0.05")  # 2.5 x $0.02
    assert samples["meter_gateway_period_margin", money] == Decimal("0.15")


@pytest.mark.parametrize("interval", ["0s", "-1s"])
def test_the_refresh_interval_must_be_positive(interval: str) -> None:
    with pytest.raises(ConfigError, match="period_gauges_interval"):
        parse_config(yaml.safe_dump({"billing": {"period_gauges_interval": interval}}))
