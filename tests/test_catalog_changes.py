"""Catalog changes cannot rewrite the past (SPEC 11), on either store (METER_TEST_STORE).

A change to how a dimension aggregates or an offering prices, while a finalized invoice of a
customer it bills exists, answers 409 unless it carries ``effective_from`` at or after the end
of the last finalized period; then periods from that time on are rated by the new definition
and earlier ones by the one it superseded, and finalized invoices keep their bytes. The issue's
case: a PUT from sum to max changed a bill of 9.64 to 8.00 silently.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest

from meter_gateway.billing import invoices, rating
from meter_gateway.catalog import CatalogError, CatalogService
from meter_gateway.clock import FixedClock
from meter_gateway.config import Charge, Config, Customer, Dimension, Offering
from meter_gateway.store import Store
from meter_gateway.store.base import FinalInvoice, InvoiceRow
from tests.helpers import commit, next_id, open_store, rec, ts

UTC_ZONE = ZoneInfo("UTC")
OCT = (ts("2026-10-01T00:00:00"), ts("2026-11-01T00:00:00"))
NOV = (ts("2026-11-01T00:00:00"), ts("2026-12-01T00:00:00"))
SUM = Dimension(id="d1", name="Data", aggregation="sum")
CONFIG = Config(
    dimensions=(SUM, Dimension(id="free", name="Metered only")),
    offerings=(
        Offering(id="o", name="O", charges=(Charge(dimension="d1", unit_price=Decimal(1)),)),
    ),
    customers=(Customer(id="c1", name="C1", offering="o"),),
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(tmp_path, now="2026-11-20T00:00:00")
    for month in (OCT, NOV):
        commit(s, rec_at(month[0] + 86400 * 10**9, "8.00"), rec_at(month[0] + 2 * 86400 * 10**9,
               "1.64"), now="2026-11-20T00:00:00")  # fmt: skip
    yield s
    s.close()


def rec_at(t: int, value: str) -> object:
    r = rec("2026-01-01T00:00:00", value)
    r.timestamp_ns = t
    return r


def finalize(store: Store, period: tuple[int, int], invoice_id: str = "inv_oct") -> None:
    store.invoice_create(
        InvoiceRow(invoice_id, "c1", "draft", OCT[1], None, {"lines": []}, {}, None, *period)
    )
    row = store.invoice_get(invoice_id)
    assert row is not None
    store.invoice_finalize(row, OCT[1], [], lambda n: FinalInvoice({"number": n}, {}, []))


def total(svc: CatalogService, store: Store, period: tuple[int, int]) -> Decimal | None:
    return rating.rate(store, svc.current, "c1", *period, period[1], UTC_ZONE).total


def iso(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_a_change_that_would_rate_an_invoiced_period_again_needs_effective_from(
    store: Store,
) -> None:
    svc = CatalogService(store, CONFIG, FixedClock(NOV[0]))
    max_ = SUM.model_copy(update={"aggregation": "max"})
    assert (total(svc, store, OCT), total(svc, store, NOV)) == (Decimal("9.64"), Decimal("9.64"))
    finalize(store, OCT)
    with pytest.raises(CatalogError, match=r"effective_from .* at or after 2026-11-01") as e:
        svc.put("dimensions", max_)
    assert e.value.status == 409
    early = max_.model_copy(update={"effective_from": iso("2026-10-20T00:00:00")})
    with pytest.raises(CatalogError, match="before the end of the last finalized period"):
        svc.put("dimensions", early)
    assert total(svc, store, OCT) == Decimal("9.64")  # nothing changed

    stored = svc.put(
        "dimensions", max_.model_copy(update={"effective_from": iso("2026-11-01T00:00:00")})
    )
    assert isinstance(stored, Dimension)
    assert [(v.aggregation, v.effective_from) for v in stored.superseded] == [("sum", None)]
    # October keeps its definition; November starts with the new one
    assert (total(svc, store, OCT), total(svc, store, NOV)) == (Decimal("9.64"), Decimal("8.00"))
    # a rename keeps the history (a GET's body may come back with it, unchanged)
    svc.put("dimensions", stored.model_copy(update={"name": "Peak"}))
    assert svc.current.dimensions["d1"].superseded == stored.superseded
    assert total(svc, store, OCT) == Decimal("9.64")
    # a restart with the config file's (older) definition: the file wins, and says so
    again = CatalogService(store, CONFIG, FixedClock(NOV[0]))
    assert again.current.dimensions["d1"].aggregation == "sum"


def test_offering_prices_are_guarded_too_and_unbilled_changes_are_not(store: Store) -> None:
    svc = CatalogService(store, CONFIG, FixedClock(NOV[0]))
    finalize(store, OCT)
    dearer = CONFIG.offerings[0].model_copy(
        update={"charges": (Charge(dimension="d1", unit_price=Decimal(2)),)}
    )
    with pytest.raises(CatalogError, match="changing charges"):
        svc.put("offerings", dearer)
    svc.put("offerings", dearer.model_copy(update={"effective_from": iso("2026-11-01T00:00:00")}))
    assert (total(svc, store, OCT), total(svc, store, NOV)) == (Decimal("9.64"), Decimal("19.28"))
    for period, price in ((OCT, "1"), (NOV, "2")):  # an invoice's lines say the same
        doc = invoices.compute(store, svc.current, UTC_ZONE, "i", "c1", *period, NOV[0], period[1])
        assert (doc["lines"][0]["unitPrice"], doc["offeringId"]) == (price, "o")
    # a dimension no offering bills, and a name: no finalized period rates differently
    svc.put("dimensions", Dimension(id="free", name="Metered", aggregation="max"))
    svc.put("offerings", svc.current.offerings["o"].model_copy(update={"name": "Renamed"}))
    with pytest.raises(CatalogError, match="superseded: kept by the gateway"):
        svc.put("dimensions", SUM.model_copy(update={"superseded": (SUM,)}))


def test_without_finalized_invoices_a_change_applies_at_once(store: Store) -> None:
    svc = CatalogService(store, CONFIG, FixedClock(NOV[0]))
    finalize(store, OCT, "inv_void")
    store.invoice_void("inv_void", {}, {}, NOV[0], [], [])  # a void invoice frees its period
    svc.put("dimensions", SUM.model_copy(update={"aggregation": "max"}))
    assert (total(svc, store, OCT), total(svc, store, NOV)) == (Decimal("8.00"), Decimal("8.00"))


# --- a running gateway ----------------------------------------------------------------------


def stamp(delta: timedelta) -> str:
    return (datetime.now(UTC) + delta).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_the_put_from_sum_to_max_is_409_without_effective_from(client: httpx.Client) -> None:
    n = next_id()
    dim = {"id": f"peak-{n}", "name": "Data", "unit": "gigabyte", "aggregation": "sum"}
    assert client.post("/v1/dimensions", json=dim).status_code == 201
    offering = {"id": f"o-{n}", "name": "O", "currency": "USD",
                "charges": [{"dimension": f"peak-{n}", "unit_price": "1"}]}  # fmt: skip
    assert client.post("/v1/offerings", json=offering).status_code == 201
    cid = f"cc-{n}"
    r = client.post("/v1/customers", json={"id": cid, "name": "C", "offering": f"o-{n}"})
    assert r.status_code == 201, r.text
    period = {"from": stamp(timedelta(days=-3)), "to": stamp(timedelta(days=-1))}
    before = [
        {"id": f"cc-{n}-{i}", "timestamp": stamp(timedelta(days=-2)), "customerId": cid,
         "dimensionId": f"peak-{n}", "recordValue": v}
        for i, v in enumerate(("8.00", "1.64"))
    ]  # fmt: skip
    assert client.post("/v1/usage", json=before).json()["accepted"] == 2
    inv = client.post(f"/v1/customers/{cid}/invoices", json=period).json()
    final = client.post(f"/v1/invoices/{inv['id']}/finalize")
    assert final.json()["total"] == "9.64"
    stored = client.get(f"/v1/invoices/{inv['id']}").content

    r = client.put(f"/v1/dimensions/peak-{n}", json={**dim, "aggregation": "max"})
    assert r.status_code == 409, r.text
    assert "effective_from" in r.json()["error"]
    summary = client.get(f"/v1/customers/{cid}/usage-summary", params=period).json()
    assert summary["total"] == "9.64"
    as_max = {**dim, "aggregation": "max"}
    r = client.put(f"/v1/dimensions/peak-{n}", json={**as_max, "effective_from": period["from"]})
    assert r.status_code == 409, r.text
    r = client.put(f"/v1/dimensions/peak-{n}", json={**as_max, "effective_from": period["to"]})
    assert r.status_code == 200, r.text
    assert [v["aggregation"] for v in r.json()["superseded"]] == ["sum"]

    after = [{**rec, "id": rec["id"] + "-late", "timestamp": stamp(timedelta(hours=-1))}
             for rec in before]  # fmt: skip
    assert client.post("/v1/usage", json=after).json()["accepted"] == 2
    old = client.get(f"/v1/customers/{cid}/usage-summary", params=period).json()
    since = {"from": period["to"], "to": stamp(timedelta(hours=1))}
    new = client.get(f"/v1/customers/{cid}/usage-summary", params=since).json()
    assert (old["total"], new["total"]) == ("9.64", "8.00")
    assert client.get(f"/v1/invoices/{inv['id']}").content == stored
