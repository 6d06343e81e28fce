"""Invoices over real HTTP against an in-process gateway with a fixed clock and a real store:
the SPEC §5 shape, totals as sums of rounded lines, drafts that follow usage, finalized invoices
that never change, wallet draw-down, scopes, and golden JSON/CSV/HTML renditions.

Regenerate the golden files with ``UPDATE_GOLDEN=1 pytest tests/billing/test_invoices.py`` and
review the diff.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
from collections.abc import Iterator
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from meter_gateway.clock import FixedClock
from meter_gateway.service import Gateway
from tests.billing.appserver import serve
from tests.gatewayproc import BASE_CONFIG, READ_KEY
from tests.helpers import ts

GOLDEN = Path(__file__).parent.parent / "testdata" / "invoices"
MAY = {"from": "2026-05-01T00:00:00Z", "to": "2026-06-01T00:00:00Z"}

CONFIG: dict[str, Any] = {
    "auth": BASE_CONFIG["auth"],
    "dimensions": [
        {"id": "data", "name": "Data <Processed> & \"more\"", "unit": "gigabyte",
         "price": "0.005", "unit_cost": "0.001"},
        {"id": "compute", "name": "Compute Time", "unit": "minute",
         "aggregation_interval": "hour", "usage_increment": 60, "rounding": "ceil"},
        {"id": "users", "name": "Active Users", "unit": "user", "aggregation": "unique_count",
         "unique_key": "user_id"},
        {"id": "calls", "name": "=cmd|' /C calc'!A0", "unit": "call"},
    ],
    "offerings": [
        {"id": "plan", "name": "Plan", "currency": "USD", "charges": [
            {"dimension": "data", "model": "per_unit"},
            {"dimension": "compute", "model": "graduated", "tiers": [
                {"up_to": 2, "unit_price": "0.5", "flat_fee": "1"},
                {"up_to": None, "unit_price": "0.25", "flat_fee": "0.005"}]},
            {"dimension": "users", "model": "package", "package_size": 10,
             "package_price": "50", "free_units": 5},
            {"dimension": "calls", "model": "volume", "tiers": [
                {"up_to": 100, "unit_price": "0.001"},
                {"up_to": None, "unit_price": "0.0005", "flat_fee": "2"}]},
        ]},
        {"id": "yen", "name": "Yen plan", "currency": "JPY", "charges": [
            {"dimension": "data", "model": "per_unit", "unit_price": "1.5"}]},
    ],
    "customers": [
        {"id": "acme", "name": "Acme <script>alert('x')</script> & Co", "offering": "plan",
         "aliases": ["acme-prod"]},
        {"id": "kaisha", "name": "Kaisha KK", "offering": "yen"},
        {"id": "idle", "name": "Idle Ltd", "offering": "plan"},
    ],
}  # fmt: skip


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(ts("2026-05-20T12:00:00"))


@pytest.fixture
def gateway(tmp_path: Path, clock: FixedClock) -> Iterator[tuple[Gateway, httpx.Client]]:
    ids = (f"inv_test{i}" for i in itertools.count(1))
    with serve(tmp_path, CONFIG, clock) as (gw, client):
        gw.invoices.new_id = lambda: next(ids)
        yield gw, client


def usage(client: httpx.Client, *records: tuple[str, str, str, str]) -> None:
    body = [
        {"timestamp": t, "customerId": c, "dimensionId": d, "recordValue": v}
        for c, d, t, v in records
    ]
    r = client.post("/v1/usage", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == len(body), r.text


def seed(client: httpx.Client) -> None:
    usage(
        client,
        ("acme", "data", "2026-05-02T10:00:00Z", "1"),  # 1 GB × 0.005 = 0.005 → 0.01
        ("acme", "compute", "2026-05-02T10:05:00Z", "61"),  # ceil(61/60) = 2 hours
        ("acme", "compute", "2026-05-03T10:05:00Z", "1"),  # + 1 hour = 3
        ("acme-prod", "calls", "2026-05-04T00:00:00Z", "101"),  # one past the volume bound
    )
    for i in range(6):  # 6 users: one past the 5 free units → one package
        r = client.post(
            "/v1/usage",
            json={
                "timestamp": "2026-05-05T00:00:00Z",
                "customerId": "acme",
                "dimensionId": "users",
                "recordValue": 1,
                "metadata": {"user_id": f"u{i}"},
            },
        )
        assert r.status_code == 200


def golden(name: str, body: bytes) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_bytes(body)
    assert body == path.read_bytes(), f"{name} differs from the golden file"


def test_invoice_has_the_spec_shape_and_every_charge_as_a_line(
    gateway: tuple[Gateway, httpx.Client],
) -> None:
    _, client = gateway
    r = client.post("/v1/customers/idle/invoices", json=MAY)
    assert r.status_code == 201, r.text
    inv = r.json()
    for key in ("id", "customerId", "currency", "from", "to", "status", "lines", "subtotal"):
        assert key in inv
    assert (inv["customerId"], inv["currency"], inv["status"]) == ("idle", "USD", "draft")
    assert (inv["from"], inv["to"]) == (MAY["from"], MAY["to"])
    # no usage at all, yet every charge is a line; graduated charges its first flat fee at 0
    assert [(ln["dimensionId"], ln["quantity"], ln["amount"]) for ln in inv["lines"]] == [
        ("data", "0", "0.00"),
        ("compute", "0", "1.00"),
        ("users", "0", "0.00"),
        ("calls", "0", "0.00"),
    ]
    assert [ln["unit"] for ln in inv["lines"]] == ["gigabyte", "minute", "user", "call"]
    assert (inv["subtotal"], inv["total"], inv["amountDue"]) == ("1.00", "1.00", "1.00")


def test_total_is_the_sum_of_rounded_lines(gateway: tuple[Gateway, httpx.Client]) -> None:
    _, client = gateway
    seed(client)
    inv = client.post("/v1/customers/acme/invoices", json=MAY).json()
    lines = {ln["dimensionId"]: ln for ln in inv["lines"]}
    assert (lines["data"]["exactAmount"], lines["data"]["amount"]) == ("0.005", "0.01")
    # 2 × 0.5 + 1 + 1 × 0.25 + 0.005 = 2.255 → 2.26 (half-up)
    assert (lines["compute"]["quantity"], lines["compute"]["exactAmount"]) == ("3", "2.255")
    assert lines["compute"]["amount"] == "2.26"
    assert [t["units"] for t in lines["compute"]["tiers"]] == ["2", "1"]
    assert (lines["users"]["quantity"], lines["users"]["amount"]) == ("6", "50.00")
    assert lines["users"]["package"]["packages"] == "1"
    # 101 calls: all in the second volume tier, 101 × 0.0005 + 2 = 2.0505 → 2.05
    assert (lines["calls"]["exactAmount"], lines["calls"]["amount"]) == ("2.0505", "2.05")
    rounded_sum = sum((Decimal(ln["amount"]) for ln in inv["lines"]), Decimal(0))
    assert inv["total"] == str(rounded_sum) == "54.32"
    exact_sum = sum((Decimal(ln["exactAmount"]) for ln in inv["lines"]), Decimal(0))
    assert exact_sum == Decimal("54.3105")  # rounding the exact sum would give 54.31


def test_zero_decimal_currency_rounds_to_whole_yen(gateway: tuple[Gateway, httpx.Client]) -> None:
    _, client = gateway
    usage(client, ("kaisha", "data", "2026-05-02T00:00:00Z", "3"))  # 3 × 1.5 = 4.5 → 5
    inv = client.post("/v1/customers/kaisha/invoices", json=MAY).json()
    assert (inv["currency"], inv["lines"][0]["amount"], inv["total"]) == ("JPY", "5", "5")


def test_each_line_carries_the_usage_query_that_reproduces_its_quantity(
    gateway: tuple[Gateway, httpx.Client],
) -> None:
    _, client = gateway
    seed(client)
    inv = client.post("/v1/customers/acme/invoices", json=MAY).json()
    compute = next(ln for ln in inv["lines"] if ln["dimensionId"] == "compute")
    windows = client.get(compute["usage"]["query"]).json()["data"]
    # ceil(value / 60) per hour window
    hours = sum((Decimal(w["value"]) / 60).to_integral_value(ROUND_CEILING) for w in windows)
    assert str(hours) == compute["quantity"] == "3"
    data = next(ln for ln in inv["lines"] if ln["dimensionId"] == "data")
    records = client.get(data["usage"]["query"]).json()["data"]
    assert str(sum(Decimal(r["recordValue"]) for r in records)) == data["quantity"]


def test_a_period_ending_in_the_future_is_billed_to_date(
    gateway: tuple[Gateway, httpx.Client], clock: FixedClock
) -> None:
    _, client = gateway
    usage(client, ("acme", "data", "2026-05-20T11:00:00Z", "2"))
    inv = client.post("/v1/customers/acme/invoices", json=MAY).json()
    assert inv["asOf"] == "2026-05-20T12:00:00Z"
    assert inv["lines"][0]["quantity"] == "2"
    clock.advance(3600)
    usage(client, ("acme", "data", "2026-05-20T12:30:00Z", "3"))
    again = client.get(f"/v1/invoices/{inv['id']}").json()  # a draft is recomputed
    assert (again["asOf"], again["lines"][0]["quantity"]) == ("2026-05-20T13:00:00Z", "5")


def test_finalized_invoice_stays_byte_identical_after_more_usage_and_price_changes(
    gateway: tuple[Gateway, httpx.Client],
) -> None:
    _, client = gateway
    seed(client)
    inv = client.post("/v1/customers/acme/invoices", json=MAY).json()
    final = client.post(f"/v1/invoices/{inv['id']}/finalize")
    assert final.status_code == 200
    before = {f: client.get(f"/v1/invoices/{inv['id']}", params={"format": f}) for f in FORMATS}
    assert before["json"].content == final.content
    usage(client, ("acme", "data", "2026-05-03T00:00:00Z", "1000"))  # inside the period
    dim = next(d for d in CONFIG["dimensions"] if d["id"] == "data")
    # a price change that would rate the finalized May again is refused (SPEC 11) ...
    r = client.put("/v1/dimensions/data", json={**dim, "price": "9"})
    assert r.status_code == 409, r.text
    # ... unless it applies from the end of the last finalized period on
    r = client.put("/v1/dimensions/data", json={**dim, "price": "9", "effective_from": MAY["to"]})
    assert r.status_code == 200, r.text
    for f in FORMATS:
        after = client.get(f"/v1/invoices/{inv['id']}", params={"format": f})
        assert after.content == before[f].content
        assert after.headers["content-type"] == before[f].headers["content-type"]
    again = client.post(f"/v1/invoices/{inv['id']}/finalize")  # idempotent
    assert again.content == final.content
    # ... while a new draft for the same period sees the new usage and price
    draft = client.post("/v1/customers/acme/invoices", json=MAY).json()
    assert draft["lines"][0]["quantity"] == "1001"


FORMATS = ("json", "csv", "html")


def test_renditions_match_the_golden_files(gateway: tuple[Gateway, httpx.Client]) -> None:
    _, client = gateway
    seed(client)
    r = client.post("/v1/customers/acme/wallet/top-ups", json={"amount": "10.50", "id": "t1"})
    assert r.status_code == 201, r.text
    inv = client.post("/v1/customers/acme/invoices", json=MAY).json()
    client.post(f"/v1/invoices/{inv['id']}/finalize")
    for f in FORMATS:
        body = client.get(f"/v1/invoices/{inv['id']}", params={"format": f}).content
        golden(f"plain.{f}", body)


def test_csv_has_one_row_per_line_and_defuses_formulas(
    gateway: tuple[Gateway, httpx.Client],
) -> None:
    _, client = gateway
    inv = client.post("/v1/customers/acme/invoices", json=MAY).json()
    text = client.get(f"/v1/invoices/{inv['id']}", params={"format": "csv"}).text
    header, *rows = list(csv.reader(io.StringIO(text)))
    assert len(rows) == len(inv["lines"]) == 4
    assert [r[header.index("amount")] for r in rows] == [ln["amount"] for ln in inv["lines"]]
    assert rows[3][header.index("name")] == "'=cmd|' /C calc'!A0"


def test_html_names_the_customer_and_escapes_everything(
    gateway: tuple[Gateway, httpx.Client],
) -> None:
    _, client = gateway
    inv = client.post("/v1/customers/acme/invoices", json=MAY).json()
    page = client.get(f"/v1/invoices/{inv['id']}", params={"format": "html"}).text
    assert "Acme &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; Co" in page
    assert "<script>" not in page
    assert "Data &lt;Processed&gt; &amp; &quot;more&quot;" in page
    for ln in inv["lines"]:
        assert f'<td class="n">US${ln["amount"]}</td>' in page  # to the cent, en_GB


def test_finalizing_draws_the_wallet_down_exactly(gateway: tuple[Gateway, httpx.Client]) -> None:
    _, client = gateway
    seed(client)  # total 54.32
    top = client.post("/v1/customers/acme/wallet/top-ups", json={"amount": "30.01", "id": "t1"})
    assert top.status_code == 201
    again = client.post("/v1/customers/acme/wallet/top-ups", json={"amount": "30.01", "id": "t1"})
    assert (again.status_code, again.json()["balance"]) == (200, "30.01")  # same top-up
    bad = client.post("/v1/customers/acme/wallet/top-ups", json={"amount": "0.001"})
    assert bad.status_code == 422
    first = client.post("/v1/customers/acme/invoices", json=MAY).json()
    done = client.post(f"/v1/invoices/{first['id']}/finalize").json()
    assert (done["creditsApplied"], done["amountDue"], done["walletBalance"]) == (
        "30.01",
        "24.31",
        "0.00",
    )
    client.post("/v1/customers/acme/wallet/top-ups", json={"amount": "100"})
    june = {"from": "2026-06-01T00:00:00Z", "to": "2026-07-01T00:00:00Z"}
    second = client.post("/v1/customers/acme/invoices", json=june).json()
    done = client.post(f"/v1/invoices/{second['id']}/finalize").json()
    assert (done["total"], done["creditsApplied"], done["amountDue"]) == ("1.00", "1.00", "0.00")
    wallet = client.get("/v1/customers/acme/wallet").json()
    assert wallet["balances"] == [{"currency": "USD", "balance": "99.00"}]
    assert [(e["kind"], e["amount"], e["balance"]) for e in wallet["entries"]] == [
        ("top_up", "30.01", "30.01"),
        ("invoice", "-30.01", "0.00"),
        ("top_up", "100.00", "100.00"),
        ("invoice", "-1.00", "99.00"),
    ]
    metrics = client.get("/metrics").text
    assert 'meter_gateway_wallet_balance{currency="USD",customer="acme"} 99.0' in metrics
    listed = client.get("/v1/customers/acme/invoices").json()["data"]
    assert [(i["id"], i["status"]) for i in listed] == [
        (first["id"], "finalized"),
        (second["id"], "finalized"),
    ]


def test_scopes_admin_creates_and_finalizes_read_reads(
    gateway: tuple[Gateway, httpx.Client],
) -> None:
    _, client = gateway
    inv = client.post("/v1/customers/acme/invoices", json=MAY).json()
    read = {"Authorization": f"Bearer {READ_KEY}"}
    assert client.post("/v1/customers/acme/invoices", json=MAY, headers=read).status_code == 403
    assert client.post(f"/v1/invoices/{inv['id']}/finalize", headers=read).status_code == 403
    top_up = client.post("/v1/customers/acme/wallet/top-ups", json={"amount": "1"}, headers=read)
    assert top_up.status_code == 403
    assert client.get(f"/v1/invoices/{inv['id']}", headers=read).status_code == 200
    assert client.get("/v1/customers/acme/wallet", headers=read).status_code == 200
    anonymous = httpx.get(f"{str(client.base_url).rstrip('/')}/v1/invoices/{inv['id']}")
    assert anonymous.status_code == 401


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"from": "2026-06-01T00:00:00Z", "to": "2026-05-01T00:00:00Z"}, 400, "after"),
        ({"from": "yesterday"}, 400, "from"),
        ([1, 2], 400, "JSON object"),
    ],
)
def test_bad_invoice_requests_say_why(
    gateway: tuple[Gateway, httpx.Client], body: Any, status: int, message: str
) -> None:
    _, client = gateway
    r = client.post("/v1/customers/acme/invoices", json=body)
    assert r.status_code == status
    assert message in r.json()["error"]
    assert client.post("/v1/customers/nobody/invoices", json=MAY).status_code == 404
    assert client.get("/v1/invoices/inv_nope").status_code == 404
    assert client.get("/v1/invoices/inv_nope/x").status_code == 404
