"""Custom units (SPEC 11, Snowflake-like credits): charges convert usage into the offering's
credit unit at a rate, and the credits are priced, by any model, on one line that shows every
conversion; in-process over either store (METER_TEST_STORE) and through a running gateway."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from pydantic import ValidationError

from meter_gateway.billing import invoices, rating
from meter_gateway.catalog import Catalog, build
from meter_gateway.config import Charge, CreditUnit, Customer, Dimension, Offering
from meter_gateway.store import Store
from tests.helpers import commit, next_id, now_iso, open_store, rec, ts

UTC = ZoneInfo("UTC")
MAY = (ts("2026-05-01T00:00:00"), ts("2026-06-01T00:00:00"))


def catalog(credit: CreditUnit) -> Catalog:
    dims = {
        "compute": Dimension(id="compute", name="Compute", unit="minute"),
        "storage": Dimension(id="storage", name="Storage", unit="gigabyte"),
        "egress": Dimension(id="egress", name="Egress", unit="gigabyte", price=Decimal("0.05")),
    }
    charges = (
        Charge(dimension="compute", credits_per_unit=Decimal("0.5")),
        Charge(dimension="storage", credits_per_unit=Decimal("0.25"), included=Decimal(10)),
        Charge(dimension="egress"),  # priced in money, beside the credits
    )
    offering = Offering(id="o", name="Warehouse", currency="USD", charges=charges, credit=credit)
    return build(
        {
            "dimensions": dims,
            "offerings": {"o": offering},
            "customers": {"c1": Customer(id="c1", name="C1", offering="o")},
        }
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(tmp_path)
    commit(
        s,
        rec("2026-05-03T00:00:00", "30", dimension="compute"),  # 15 credits
        rec("2026-05-04T00:00:00", "50", dimension="storage"),  # 10 included: 40 → 10 credits
        rec("2026-05-05T00:00:00", "4", dimension="egress"),  # 0.20 USD
    )
    yield s
    s.close()


def test_usage_converts_into_credits_priced_on_one_line(store: Store) -> None:
    cat = catalog(CreditUnit(unit="credit", model="per_unit", unit_price=Decimal(2)))
    r = rating.rate(store, cat, "c1", *MAY, MAY[1], UTC)
    assert r.credit is not None
    assert [(ln.dimension.id, ln.credits) for ln in r.credit.conversions] == [
        ("compute", Decimal(15)),
        ("storage", Decimal(10)),
    ]
    assert (r.credit.credits, r.credit.amount) == (Decimal(25), Decimal("50.00"))
    assert r.total == Decimal("50.20")  # the credits and egress

    doc = invoices.compute(store, cat, UTC, "inv", "c1", *MAY, MAY[1], MAY[1])
    assert [ln.get("dimensionId", ln.get("name")) for ln in doc["lines"]] == ["egress", "Credits"]
    credit = doc["lines"][1]
    assert {k: credit[k] for k in ("quantity", "unit", "unitPrice", "amount")} == {
        "quantity": "25", "unit": "credit", "unitPrice": "2", "amount": "50.00"
    }  # fmt: skip
    assert credit["conversions"] == [
        {"dimensionId": "compute", "name": "Compute", "quantity": "30", "unit": "minute",
         "creditsPerUnit": "0.5", "credits": "15"},
        {"dimensionId": "storage", "name": "Storage", "quantity": "50", "unit": "gigabyte",
         "included": "10", "billedQuantity": "40", "creditsPerUnit": "0.25", "credits": "10"},
    ]  # fmt: skip
    assert doc["subtotal"] == "50.20"


def test_credits_priced_by_tiers_with_included_credits(store: Store) -> None:
    unit = CreditUnit(
        unit="credit", name="Warehouse credits", model="graduated", included=Decimal(5),
        tiers=({"up_to": 10, "unit_price": "3"}, {"up_to": None, "unit_price": "2"}),
    )  # fmt: skip
    r = rating.rate(store, catalog(unit), "c1", *MAY, MAY[1], UTC)
    assert r.credit is not None
    # 25 credits, 5 included: 20 priced, 10 × 3 + 10 × 2
    assert (r.credit.billed, r.credit.amount) == (Decimal(20), Decimal("50.00"))
    assert [t.units for t in r.credit.priced.breakdown] == [Decimal(10), Decimal(10)]


def test_a_charge_in_credits_needs_a_credit_unit_and_no_price() -> None:
    with pytest.raises(ValidationError, match="needs a credit unit"):
        Offering(id="o", name="O", charges=({"dimension": "d", "credits_per_unit": "1"},))
    with pytest.raises(ValidationError, match="priced by the offering's credit unit"):
        Charge(dimension="d", credits_per_unit=Decimal(1), unit_price=Decimal(1))
    with pytest.raises(ValidationError, match="unit_price"):
        CreditUnit(model="per_unit")


def test_credits_over_http(client: httpx.Client) -> None:
    n = next_id()
    offering: dict[str, Any] = {
        "id": f"wh-{n}", "name": "Warehouse", "currency": "USD",
        "credit": {"unit": "credit", "model": "per_unit", "unit_price": "3"},
        "charges": [{"dimension": "compute-time", "credits_per_unit": "0.5"},
                    {"dimension": "data-processed", "credits_per_unit": "2"}],
    }  # fmt: skip
    assert client.post("/v1/offerings", json=offering).status_code == 201
    cid = f"wh-{n}"
    r = client.post("/v1/customers", json={"id": cid, "name": "W", "offering": f"wh-{n}"})
    assert r.status_code == 201, r.text
    records = [
        {"id": f"wh-{n}-1", "timestamp": now_iso(), "customerId": cid,
         "dimensionId": "compute-time", "recordValue": "30"},  # one started hour: 1 × 0.5
        {"id": f"wh-{n}-2", "timestamp": now_iso(), "customerId": cid,
         "dimensionId": "data-processed", "recordValue": "1.25"},  # 2.5 credits
    ]  # fmt: skip
    assert client.post("/v1/usage", json=records).json()["accepted"] == 2
    summary = client.get(f"/v1/customers/{cid}/usage-summary").json()
    assert [(d["dimensionId"], d["credits"], d["amount"]) for d in summary["dimensions"]] == [
        ("compute-time", "0.5", None),
        ("data-processed", "2.5", None),
    ]
    assert (summary["credit"]["quantity"], summary["credit"]["amount"]) == ("3", "9.00")
    assert summary["total"] == "9.00"
    doc = client.post(f"/v1/customers/{cid}/invoices", json={}).json()
    [line] = doc["lines"]
    assert (line["name"], line["amount"], len(line["conversions"])) == ("Credits", "9.00", 2)
