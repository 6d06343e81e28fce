"""Recurring fees and included usage (SPEC 11) on the rating path, in-process, and on the
invoices and usage-summary of a running gateway (either store, METER_TEST_STORE).

Fees: arrears on the invoice of the period that ends the cycle, advance on the invoice issued
when the cycle starts (the subscription's first cycle on the invoice holding its start), whole
days prorated at the customer's start and end, yearly cycles, off-cycle periods. Included
usage: the first q units of the period are free and the line shows both quantities.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from meter_gateway.billing import invoices, plans, rating
from meter_gateway.catalog import Catalog, build
from meter_gateway.config import Charge, Customer, CustomerBilling, Dimension, Fee, Offering
from meter_gateway.store import Store
from tests.helpers import commit, next_id, now_iso, open_store, rec, ts

UTC = ZoneInfo("UTC")


def month(m: int, y: int = 2026) -> tuple[int, int]:
    ny, nm = (y + 1, 1) if m == 12 else (y, m + 1)
    return ts(f"{y}-{m:02d}-01T00:00:00"), ts(f"{ny}-{nm:02d}-01T00:00:00")


def catalog(
    fee: Fee | None, start: str | None = None, end: str | None = None, **kw: Any
) -> Catalog:
    def at(text: str | None) -> datetime | None:
        return None if text is None else datetime.fromisoformat(text + "+00:00")

    dims = {"d1": Dimension(id="d1", name="Data", unit="gigabyte", price=Decimal("0.1"))}
    charge = Charge(dimension="d1", **kw)
    offering = Offering(id="o", name="Pro", currency="USD", charges=(charge,), fee=fee)
    customer = Customer(id="c1", name="C1", offering="o", start=at(start), end=at(end))
    return build({"dimensions": dims, "offerings": {"o": offering}, "customers": {"c1": customer}})


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(tmp_path)
    yield s
    s.close()


def fees(store: Store, cat: Catalog, period: tuple[int, int]) -> list[tuple[str, str, int]]:
    """(amount, cycle start, days) of each fee line the period's invoice carries."""
    r = rating.rate(store, cat, "c1", *period, period[1], UTC, charged_only=True)
    return [
        (str(f.amount), datetime.fromtimestamp(f.cycle.cycle_from // 10**9, UTC).strftime("%m-%d"),
         f.cycle.days)
        for f in r.fees
    ]  # fmt: skip


MONTHLY = Fee(amount=Decimal(31), interval="month", timing="arrears")


def test_arrears_bills_each_cycle_on_the_invoice_that_ends_it(store: Store) -> None:
    cat = catalog(MONTHLY, start="2026-03-11T00:00:00", end="2026-05-16T12:00:00")
    assert fees(store, cat, month(2)) == []  # before the subscription
    assert fees(store, cat, month(3)) == [("21.00", "03-01", 21)]  # 21 of 31 days (from the 11th)
    assert fees(store, cat, month(4)) == [("31.00", "04-01", 30)]
    # the end's day has begun: 16 of 31 days
    assert fees(store, cat, month(5)) == [("16.00", "05-01", 16)]
    assert fees(store, cat, month(6)) == []
    # off-cycle periods: the one that ends the cycle carries it, once
    first, second = (
        (month(4)[0], ts("2026-04-16T00:00:00")),
        (ts("2026-04-16T00:00:00"), month(4)[1]),
    )
    assert (fees(store, cat, first), fees(store, cat, second)) == ([], [("31.00", "04-01", 30)])


def test_advance_bills_a_cycle_on_the_invoice_issued_when_it_starts(store: Store) -> None:
    fee = Fee(amount=Decimal(31), interval="month", timing="advance")
    cat = catalog(fee, start="2026-03-11T00:00:00", end="2026-05-16T12:00:00")
    assert fees(store, cat, month(2)) == []
    # the first cycle (no period before it) and April, which starts when March's invoice is issued
    assert fees(store, cat, month(3)) == [("21.00", "03-01", 21), ("31.00", "04-01", 30)]
    assert fees(store, cat, month(4)) == [("16.00", "05-01", 16)]  # May, cut by the end
    assert fees(store, cat, month(5)) == []  # its own cycle was billed in advance
    # without a start, every cycle is billed by the period before it
    cat = catalog(fee)
    assert fees(store, cat, month(7)) == [("31.00", "08-01", 31)]


def test_a_yearly_fee_follows_the_start_month_and_prorates_by_days(store: Store) -> None:
    fee = Fee(amount=Decimal(1200), interval="year", timing="arrears")
    cat = catalog(fee, start="2026-03-11T00:00:00")
    assert fees(store, cat, month(3)) == []
    assert fees(store, cat, month(2, 2027)) == [("1167.12", "03-01", 355)]  # 1200 × 355/365
    r = rating.rate(store, cat, "c1", *month(2, 2027), month(2, 2027)[1], UTC)
    assert r.fees[0].cycle.exact == Decimal("1167.123287671232876712")
    assert r.total == Decimal("1167.12")  # the fee is in the total


def test_fee_cycles_follow_the_billing_anchor_and_zone(store: Store) -> None:
    billing = CustomerBilling(interval="month", anchor_day=15, time_zone="Europe/Berlin")
    cat = catalog(MONTHLY)
    cust = cat.customers["c1"].model_copy(update={"billing": billing})
    cat = build(
        {"dimensions": cat.dimensions, "offerings": cat.offerings, "customers": {"c1": cust}}
    )
    cycle = (ts("2026-03-14T23:00:00"), ts("2026-04-14T22:00:00"))  # Berlin midnights, DST between
    r = rating.rate(store, cat, "c1", *cycle, cycle[1], UTC)
    [f] = r.fees
    assert (f.cycle.cycle_from, f.cycle.cycle_to, f.cycle.days, f.amount) == (
        *cycle,
        31,
        Decimal("31.00"),
    )


def test_fee_lines_on_the_invoice_document(store: Store) -> None:
    cat = catalog(MONTHLY, start="2026-03-11T00:00:00")
    commit(store, rec("2026-03-20T00:00:00", "5"))
    doc = invoices.compute(store, cat, UTC, "inv_1", "c1", *month(3), month(4)[0], month(4)[0])
    usage, fee = doc["lines"]
    assert (usage["type"], usage["amount"]) == ("usage", "0.50")
    assert fee == {
        "type": "fee", "description": "Recurring fee", "quantity": "0.677419354838709677",
        "unitPrice": "31", "exactAmount": "21", "amount": "21.00",
        "fee": {"interval": "month", "timing": "arrears", "cycleFrom": "2026-03-01T00:00:00Z",
                "cycleTo": "2026-04-01T00:00:00Z", "from": "2026-03-11T00:00:00Z",
                "to": "2026-04-01T00:00:00Z", "days": 21, "cycleDays": 31},
    }  # fmt: skip
    assert (doc["subtotal"], doc["total"]) == ("21.50", "21.50")


def test_included_units_are_free_and_the_line_shows_both(store: Store) -> None:
    commit(store, *(rec(f"2026-05-{d:02d}T00:00:00", "41") for d in (1, 2, 3)))  # 123 GB
    for included, billed, amount in (
        ("100", "23", "2.30"),
        ("200", "0", "0.00"),
        ("0", "123", "12.30"),
    ):
        cat = catalog(None, included=Decimal(included))
        r = rating.rate(store, cat, "c1", *month(5), month(5)[1], UTC)
        [ln] = r.lines
        assert (ln.quantity, ln.included, ln.billed, ln.amount) == (
            Decimal(123),
            Decimal(included),
            Decimal(billed),
            Decimal(amount),
        )
        assert plans.usage_fields(ln) == {"included": included, "billedQuantity": billed}
        assert ln.cost == Decimal("0.00")  # no unit cost: what it costs us is not what is billed
    # tiered: the tiers price the billed units, not the included ones
    cat = catalog(None, included=Decimal(100), model="graduated", tiers=(
        {"up_to": 10, "unit_price": "1"}, {"up_to": None, "unit_price": "0.5"}))  # fmt: skip
    doc = invoices.compute(store, cat, UTC, "inv", "c1", *month(5), month(6)[0], month(6)[0])
    [line] = doc["lines"]
    assert (line["quantity"], line["included"], line["billedQuantity"]) == ("123", "100", "23")
    assert [t["units"] for t in line["tiers"]] == ["10", "13"]
    assert line["amount"] == "16.50"


# --- a running gateway ----------------------------------------------------------------------


def test_a_subscription_with_included_usage_over_http(client: httpx.Client) -> None:
    n = next_id()
    offering = {
        "id": f"pro-{n}", "name": "Pro", "currency": "USD",
        "fee": {"amount": "49", "interval": "month", "timing": "arrears",
                "description": "Pro plan"},
        "charges": [{"dimension": "data-processed", "model": "per_unit", "unit_price": "0.10",
                     "included": "100"}],
    }  # fmt: skip
    assert client.post("/v1/offerings", json=offering).status_code == 201
    cid = f"sub-{n}"
    r = client.post("/v1/customers", json={"id": cid, "name": "Sub", "offering": f"pro-{n}"})
    assert r.status_code == 201, r.text
    body = [{"id": f"sub-{n}-{i}", "timestamp": now_iso(), "customerId": cid,
             "dimensionId": "data-processed", "recordValue": "41"} for i in range(3)]  # fmt: skip
    assert client.post("/v1/usage", json=body).json()["accepted"] == 3
    summary = client.get(f"/v1/customers/{cid}/usage-summary").json()
    [line] = summary["dimensions"]
    assert (line["quantity"], line["included"], line["billedQuantity"], line["amount"]) == (
        "123",
        "100",
        "23",
        "2.30",
    )
    [fee] = summary["fees"]
    assert (fee["type"], fee["description"], fee["amount"]) == ("fee", "Pro plan", "49.00")
    assert summary["total"] == "51.30"
    inv = client.post(f"/v1/customers/{cid}/invoices", json={})
    assert inv.status_code == 201, inv.text
    doc = inv.json()
    assert [ln["type"] for ln in doc["lines"]] == ["usage", "fee"]
    assert doc["lines"][0]["billedQuantity"] == "23"
    assert doc["subtotal"] == "51.30"
    csv_rows = client.get(f"/v1/invoices/{doc['id']}", params={"format": "csv"}).text.splitlines()
    assert len(csv_rows) == 3  # header, usage, fee
    assert "Pro plan" in client.get(f"/v1/invoices/{doc['id']}", params={"format": "html"}).text
