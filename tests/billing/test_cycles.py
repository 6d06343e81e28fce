"""Billing cycles that invoice themselves (SPEC 11).

* the cycle arithmetic as pure functions (anchor day, time zone, DST, yearly cycles, the
  customer's start and end);
* the cycle job in-process with an injected clock, on the store of METER_TEST_STORE: closed
  cycles are invoiced in order once finalize_after has passed, exactly once, a void cycle is
  invoiced again, a cycle invoiced by hand is left alone, meters' billing_period follows it;
* real gateway processes: killed with SIGKILL in the middle of closing 72 overdue cycles and
  restarted (each cycle invoiced once, numbers 1..72 without a gap), and two replicas on one
  PostgreSQL database closing cycles while invoices are finalized through both.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import orjson
import pytest

from meter_gateway.billing import cycles
from meter_gateway.clock import FixedClock
from meter_gateway.config import Customer
from meter_gateway.pipeline.timestamps import format_timestamp
from meter_gateway.service import Gateway
from meter_gateway.store import open_store
from tests import pgdb
from tests.billing.appserver import serve
from tests.gatewayproc import ADMIN_KEY, BASE_CONFIG, GatewayProcess
from tests.helpers import ts

UTC_ZONE = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")


def customer(**fields: Any) -> Customer:
    return Customer.model_validate({"id": "c", "name": "C", **fields})


def iso(ns: int) -> str:
    return format_timestamp(ns)


# --- the arithmetic ------------------------------------------------------------------------------


def test_monthly_cycles_start_at_local_midnight_of_the_anchor_day() -> None:
    c = customer(billing={"anchor_day": 15, "time_zone": "Europe/Berlin"})
    tz = cycles.zone(c.billing, UTC_ZONE)  # type: ignore[arg-type]
    start, end = cycles.cycle_containing(c, tz, ts("2026-03-20T00:00:00"))
    # March 15 is CET (+1), April 15 CEST (+2): the cycle is 31 days less one hour
    assert (iso(start), iso(end)) == ("2026-03-14T23:00:00Z", "2026-04-14T22:00:00Z")
    start, end = cycles.cycle_containing(c, tz, ts("2026-01-14T22:59:59"))
    assert (iso(start), iso(end)) == ("2025-12-14T23:00:00Z", "2026-01-14T23:00:00Z")
    assert cycles.cycle_containing(c, tz, end)[0] == end  # a boundary starts the next cycle


def test_yearly_cycles_take_the_month_of_the_start() -> None:
    c = customer(start="2025-03-10T00:00:00Z", billing={"interval": "year", "anchor_day": 1})
    got = list(_take(cycles.cycles_from(c, UTC_ZONE, 0), 3))
    assert [(iso(s), iso(e)) for s, e in got] == [
        ("2025-03-10T00:00:00Z", "2026-03-01T00:00:00Z"),  # from the start to the anchor
        ("2026-03-01T00:00:00Z", "2027-03-01T00:00:00Z"),
        ("2027-03-01T00:00:00Z", "2028-03-01T00:00:00Z"),
    ]


def test_cycles_are_clipped_to_the_customers_start_and_end() -> None:
    c = customer(
        start="2026-01-20T00:00:00Z", end="2026-04-10T00:00:00Z", billing={"anchor_day": 1}
    )
    got = [(iso(s), iso(e)) for s, e in cycles.cycles_from(c, UTC_ZONE, 0)]
    assert got == [
        ("2026-01-20T00:00:00Z", "2026-02-01T00:00:00Z"),
        ("2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z"),
        ("2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z"),
        ("2026-04-01T00:00:00Z", "2026-04-10T00:00:00Z"),
    ]
    assert cycles.is_cycle(c, UTC_ZONE, ts("2026-01-20T00:00:00"), ts("2026-02-01T00:00:00"))
    assert not cycles.is_cycle(c, UTC_ZONE, ts("2026-01-01T00:00:00"), ts("2026-02-01T00:00:00"))
    assert cycles.current_cycle(c, UTC_ZONE, ts("2026-04-05T00:00:00")) == (
        ts("2026-04-01T00:00:00"),
        ts("2026-04-10T00:00:00"),
    )


def _take(it: Iterator[tuple[int, int]], n: int) -> Iterator[tuple[int, int]]:
    for _ in range(n):
        yield next(it)


# --- the job, in-process ----------------------------------------------------------------------

CONFIG: dict[str, Any] = {
    "auth": BASE_CONFIG["auth"],
    "ingest": {"late_arrival_limit": "400d"},
    "dimensions": [{"id": "data", "name": "Data", "unit": "gigabyte", "price": "1"}],
    "offerings": [{"id": "plan", "name": "Plan", "currency": "USD",
                   "charges": [{"dimension": "data", "model": "per_unit"}]}],
    "customers": [
        {"id": "acme", "name": "Acme", "offering": "plan", "start": "2026-02-10T00:00:00Z",
         "billing": {"anchor_day": 1, "finalize_after": "1h"}},
        {"id": "late", "name": "Late", "offering": "plan", "billing": {"anchor_day": 5}},
        {"id": "plain", "name": "Plain", "offering": "plan"},
    ],
    "meters": [{"id": "m", "customer": "acme", "dimension": "data", "reset": "billing_period"}],
}  # fmt: skip


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(ts("2026-05-01T00:30:00"))


@pytest.fixture
def gateway(tmp_path: Path, clock: FixedClock) -> Iterator[tuple[Gateway, httpx.Client]]:
    events = {"files": [{"name": "events", "path": str(tmp_path / "events.ndjson")}]}
    with serve(tmp_path, {**CONFIG, "exporters": events}, clock) as (gw, client):
        yield gw, client


def finalized(client: httpx.Client, customer: str) -> list[tuple[str, str, str, str]]:
    """(from, to, number, total) of the customer's finalized invoices, oldest period first."""
    data = client.get(
        "/v1/invoices", params={"customerId": customer, "status": "finalized"}
    ).json()["data"]
    return sorted((i["from"], i["to"], i["number"], i["total"]) for i in data)


def test_closed_cycles_invoice_themselves_in_order_once_finalize_after_has_passed(
    gateway: tuple[Gateway, httpx.Client], clock: FixedClock, tmp_path: Path
) -> None:
    gw, client = gateway
    body = [
        {"timestamp": t, "customerId": "acme", "dimensionId": "data", "recordValue": v}
        for t, v in [("2026-02-11T00:00:00Z", "1"), ("2026-03-05T00:00:00Z", "2"),
                     ("2026-04-30T23:59:00Z", "4")]
    ]  # fmt: skip
    assert client.post("/v1/usage", json=body).json()["accepted"] == 3
    gw.scheduler.run_due()
    # April closed 30 minutes ago: it waits for late usage until 01:00
    assert finalized(client, "acme") == [
        ("2026-02-10T00:00:00Z", "2026-03-01T00:00:00Z", "INV-000001", "1.00"),
        ("2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z", "INV-000002", "2.00"),
    ]
    late = {"timestamp": "2026-04-30T23:59:30Z", "customerId": "acme", "dimensionId": "data",
            "recordValue": "8"}  # fmt: skip
    assert client.post("/v1/usage", json=late).json()["accepted"] == 1
    clock.set(ts("2026-05-01T01:00:00"))
    gw.scheduler.run_due()
    gw.scheduler.run_due()  # again: nothing more
    assert finalized(client, "acme")[2:] == [
        ("2026-04-01T00:00:00Z", "2026-05-01T00:00:00Z", "INV-000003", "12.00"),
    ]
    invoices = client.get("/v1/invoices").json()["data"]
    assert len(invoices) == 3  # no other customer's cycle has closed, none made twice
    gw.scheduler.run_due()  # the exporter the finalizations woke
    sent = [orjson.loads(x) for x in (tmp_path / "events.ndjson").read_bytes().splitlines()]
    assert [(e["type"], e["id"], e["data"]["number"]) for e in sent] == [
        ("invoice.finalized", f"invoice/{i['id']}/finalized", i["number"])
        for i in sorted(invoices, key=lambda i: str(i["number"]))
    ]
    # a customer without start begins with the cycle in progress when the job first saw it
    assert gw.store.job_state("cycles/late") == {
        "cycles/late": {"through": ts("2026-04-05T00:00:00")}
    }
    clock.set(ts("2026-05-05T01:00:00"))
    gw.scheduler.run_due()
    assert [r[:2] for r in finalized(client, "late")] == [
        ("2026-04-05T00:00:00Z", "2026-05-05T00:00:00Z")
    ]
    # the meter's billing_period is the customer's cycle
    state = client.get("/v1/meters/m/state").json()
    assert (state["periodStart"], state["periodEnd"]) == (
        "2026-05-01T00:00:00Z",
        "2026-06-01T00:00:00Z",
    )
    # a draft's default period is the customer's current cycle
    late_draft = client.post("/v1/customers/late/invoices", json={}).json()
    assert (late_draft["from"], late_draft["to"]) == (
        "2026-05-05T00:00:00Z",
        "2026-06-05T00:00:00Z",
    )


def test_a_void_cycle_is_invoiced_again_after_finalize_after(
    gateway: tuple[Gateway, httpx.Client], clock: FixedClock
) -> None:
    gw, client = gateway
    top_up = client.post("/v1/customers/acme/wallet/top-ups", json={"amount": "50"})
    assert top_up.status_code == 201
    usage = {"timestamp": "2026-03-05T00:00:00Z", "customerId": "acme", "dimensionId": "data",
             "recordValue": "3"}  # fmt: skip
    assert client.post("/v1/usage", json=usage).json()["accepted"] == 1
    gw.scheduler.run_due()
    march = next(
        i for i in client.get("/v1/invoices").json()["data"] if i["from"].startswith("2026-03")
    )
    void = client.post(f"/v1/invoices/{march['id']}/void").json()
    assert (void["status"], void["creditsReturned"]) == ("void", "3.00")
    gw.scheduler.run_due()
    clock.advance(1800)
    gw.scheduler.run_due()
    # 01:00: April's cycle is due (INV-000003); March, voided at 00:30, not yet
    assert [r[:3] for r in finalized(client, "acme")] == [
        ("2026-02-10T00:00:00Z", "2026-03-01T00:00:00Z", "INV-000001"),
        ("2026-04-01T00:00:00Z", "2026-05-01T00:00:00Z", "INV-000003"),
    ]
    # a correction before the cycle is invoiced again: more usage of March
    usage = {**usage, "recordValue": "1", "timestamp": "2026-03-06T00:00:00Z"}
    assert client.post("/v1/usage", json=usage).json()["accepted"] == 1
    clock.advance(1800)
    gw.scheduler.run_due()
    gw.scheduler.run_due()
    assert finalized(client, "acme") == [
        ("2026-02-10T00:00:00Z", "2026-03-01T00:00:00Z", "INV-000001", "0.00"),
        ("2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z", "INV-000004", "4.00"),
        ("2026-04-01T00:00:00Z", "2026-05-01T00:00:00Z", "INV-000003", "0.00"),
    ]
    wallet = client.get("/v1/customers/acme/wallet").json()
    assert wallet["balances"] == [{"currency": "USD", "balance": "46.00"}]
    assert gw.store.job_state("cycles/acme/") == {}  # the reopened mark is gone


def test_a_cycle_invoiced_by_hand_is_left_alone(
    gateway: tuple[Gateway, httpx.Client], clock: FixedClock
) -> None:
    gw, client = gateway
    february = {"from": "2026-02-10T00:00:00Z", "to": "2026-03-01T00:00:00Z"}
    draft = client.post("/v1/customers/acme/invoices", json=february).json()
    assert client.post(f"/v1/invoices/{draft['id']}/finalize").status_code == 200
    gw.scheduler.run_due()
    assert [r[:3] for r in finalized(client, "acme")] == [
        ("2026-02-10T00:00:00Z", "2026-03-01T00:00:00Z", "INV-000001"),  # by hand
        ("2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z", "INV-000002"),  # by the job
    ]
    assert [i["id"] for i in client.get("/v1/invoices").json()["data"]].count(draft["id"]) == 1
    assert gw.store.job_state("cycles/acme") == {
        "cycles/acme": {"through": ts("2026-04-01T00:00:00")}
    }


# --- real gateway processes -------------------------------------------------------------------


def _months_back(n: int) -> datetime:
    now = datetime.now(UTC)
    y, m = now.year, now.month - n
    while m < 1:
        y, m = y - 1, m + 12
    return datetime(y, m, 1, tzinfo=UTC)


def _process_config(customers: int, months: int, store_url: str | None) -> dict[str, Any]:
    start = _months_back(months).strftime("%Y-%m-%dT%H:%M:%SZ")
    config: dict[str, Any] = {
        **BASE_CONFIG,
        "customers": [
            *BASE_CONFIG["customers"],  # acme, dumm-ai: no billing cycle
            *({"id": f"cyc{i}", "name": f"Cycle {i}", "offering": "pay-as-you-go",
               "start": start, "billing": {"anchor_day": 1, "finalize_after": "1s"}}
              for i in range(customers)),
        ],
    }  # fmt: skip
    if store_url is not None:
        config["store"] = {"url": store_url}
    return config


def _all_finalized(url: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as c:
        while True:
            q: dict[str, str | int] = {"status": "finalized", "limit": 1000}
            if cursor:
                q["cursor"] = cursor
            page = c.get("/v1/invoices", params=q).json()
            out += page["data"]
            cursor = page["cursor"]
            if cursor is None:
                return out


def _wait(cond: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError("timed out")


def _assert_each_cycle_once_in_order(invoices: list[dict[str, Any]], expected: int) -> None:
    numbers = sorted(int(i["number"].removeprefix("INV-")) for i in invoices)
    assert numbers == list(range(1, len(invoices) + 1))  # no gap, no duplicate
    periods = [(i["customerId"], i["from"], i["to"]) for i in invoices]
    assert len(set(periods)) == len(periods) == expected  # no cycle twice, none missing
    by_customer: dict[str, list[tuple[str, str]]] = {}
    for i in invoices:
        by_customer.setdefault(i["customerId"], []).append((i["from"], i["number"]))
    for rows in by_customer.values():  # oldest cycle first, per customer
        assert [n for _, n in sorted(rows)] == sorted(n for _, n in rows)


def test_a_gateway_killed_while_closing_cycles_invoices_each_once_after_restart(
    tmp_path: Path,
) -> None:
    # enough overdue cycles that the job is still closing them when the first finalized one
    # is seen (72 were all done between two polls once)
    customers, months = 8, 60
    gw = GatewayProcess(tmp_path, _process_config(customers, months, None)).start()
    try:
        # SIGKILL as soon as the job has finalized some, long before it is through
        _wait(lambda: _all_finalized(gw.url), 30)
        gw.kill()
        done_at_kill = _finalized_in_store(gw)
        gw.start()
        _wait(lambda: len(_all_finalized(gw.url)) >= customers * months, 60)
        invoices = _all_finalized(gw.url)
    finally:
        gw.stop()
    assert 0 < done_at_kill < customers * months  # killed in the middle
    _assert_each_cycle_once_in_order(invoices, customers * months)


def _finalized_in_store(gw: GatewayProcess) -> int:
    """How many invoices the killed gateway's store holds finalized (read directly)."""
    store = open_store(gw.config["store"]["url"], 86400, time.time_ns())
    try:
        return len(store.invoice_list(None, None, 10_000, status="finalized"))
    finally:
        store.close()


def test_two_replicas_close_cycles_and_finalize_at_once_without_gaps(tmp_path: Path) -> None:
    """Two gateways on one PostgreSQL database: the cycle job runs on the lease holder while
    invoices are finalized by hand through both replicas (a load balancer's retries on the
    other one); the holder is SIGKILLed mid-way and the other takes the job over. Every cycle
    is invoiced once, oldest first, and the numbers of all invoices are 1..n."""
    url = pgdb.create_database()
    customers, months = 6, 24
    config = _process_config(customers, months, url)
    replicas = []
    for i in range(2):
        (tmp_path / f"r{i}").mkdir()
        replicas.append(GatewayProcess(tmp_path / f"r{i}", config))
    manual: set[str] = set()

    def post(path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        for _ in range(100):
            for r in replicas:
                try:
                    with r.client() as c:
                        answer = c.post(path, json=body)
                except httpx.TransportError:
                    continue  # that replica is dead: the balancer tries the other
                assert answer.status_code in (200, 201), answer.text
                doc: dict[str, Any] = answer.json()
                return doc
            time.sleep(0.05)
        raise AssertionError(f"no replica answered {path}")

    def by_hand(customer: str) -> None:
        for m in range(1, 10):
            period = {"from": f"2020-{m:02d}-01T00:00:00Z", "to": f"2020-{m + 1:02d}-01T00:00:00Z"}
            draft = post(f"/v1/customers/{customer}/invoices", period)
            manual.add(post(f"/v1/invoices/{draft['id']}/finalize")["number"])

    try:
        starting = [threading.Thread(target=r.start) for r in replicas]
        for t in starting:
            t.start()
        for t in starting:
            t.join()
        hands = [threading.Thread(target=by_hand, args=(c,)) for c in ("acme", "dumm-ai")]
        for t in hands:
            t.start()
        # the lease holder dies (SIGKILL) once it has invoiced some cycles
        _wait(lambda: _count_cycle_invoices(url) > 0, 30)
        holder = _wait(lambda: next((r for r in replicas if _holds_cycles(r)), None), 30)
        holder.stop(signal.SIGKILL)
        done_at_kill = _count_cycle_invoices(url)
        for t in hands:
            t.join()
        other = next(r for r in replicas if r is not holder)
        expected = customers * months + len(manual)
        _wait(lambda: len(_all_finalized(other.url)) >= expected, 90)
        invoices = _all_finalized(other.url)
    finally:
        for r in replicas:
            if r.proc is not None:
                r.stop()
        pgdb.drop_database(url)
    assert 0 < done_at_kill < customers * months  # the other replica finished the job
    assert len(manual) == 18
    numbers = sorted(int(i["number"].removeprefix("INV-")) for i in invoices)
    assert numbers == list(range(1, expected + 1))
    assert {i["number"] for i in invoices if not i["customerId"].startswith("cyc")} == manual
    cycle_invoices = [i for i in invoices if i["customerId"].startswith("cyc")]
    _assert_each_cycle_once_in_order_among(cycle_invoices, customers * months)


def _count_cycle_invoices(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM invoices WHERE origin = 'cycle' AND status = 'finalized'"
        ).fetchone()
    return 0 if row is None else int(row[0])


def _assert_each_cycle_once_in_order_among(invoices: list[dict[str, Any]], expected: int) -> None:
    periods = [(i["customerId"], i["from"], i["to"]) for i in invoices]
    assert len(set(periods)) == len(periods) == expected
    by_customer: dict[str, list[tuple[str, str]]] = {}
    for i in invoices:
        by_customer.setdefault(i["customerId"], []).append((i["from"], i["number"]))
    for rows in by_customer.values():
        assert [n for _, n in sorted(rows)] == sorted(n for _, n in rows)


def _holds_cycles(r: GatewayProcess) -> bool:
    import psycopg

    url = r.config["store"]["url"]
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT holder FROM leases WHERE name = %s", (cycles.JOB_NAME,)
        ).fetchone()
    if row is None:
        return False
    assert r.proc is not None
    return f":{r.proc.pid}:" in str(row[0])
