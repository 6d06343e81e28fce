"""Several replicas on one PostgreSQL database stay exact together (SPEC §8).

* three real ``meter-gateway serve`` processes take the same batches from several clients at
  once, with retries and duplicates, one of them is SIGKILLed mid-way: every id counts once and
  the totals are exact, and every live replica reports the same period gauges;
* scheduled work under store leases, in three real processes, one SIGKILLed: every window ran
  exactly once (fenced commits; the others take over when the dead one's lease expires);
* cumulative OTLP series whose points land on different replicas: each step counts once;
* a customer created through one replica's API is billed through another, no restart.

These run against PostgreSQL whatever METER_TEST_STORE says: replicas need it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml

from tests import pgdb
from tests.gatewayproc import BASE_CONFIG, INGEST_KEY, GatewayProcess
from tests.helpers import eventually, now_iso, total

NS = 1_000_000_000
WINDOW_S = 0.4  # the test job's window
LEASE_TTL_S = 1.5


@pytest.fixture
def url() -> Iterator[str]:
    u = pgdb.create_database()
    yield u
    pgdb.drop_database(u)


# --- ingest through three replicas -----------------------------------------------------------


def _batches(n_batches: int, per_batch: int) -> list[list[dict[str, Any]]]:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
    run = uuid.uuid4().hex[:8]
    return [
        [
            {
                "id": f"{run}-{b}-{i}",
                "timestamp": stamp,
                "customerId": ("acme", "dumm-ai")[i % 2],
                "dimensionId": "data-processed",
                "recordValue": "0.1",
            }
            for i in range(per_batch)
        ]
        for b in range(n_batches)
    ]


def _send_until_accepted(urls: list[str], body: list[dict[str, Any]], rng: random.Random) -> None:
    """Like a load-balanced sender: try replicas until one answers 2xx (a retry after a dead
    replica or a 429 resends the whole batch; dedup makes that safe)."""
    for _ in range(200):
        target = rng.choice(urls)
        try:
            r = httpx.post(
                f"{target}/v1/usage",
                json=body,
                headers={"Authorization": f"Bearer {INGEST_KEY}"},
                timeout=30,
            )
        except httpx.TransportError:
            continue
        if r.status_code == 200:
            return
        assert r.status_code in (429, 503), r.text
        time.sleep(0.05)
    raise AssertionError("no replica accepted the batch")


def test_three_replicas_count_every_id_once_while_one_is_killed(url: str, tmp_path: Path) -> None:
    config = {**BASE_CONFIG, "store": {"url": url}}
    replicas = []
    for i in range(3):
        (tmp_path / f"r{i}").mkdir()
        replicas.append(GatewayProcess(tmp_path / f"r{i}", config))
    try:
        for r in replicas:
            r.start()
        urls = [r.url for r in replicas]
        batches = _batches(n_batches=40, per_batch=100)  # 4,000 distinct ids
        sent = threading.Event()
        progress = {"n": 0}
        lock = threading.Lock()

        def client(k: int) -> None:
            rng = random.Random(k)
            # every client sends every batch once, in its own order, and a third of them twice
            order = list(range(len(batches)))
            rng.shuffle(order)
            order += rng.sample(order, len(order) // 3)
            for b in order:
                _send_until_accepted(urls, batches[b], rng)
                with lock:
                    progress["n"] += 1
                    if progress["n"] >= 40:
                        sent.set()

        clients = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(4)]
        for t in clients:
            t.start()
        assert sent.wait(120)
        replicas[1].kill()  # SIGKILL mid-way: no drain
        for t in clients:
            t.join()

        live = [replicas[0], replicas[2]]
        n_ids = sum(len(b) for b in batches)
        for r in live:
            with r.client() as c:
                assert total(c, "acme") + total(c, "dumm-ai") == Decimal("0.1") * n_ids
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT count(*), count(DISTINCT record_id), sum(value) FROM records"
            ).fetchone()
        assert row == (n_ids, n_ids, Decimal("0.1") * n_ids)
        # per-customer period gauges come to the same values on every replica (so dashboards use
        # max by); a replica refreshes them at once after its own commits, after others' within
        # billing.period_gauges_interval (15 s)
        want = {(c, "data-processed"): Decimal("0.1") * n_ids / 2 for c in ("acme", "dumm-ai")}
        for r in live:
            eventually(lambda r=r: _period_usage(r) == want, f"{r.url}'s period gauges at {want}")
        for r in live:
            assert r.stop() == 0
    finally:  # a failed assertion must not leave replicas running (and writing)
        for r in replicas:
            if r.proc is not None and r.proc.poll() is None:
                r.kill()


def _period_usage(gw: GatewayProcess) -> dict[tuple[str, str], Decimal]:
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith("meter_gateway_period_usage{"):
            labels, value = line[len("meter_gateway_period_usage{") :].rsplit("} ", 1)
            kv = dict(p.split("=", 1) for p in labels.split(","))
            out[(kv["customer"].strip('"'), kv["dimension"].strip('"'))] = Decimal(value)
    return out


# --- scheduled work under leases, in three processes ------------------------------------------


def test_scheduled_work_runs_once_per_window_across_replicas_and_fails_over(
    url: str, tmp_path: Path
) -> None:
    from meter_gateway.store.postgres import migrate

    migrate(url)
    procs = [_start_window_job(url, f"replica-{i}", tmp_path / f"job{i}.log") for i in range(3)]
    try:
        first_holder = eventually(lambda: _holder(url), "a replica holds the lease", 30)
        eventually(lambda: _windows_done(url) >= 5, "5 windows done", 30)
        victim = next(p for i, p in enumerate(procs) if f"replica-{i}" == first_holder)
        victim.send_signal(signal.SIGKILL)  # the lease holder dies mid-way
        victim.wait()
        done_at_kill = _windows_done(url)
        eventually(
            lambda: _holder(url) not in (None, first_holder), "another replica takes the lease", 30
        )
        eventually(
            lambda: _windows_done(url) >= done_at_kill + 5, "5 more windows after the kill", 30
        )
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
    with psycopg.connect(url) as conn:
        runs = conn.execute(
            "SELECT convert_from(payload, 'UTF8')::bigint AS w, count(*) FROM outbox "
            "WHERE exporter = 'window-job' GROUP BY w ORDER BY w"
        ).fetchall()
        holders = conn.execute(
            "SELECT count(DISTINCT type) FROM outbox WHERE exporter = 'window-job'"
        ).fetchone()
    windows = [w for w, _ in runs]
    assert windows == list(range(windows[0], windows[0] + len(windows)))  # none skipped
    assert all(n == 1 for _, n in runs), runs  # none ran twice
    assert holders is not None
    assert holders[0] >= 2


def _start_window_job(url: str, holder: str, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, __file__, "window-job", url, holder],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        )


def _holder(url: str) -> str | None:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT holder FROM leases WHERE name = 'window-job'").fetchone()
    return None if row is None else str(row[0])


def _windows_done(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM outbox WHERE exporter = 'window-job'").fetchone()
    return int(row[0]) if row else 0


class WindowJob:
    """Closes fixed windows in order: each closed window is one outbox event (with a fresh
    event id, so a window that ran twice would show twice), committed with the job's
    watermark, fenced by the job's lease."""

    name = "window-job"

    def __init__(self, store: Any, holder: str) -> None:
        self.store = store
        self.holder = holder

    def run(self, now_ns: int) -> float:
        from meter_gateway.store.base import OutboxEvent

        window_ns = int(WINDOW_S * NS)
        current = now_ns // window_ns
        state = self.store.job_state("window-job/").get("window-job/done")
        if state is None:  # the first run ever starts the count at the current window
            fence = (self.name, self.holder)
            self.store.job_commit({"window-job/done": {"window": current - 1}}, [], fence, now_ns)
            return WINDOW_S
        done = int(state["window"])
        for w in range(done + 1, current):
            event = OutboxEvent(self.name, uuid.uuid4().hex, self.holder, str(w).encode(), now_ns)
            self.store.job_commit(
                {"window-job/done": {"window": w}}, [event], (self.name, self.holder), now_ns
            )
        return (current + 1) * window_ns / NS - now_ns / NS


def _window_job_main(url: str, holder: str) -> None:
    from meter_gateway.clock import SystemClock
    from meter_gateway.scheduler import Scheduler
    from meter_gateway.store.postgres import PostgresStore

    store = PostgresStore(url, 86400, time.time_ns(), pool_max=2)
    scheduler = Scheduler(store, SystemClock(), holder=holder, lease_ttl_s=LEASE_TTL_S)
    scheduler.add(WindowJob(store, holder))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    scheduler.start()
    stop.wait()
    scheduler.close()
    store.close()


# --- cumulative OTLP series across replicas ---------------------------------------------------


def test_cumulative_points_of_one_series_on_different_replicas_count_each_step_once(
    url: str,
) -> None:
    from meter_gateway.clock import FixedClock
    from meter_gateway.config import parse_config
    from meter_gateway.service import Gateway
    from tests.exporters.otlp_app import gateway_config
    from tests.receivers.test_otlp import NOW, T0, point, request, sum_metric

    config = parse_config(yaml.safe_dump(gateway_config(store={"url": url})))
    a = Gateway(config, clock=FixedClock(NOW))
    b = Gateway(config, clock=FixedClock(NOW))
    try:
        minute = 60 * NS
        # one series (true start T0): 10 → 15 → 22 → 30, its points alternating replicas;
        # each replica's cache goes stale as soon as the other commits a point
        for i, (gw, value) in enumerate([(a, 10), (b, 15), (a, 22), (b, 30), (a, 31)]):
            outcome = gw.otlp.export(
                request(
                    sum_metric(
                        [point(value, T0 + (i + 1) * minute, T0, tenant="acme")], temporality=2
                    )
                )
            )
            assert outcome.rejected == 0
        values = [r.value for r in a.store.records("acme", None, 0, 2**62, None, 100)]
        assert sum(values) == Decimal(31)
        assert values == [Decimal(v) for v in (10, 5, 7, 8, 1)]
    finally:
        a.close()
        b.close()


# --- catalog changes across replicas ----------------------------------------------------------


def test_a_customer_created_on_one_replica_is_accepted_by_another(url: str, tmp_path: Path) -> None:
    config = {**BASE_CONFIG, "store": {"url": url}}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    a, b = GatewayProcess(tmp_path / "a", config), GatewayProcess(tmp_path / "b", config)
    try:
        a.start()
        b.start()  # both have loaded the catalog: neither knows the customer yet
        cid = f"new-{uuid.uuid4().hex[:8]}"
        with a.client() as ca:
            r = ca.post(
                "/v1/customers",
                json={"id": cid, "name": cid, "offering": "pay-as-you-go", "aliases": [f"{cid}-x"]},
            )
            assert r.status_code == 201, r.text
        record = {
            "id": f"{cid}-1",  # one id: a retry after a rejection can only count once
            "timestamp": now_iso(),
            "customerId": f"{cid}-x",
            "dimensionId": "data-processed",
            "recordValue": "2.5",
        }

        def accepted_by_b() -> bool:
            r = httpx.post(
                f"{b.url}/v1/usage",
                json=[record],
                headers={"Authorization": f"Bearer {INGEST_KEY}"},
                timeout=30,
            )
            assert r.status_code == 200, r.text
            body = r.json()
            if body["rejected"]:
                assert body["errors"][0]["reason"] == "unknown_customer", body
            return bool(body["accepted"] or body["duplicates"])

        eventually(accepted_by_b, "b accepts usage of the customer a created", 15)
        for gw in (a, b):
            with gw.client() as c:
                assert total(c, cid) == Decimal("2.5")
                assert c.get(f"/v1/customers/{cid}").json()["aliases"] == [f"{cid}-x"]
        # and a deletion through b reaches a (its next check, within about a second)
        with b.client() as cb:
            assert cb.delete(f"/v1/customers/{cid}").status_code == 204
        with a.client() as ca:
            eventually(
                lambda: ca.get(f"/v1/customers/{cid}").status_code == 404,
                "a sees the deletion made through b",
                15,
            )
    finally:
        codes = [gw.stop() for gw in (a, b) if gw.proc is not None]
    assert codes == [0, 0]


if __name__ == "__main__" and sys.argv[1:2] == ["window-job"]:
    _window_job_main(sys.argv[2], sys.argv[3])
