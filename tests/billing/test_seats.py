"""Seats (SPEC 11): unique_count dimensions that are prorated or count the values present at the
end, in-process over either store (METER_TEST_STORE) and through a running gateway.

Lago's case: one seat all of a 31-day month and one added at the start of day 11 bill
1 + 21/31 = 1.677419354838709677 seats.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from meter_gateway.aggregation.engine import aggregate
from meter_gateway.billing import rating
from meter_gateway.catalog import Catalog, build
from meter_gateway.config import Charge, Customer, Dimension, Offering
from meter_gateway.model import Source, UsageRecord, dedup_key
from meter_gateway.store import Store
from tests.gatewayproc import BASE_CONFIG, GatewayProcess
from tests.helpers import commit, next_id, open_store, ts

UTC = ZoneInfo("UTC")
MARCH = (ts("2026-03-01T00:00:00"), ts("2026-04-01T00:00:00"))  # 31 days
LAGO = Decimal("1.677419354838709677")  # 52/31 to 18 places


def seat(when: str, user: str, op: str | None = None, rid: str | None = None) -> UsageRecord:
    meta: dict[str, Any] = {"user_id": user}
    if op is not None:
        meta["operation"] = op
    rid = rid or f"{user}-{when}-{op}"
    return UsageRecord(
        ts(when), "c1", "seats", Decimal(1), rid, meta, Source.REST, dedup_key("id", rid), user
    )


def dim(**kw: Any) -> Dimension:
    return Dimension(id="seats", name="Seats", unit="seat", aggregation="unique_count",
                     unique_key="user_id", **kw)  # fmt: skip


def catalog(d: Dimension) -> Catalog:
    offering = Offering(
        id="o", name="Seats", currency="USD",
        charges=(Charge(dimension="seats", unit_price=Decimal(10)),),
    )  # fmt: skip
    return build(
        {
            "dimensions": {"seats": d},
            "offerings": {"o": offering},
            "customers": {"c1": Customer(id="c1", name="C1", offering="o")},
        }
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(tmp_path)
    yield s
    s.close()


def month_value(store: Store, d: Dimension, as_of: int | None = None) -> Decimal | None:
    return aggregate(store, "c1", d, [MARCH], as_of)[0]


def test_lagos_seats_one_all_month_one_from_day_11(store: Store) -> None:
    commit(store, seat("2026-03-01T00:00:00", "ann"), seat("2026-03-11T00:00:00", "bob"))
    d = dim(prorated=True)
    assert month_value(store, d) == LAGO
    r = rating.rate(store, catalog(d), "c1", *MARCH, MARCH[1], UTC)
    [line] = r.lines
    assert (line.quantity, line.amount, r.total) == (LAGO, Decimal("16.77"), Decimal("16.77"))
    # without proration both count (SPEC 2's distinct count, the default "any" mode)
    assert month_value(store, dim()) == 2


def test_a_remove_ends_a_seat_and_seats_carry_across_periods(store: Store) -> None:
    commit(
        store,
        seat("2026-02-10T00:00:00", "ann"),  # added in February, still there in March
        seat("2026-03-11T00:00:00", "bob"),
        seat("2026-03-21T00:00:00", "ann", "remove"),  # ann: 20 days of March
        seat("2026-03-25T00:00:00", "bob"),  # bob again while present: changes nothing
        seat("2026-03-26T00:00:00", "cat", "remove"),  # never added: ignored
        seat("2026-03-29T00:00:00", "ann", "add"),  # back for the last 3 days
    )
    prorated = dim(prorated=True)
    assert month_value(store, prorated) == Decimal("1.419354838709677419")  # (20 + 21 + 3) / 31
    # as of the 16th: 15 days of ann, 5 of bob, over the whole month (never extrapolated)
    assert month_value(store, prorated, ts("2026-03-16T00:00:00")) == Decimal(
        "0.645161290322580645"
    )
    end = dim(unique_count_mode="end")
    assert month_value(store, end) == 2  # ann (re-added) and bob at the month's end
    assert month_value(store, end, ts("2026-03-22T00:00:00")) == 1  # bob only after ann left
    assert month_value(store, dim(unique_count_mode="any")) == 3  # every value seen, cat too
    # April: ann and bob are still there all month (30 days)
    april = (MARCH[1], ts("2026-05-01T00:00:00"))
    assert aggregate(store, "c1", prorated, [april])[0] == 2


def test_seats_by_day_windows_and_after_a_cancellation(store: Store) -> None:
    commit(store, seat("2026-03-01T00:00:00", "ann"),
           seat("2026-03-11T12:00:00", "bob", rid="bob-add"))  # fmt: skip
    days = dim(prorated=True, aggregation_interval="day")
    r = rating.rate(store, catalog(days), "c1", *MARCH, MARCH[1], UTC)
    # 31 days of ann, 20 whole days of bob, and half of the 11th
    assert r.lines[0].quantity == Decimal("51.5")
    [done] = store.cancel_records(["bob-add"], "not a seat", ts("2026-04-01T00:00:00"), {})
    assert done.status == "cancelled"
    assert month_value(store, dim(prorated=True)) == 1


def test_seat_options_are_for_unique_count_only() -> None:
    with pytest.raises(ValueError, match="unique_count dimensions only"):
        Dimension(id="d", name="D", aggregation="sum", prorated=True)
    with pytest.raises(ValueError, match="leave unique_count_mode out"):
        dim(prorated=True, unique_count_mode="end")


# --- a running gateway ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def seats_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    config = {**BASE_CONFIG, "ingest": {"late_arrival_limit": "3650d", "dedup_window": "3650d"}}
    gw = GatewayProcess(Path(tmp_path_factory.mktemp("seats")), config).start()
    yield gw
    gw.stop()


def test_a_seat_plan_over_http(seats_gateway: GatewayProcess) -> None:
    n = next_id()
    with seats_gateway.client() as client:
        r = client.post("/v1/dimensions", json={
            "id": f"seats-{n}", "name": "Seats", "unit": "seat", "aggregation": "unique_count",
            "unique_key": "user_id", "prorated": True})  # fmt: skip
        assert r.status_code == 201, r.text
        r = client.post("/v1/offerings", json={
            "id": f"team-{n}", "name": "Team", "currency": "USD",
            "charges": [{"dimension": f"seats-{n}", "unit_price": "10"}]})  # fmt: skip
        assert r.status_code == 201, r.text
        cid = f"team-{n}"
        r = client.post("/v1/customers", json={"id": cid, "name": "T", "offering": f"team-{n}"})
        assert r.status_code == 201, r.text
        records = [
            {"id": f"s{n}-1", "timestamp": "2026-03-01T00:00:00Z", "customerId": cid,
             "dimensionId": f"seats-{n}", "recordValue": 1, "metadata": {"user_id": "ann"}},
            {"id": f"s{n}-2", "timestamp": "2026-03-11T00:00:00Z", "customerId": cid,
             "dimensionId": f"seats-{n}", "recordValue": 1, "metadata": {"user_id": "bob"}},
            {"id": f"s{n}-3", "timestamp": "2026-04-11T00:00:00Z", "customerId": cid,
             "dimensionId": f"seats-{n}", "recordValue": 1,
             "metadata": {"user_id": "bob", "operation": "remove"}},
        ]  # fmt: skip
        assert client.post("/v1/usage", json=records).json()["accepted"] == 3
        march = {"from": "2026-03-01T00:00:00Z", "to": "2026-04-01T00:00:00Z"}
        summary = client.get(f"/v1/customers/{cid}/usage-summary", params=march).json()
        assert summary["dimensions"][0]["quantity"] == str(LAGO)
        assert summary["total"] == "16.77"
        query = {**march, "customerId": cid, "dimensionId": f"seats-{n}", "window": "month"}
        window = client.get("/v1/usage", params=query)
        assert window.json()["data"][0]["value"] == str(LAGO)
        april = {"from": "2026-04-01T00:00:00Z", "to": "2026-05-01T00:00:00Z"}
        inv = client.post(f"/v1/customers/{cid}/invoices", json=april).json()
        # ann all April (30 days), bob the first 10
        assert inv["lines"][0]["quantity"] == "1.333333333333333333"
        assert inv["lines"][0]["amount"] == "13.33"
