"""Meters: periods, thresholds once per period (also across job restarts), resets with the
period's total, catch-up over periods nobody ran, and the fence handed to the store."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from exporters.outbox import Router
from meter_gateway.catalog import build
from meter_gateway.config import Customer, Dimension, Meter, MeterThreshold
from meter_gateway.meters import MeterJob, period, readings
from meter_gateway.store.base import OutboxEvent
from meter_gateway.store.sqlite import SQLiteStore
from tests.helpers import commit, open_store, rec, ts

UTC = ZoneInfo("UTC")
DIM = Dimension(id="d1", name="D1", unit="gigabyte")
HOLDER = "replica-a"
LEASE_TTL_NS = 15 * 1_000_000_000  # the scheduler's default lease


def meter(**kw: Any) -> Meter:
    base: dict[str, Any] = {
        "id": "m1",
        "customer": "c1",
        "dimension": "d1",
        "reset": "daily",
        "capacity": Decimal(10),
        "thresholds": (MeterThreshold(percent=Decimal(50)), MeterThreshold(value=Decimal(8))),
    }
    return Meter(**{**base, **kw})


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = open_store(tmp_path)
    yield s
    s.close()


class Fenced:
    """Records the fence of every job_commit, delegating to the real store."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.fences: list[tuple[str, str] | None] = []

    def job_commit(
        self,
        states: Mapping[str, Mapping[str, Any] | None],
        events: Sequence[OutboxEvent],
        fence: tuple[str, str] | None,
        now_ns: int,
    ) -> None:
        self.fences.append(fence)
        self.store.job_commit(states, events, fence, now_ns)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def job(store: Any, m: Meter) -> MeterJob:
    catalog = build(
        {
            "dimensions": {"d1": DIM},
            "customers": {"c1": Customer(id="c1", name="C1")},
            "meters": {m.id: m},
        }
    )
    return MeterJob(store, lambda: catalog, UTC, Router({"hook": None}), lambda: HOLDER)


def run(store: Any, j: MeterJob, now_ns: int, holder: str = HOLDER) -> float:
    """One run as the scheduler makes it: take (or renew) the job's lease as the job's holder at
    ``now_ns`` first, so the job's fenced commit finds it held (PostgreSQL checks; SQLite's
    single process always holds it)."""
    assert store.lease(j.name, holder, LEASE_TTL_NS, now_ns)
    return j.run(now_ns)


def events(store: SQLiteStore) -> list[dict[str, Any]]:
    return [orjson.loads(i.payload) for i in store.outbox_claim("hook", 2**62, 1000)]


def test_periods_follow_the_reset_schedule_in_the_time_zone() -> None:
    now = ts("2026-05-10T23:30:00")
    assert period(meter(reset="daily"), now, UTC) == (
        ts("2026-05-10T00:00:00"),
        ts("2026-05-11T00:00:00"),
    )
    assert period(meter(reset="monthly"), now, UTC) == (
        ts("2026-05-01T00:00:00"),
        ts("2026-06-01T00:00:00"),
    )
    assert period(meter(reset="billing_period"), now, UTC) == period(
        meter(reset="monthly"), now, UTC
    )
    assert period(meter(reset="never"), now, UTC) == (0, None)
    # 23:30 UTC is already the 11th in Tokyo
    tokyo = ZoneInfo("Asia/Tokyo")
    assert period(meter(reset="daily"), now, tokyo)[0] == ts("2026-05-10T15:00:00")


def test_percent_thresholds_need_a_capacity() -> None:
    with pytest.raises(ValueError, match="percent thresholds need a capacity"):
        meter(capacity=None)


def test_thresholds_fire_once_per_period_even_with_a_new_job(store: SQLiteStore) -> None:
    fenced = Fenced(store)
    m = meter()
    commit(store, rec("2026-05-10T10:00:00", "4"))
    run(fenced, job(fenced, m), ts("2026-05-10T10:00:01"))
    assert events(store) == []
    commit(store, rec("2026-05-10T10:05:00", "1"))  # 5: exactly on 50 % of 10
    run(fenced, job(fenced, m), ts("2026-05-10T10:05:01"))
    commit(store, rec("2026-05-10T11:00:00", "4"))  # 9: past 8
    again = job(fenced, m)  # a restarted gateway: state comes from the store
    run(fenced, again, ts("2026-05-10T11:00:01"))
    run(fenced, again, ts("2026-05-10T11:00:02"))
    got = events(store)
    assert [(e["type"], e["data"]["threshold"]["key"], e["data"]["value"]) for e in got] == [
        ("threshold_reached", "percent:50", "5"),
        ("threshold_reached", "value:8", "9"),
    ]
    assert got[0]["id"] == "m1/2026-05-10T00:00:00Z/threshold/percent:50"
    # the first run records the period, then one commit per firing; never one for the rerun
    assert fenced.fences == [("meters", HOLDER)] * 3


def test_a_reset_forwards_the_periods_total_and_starts_over(store: SQLiteStore) -> None:
    m = meter()
    j = job(store, m)
    commit(store, rec("2026-05-10T10:00:00", "6"))
    run(store, j, ts("2026-05-10T10:00:01"))
    commit(store, rec("2026-05-10T23:59:59", "1"))  # lands before midnight, seen after it
    run(store, j, ts("2026-05-11T00:00:00"))
    commit(store, rec("2026-05-11T01:00:00", "5"), now="2026-05-11T01:00:00")
    run(store, j, ts("2026-05-11T01:00:01"))
    got = [(e["type"], e["id"]) for e in events(store)]
    assert got == [
        ("threshold_reached", "m1/2026-05-10T00:00:00Z/threshold/percent:50"),
        ("meter_reset", "m1/2026-05-10T00:00:00Z/reset"),
        ("threshold_reached", "m1/2026-05-11T00:00:00Z/threshold/percent:50"),
    ]
    reset = events(store)[1]["data"]
    assert (reset["total"], reset["periodStart"], reset["periodEnd"]) == (
        "7",
        "2026-05-10T00:00:00Z",
        "2026-05-11T00:00:00Z",
    )
    (r,) = readings(store, job_catalog(m), UTC, ts("2026-05-11T01:00:01"))
    assert (r.value, r.ratio, dict(r.fired)) == (
        Decimal(5),
        Decimal("0.5"),
        {"percent:50": ts("2026-05-11T01:00:01")},
    )


def job_catalog(m: Meter) -> Any:
    return build(
        {
            "dimensions": {"d1": DIM},
            "customers": {"c1": Customer(id="c1", name="C1")},
            "meters": {m.id: m},
        }
    )


def test_periods_nobody_ran_are_closed_in_order_with_late_thresholds(store: SQLiteStore) -> None:
    m = meter()
    j = job(store, m)
    run(store, j, ts("2026-05-10T01:00:00"))  # state for the 10th, nothing reached
    commit(store, rec("2026-05-10T12:00:00", "9"), rec("2026-05-11T12:00:00", "2"))
    run(store, j, ts("2026-05-12T08:00:00"))  # the gateway was down for two midnights
    got = [(e["type"], e["id"], e["data"].get("late")) for e in events(store)]
    assert got == [
        ("threshold_reached", "m1/2026-05-10T00:00:00Z/threshold/percent:50", True),
        ("threshold_reached", "m1/2026-05-10T00:00:00Z/threshold/value:8", True),
        ("meter_reset", "m1/2026-05-10T00:00:00Z/reset", None),
        ("meter_reset", "m1/2026-05-11T00:00:00Z/reset", None),
    ]
    assert [e["data"]["total"] for e in events(store) if e["type"] == "meter_reset"] == ["9", "2"]


def test_billable_quantity_meters_count_what_is_billed(store: SQLiteStore) -> None:
    minutes = Dimension(
        id="d1", name="D1", unit="minute", aggregation_interval="hour",
        usage_increment=Decimal(60), rounding="ceil",
    )  # fmt: skip
    m = meter(measure="billable_quantity", thresholds=(MeterThreshold(value=Decimal(2)),))
    catalog = build(
        {"dimensions": {"d1": minutes}, "customers": {"c1": Customer(id="c1", name="C1")},
         "meters": {"m1": m}}
    )  # fmt: skip
    j = MeterJob(store, lambda: catalog, UTC, Router({"hook": None}), lambda: "a")
    commit(store, rec("2026-05-10T10:00:00", "1"), rec("2026-05-10T11:00:00", "1"))
    run(store, j, ts("2026-05-10T12:00:00"), holder="a")  # 2 minutes in 2 hours bill as 2 hours
    assert [e["data"]["value"] for e in events(store)] == ["2"]


def test_no_exporter_means_state_but_no_events(store: SQLiteStore) -> None:
    m = meter()
    catalog = job_catalog(m)
    j = MeterJob(store, lambda: catalog, UTC, Router({}), lambda: "a")
    commit(store, rec("2026-05-10T10:00:00", "9"))
    run(store, j, ts("2026-05-10T10:00:01"), holder="a")
    assert store.outbox_stats() == []
    assert set(store.job_state("meter/")["meter/m1"]["fired"]) == {"percent:50", "value:8"}
