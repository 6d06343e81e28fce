"""The invoice lifecycle (SPEC 11) over real HTTP against an in-process gateway with a fixed
clock, on the store of METER_TEST_STORE: one gapless number sequence (also under concurrent
finalizes), manual items, void (credits back, the period free again, invoice.voided), draft
deletion, the list across customers with its filters, and finalized invoices stored before
numbers existed served byte for byte."""

from __future__ import annotations

import csv
import io
import itertools
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from meter_gateway.clock import FixedClock
from meter_gateway.service import Gateway
from meter_gateway.store.base import InvoiceRow, PeriodInvoicedError
from tests.billing.appserver import serve
from tests.gatewayproc import BASE_CONFIG, READ_KEY
from tests.helpers import ts

GOLDEN = Path(__file__).parent.parent / "testdata" / "invoices"
MAY = {"from": "2026-05-01T00:00:00Z", "to": "2026-06-01T00:00:00Z"}
JUNE = {"from": "2026-06-01T00:00:00Z", "to": "2026-07-01T00:00:00Z"}

CONFIG: dict[str, Any] = {
    "auth": BASE_CONFIG["auth"],
    "ingest": {"late_arrival_limit": "400d"},
    "dimensions": [{"id": "data", "name": "Data", "unit": "gigabyte", "price": "0.125"}],
    "offerings": [
        {"id": "plan", "name": "Plan", "currency": "USD",
         "charges": [{"dimension": "data", "model": "per_unit"}]},
        {"id": "yen", "name": "Yen", "currency": "JPY",
         "charges": [{"dimension": "data", "model": "per_unit", "unit_price": "3"}]},
    ],
    "customers": [
        {"id": "acme", "name": "Acme", "offering": "plan", "aliases": ["acme-prod"]},
        {"id": "kaisha", "name": "Kaisha", "offering": "yen"},
        *({"id": f"c{i}", "name": f"C{i}", "offering": "plan"} for i in range(12)),
    ],
}  # fmt: skip


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(ts("2026-07-02T12:00:00"))


@pytest.fixture
def gateway(tmp_path: Path, clock: FixedClock) -> Iterator[tuple[Gateway, httpx.Client]]:
    ids = (f"inv_life{i}" for i in itertools.count(1))
    events = {"files": [{"name": "events", "path": str(tmp_path / "events.ndjson")}]}
    with serve(tmp_path, {**CONFIG, "exporters": events}, clock) as (gw, client):
        gw.invoices.new_id = lambda: next(ids)
        yield gw, client


def usage(client: httpx.Client, customer: str, when: str, value: str) -> None:
    r = client.post(
        "/v1/usage",
        json={"timestamp": when, "customerId": customer, "dimensionId": "data",
              "recordValue": value},
    )  # fmt: skip
    assert (r.status_code, r.json()["accepted"]) == (200, 1), r.text


def create(client: httpx.Client, customer: str, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post(f"/v1/customers/{customer}/invoices", json=body)
    assert r.status_code == 201, r.text
    doc: dict[str, Any] = r.json()
    return doc


def finalize(client: httpx.Client, invoice_id: str) -> dict[str, Any]:
    r = client.post(f"/v1/invoices/{invoice_id}/finalize")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def csv_rows(client: httpx.Client, invoice_id: str) -> list[dict[str, str]]:
    text = client.get(f"/v1/invoices/{invoice_id}", params={"format": "csv"}).text
    return list(csv.DictReader(io.StringIO(text)))


def events(gw: Gateway) -> list[tuple[str, str]]:
    return [(e.type, e.event_id) for e in gw.store.outbox_claim("events", 2**62, 1000)]


# --- numbers -----------------------------------------------------------------------------------


def test_drafts_have_no_number_and_finalized_invoices_take_the_next_one(
    gateway: tuple[Gateway, httpx.Client],
) -> None:
    gw, client = gateway
    usage(client, "acme", "2026-05-03T00:00:00Z", "8")
    may = create(client, "acme", MAY)
    assert (may["number"], may["status"]) == (None, "draft")
    assert [ln["type"] for ln in may["lines"]] == ["usage"]
    june = create(client, "acme", JUNE)
    yen = create(client, "kaisha", MAY)
    # numbered in the order of finalization, whatever the order of creation
    assert finalize(client, june["id"])["number"] == "INV-000001"
    assert finalize(client, may["id"])["number"] == "INV-000002"
    assert finalize(client, may["id"])["number"] == "INV-000002"  # idempotent: no new number
    assert finalize(client, yen["id"])["number"] == "INV-000003"
    shown = client.get(f"/v1/invoices/{may['id']}", params={"format": "html"}).text
    assert "<h1>Invoice INV-000002</h1>" in shown
    (row,) = csv_rows(client, may["id"])
    assert (row["invoice_number"], row["line_type"]) == ("INV-000002", "usage")
    listed = client.get("/v1/customers/acme/invoices").json()["data"]
    assert [(i["id"], i["number"]) for i in listed] == [
        (may["id"], "INV-000002"),
        (june["id"], "INV-000001"),
    ]
    assert events(gw) == [
        ("invoice.finalized", f"invoice/{june['id']}/finalized"),
        ("invoice.finalized", f"invoice/{may['id']}/finalized"),
        ("invoice.finalized", f"invoice/{yen['id']}/finalized"),
    ]


def test_numbers_stay_gapless_under_concurrent_finalizes_that_also_fail(
    gateway: tuple[Gateway, httpx.Client],
) -> None:
    """Threads finalize 24 drafts at once; 6 of them are second drafts of a period another
    draft holds, so their finalization fails after the store took a number: the sequence
    must still have no gap and no duplicate."""
    gw, client = gateway
    top = client.post("/v1/customers/c0/wallet/top-ups", json={"amount": "5"})
    assert top.status_code == 201
    drafts = []
    for i in range(12):
        usage(client, f"c{i}", "2026-05-02T00:00:00Z", str(i + 1))
        drafts.append(create(client, f"c{i}", MAY)["id"])
        drafts.append(create(client, f"c{i}", JUNE)["id"])
    clashes = [create(client, f"c{i}", MAY)["id"] for i in range(6)]
    results: dict[str, str] = {}
    barrier = threading.Barrier(8)
    work = iter(drafts + clashes)
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        while True:
            with lock:
                invoice_id = next(work, None)
            if invoice_id is None:
                return
            try:
                row = gw.invoices.finalize(invoice_id)
                results[invoice_id] = row.number or "?"
            except PeriodInvoicedError:
                results[invoice_id] = "clash"

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    numbers = sorted(n for n in results.values() if n != "clash")
    assert numbers == [f"INV-{n:06d}" for n in range(1, 25)]
    assert list(results.values()).count("clash") == 6
    # per customer and period, exactly one finalized invoice
    finalized = client.get("/v1/invoices", params={"status": "finalized", "limit": 100}).json()
    periods = [(i["customerId"], i["from"]) for i in finalized["data"]]
    assert len(periods) == len(set(periods)) == 24
    # the wallet was drawn exactly once
    wallet = client.get("/v1/customers/c0/wallet").json()
    assert [e["kind"] for e in wallet["entries"]] == ["top_up", "invoice"]


# --- items ------------------------------------------------------------------------------------


def test_manual_items_are_exact_lines_of_type_item_kept_through_finalization(
    gateway: tuple[Gateway, httpx.Client], clock: FixedClock
) -> None:
    _, client = gateway
    usage(client, "acme", "2026-05-03T00:00:00Z", "1")  # 0.125 → 0.13
    body = {
        **MAY,
        "items": [
            {"description": "Onboarding", "quantity": 1, "unitPrice": "500"},
            {"description": "Support hours", "quantity": "2.5", "unitPrice": "0.333"},
        ],
    }
    draft = create(client, "acme", body)
    assert draft["lines"][1:] == [
        {"type": "item", "description": "Onboarding", "quantity": "1", "unitPrice": "500",
         "exactAmount": "500", "amount": "500.00"},
        {"type": "item", "description": "Support hours", "quantity": "2.5", "unitPrice": "0.333",
         "exactAmount": "0.8325", "amount": "0.83"},
    ]  # fmt: skip
    assert draft["total"] == str(Decimal("0.13") + Decimal("500.00") + Decimal("0.83"))
    # a draft is recomputed from usage, and keeps its items
    usage(client, "acme", "2026-05-04T00:00:00Z", "1")
    clock.advance(60)
    again = client.get(f"/v1/invoices/{draft['id']}").json()
    assert (again["lines"][0]["amount"], again["total"]) == ("0.25", "501.08")
    assert again["lines"][1:] == draft["lines"][1:]
    done = finalize(client, draft["id"])
    assert (done["total"], done["lines"][1:]) == ("501.08", draft["lines"][1:])
    onboarding = csv_rows(client, draft["id"])[1]
    assert {k: onboarding[k] for k in ("name", "quantity", "unit_price", "amount")} == {
        "name": "Onboarding", "quantity": "1", "unit_price": "500", "amount": "500.00",
    }  # fmt: skip
    assert (onboarding["invoice_number"], onboarding["line_type"]) == ("INV-000001", "item")
    page = client.get(f"/v1/invoices/{draft['id']}", params={"format": "html"}).text
    assert "<td>Support hours</td>" in page


def test_items_round_to_the_currencys_minor_unit(gateway: tuple[Gateway, httpx.Client]) -> None:
    _, client = gateway
    body = {**MAY, "items": [{"description": "Setup", "quantity": 3, "unitPrice": "0.5"}]}
    draft = create(client, "kaisha", body)
    assert (draft["lines"][1]["exactAmount"], draft["lines"][1]["amount"]) == ("1.5", "2")
    assert draft["total"] == "2"


@pytest.mark.parametrize(
    ("items", "field"),
    [
        ([{"description": "x", "quantity": 0, "unitPrice": "1"}], "items.0.quantity"),
        ([{"description": "x", "quantity": 1, "unitPrice": "-1"}], "items.0.unitPrice"),
        ([{"description": "", "quantity": 1, "unitPrice": "1"}], "items.0.description"),
        ([{"description": "x", "quantity": 1, "unitPrice": "1", "tax": 1}], "items.0.tax"),
        ([{"description": "x", "quantity": "1e999", "unitPrice": "1"}], "items.0.quantity"),
    ],
)
def test_bad_items_are_refused_naming_the_field(
    gateway: tuple[Gateway, httpx.Client], items: list[dict[str, Any]], field: str
) -> None:
    gw, client = gateway
    r = client.post("/v1/customers/acme/invoices", json={**MAY, "items": items})
    assert r.status_code == 422, r.text
    assert field in r.json()["error"]
    assert gw.store.invoice_list(None, None, 10) == []


# --- void and delete ---------------------------------------------------------------------------


def test_void_gives_the_credits_back_and_frees_the_period(
    gateway: tuple[Gateway, httpx.Client], clock: FixedClock
) -> None:
    gw, client = gateway
    usage(client, "acme", "2026-05-03T00:00:00Z", "80")  # 80 × 0.125 = 10.00
    assert client.post("/v1/customers/acme/wallet/top-ups", json={"amount": "6"}).status_code == 201
    first = finalize(client, create(client, "acme", MAY)["id"])
    assert (first["creditsApplied"], first["amountDue"]) == ("6.00", "4.00")
    second = create(client, "acme", MAY)
    taken = client.post(f"/v1/invoices/{second['id']}/finalize")
    assert taken.status_code == 409
    assert "already invoiced by INV-000001" in taken.json()["error"]
    finalized_bytes = client.get(f"/v1/invoices/{first['id']}").content

    clock.advance(3600)
    r = client.post(f"/v1/invoices/{first['id']}/void")
    assert r.status_code == 200, r.text
    void = r.json()
    assert (void["status"], void["number"], void["voidedAt"]) == (
        "void", "INV-000001", "2026-07-02T13:00:00Z",
    )  # fmt: skip
    assert (void["creditsApplied"], void["creditsReturned"], void["total"]) == (
        "6.00", "6.00", "10.00",
    )  # fmt: skip
    assert client.get(f"/v1/invoices/{first['id']}").content == r.content != finalized_bytes
    page = client.get(f"/v1/invoices/{first['id']}", params={"format": "html"}).text
    assert "VOID since 2 Jul 2026, 13:00:00" in page  # the customer's locale (en_GB)
    again = client.post(f"/v1/invoices/{first['id']}/void")
    assert (again.status_code, again.content) == (200, r.content)  # idempotent
    wallet = client.get("/v1/customers/acme/wallet").json()
    assert wallet["balances"] == [{"currency": "USD", "balance": "6.00"}]
    assert [(e["kind"], e["amount"], e["balance"], e["reference"]) for e in wallet["entries"]] == [
        ("top_up", "6.00", "6.00", None),
        ("invoice", "-6.00", "0.00", first["id"]),
        ("void", "6.00", "6.00", first["id"]),
    ]
    # the period is free: the other draft finalizes now, with the next number and the credits
    redo = finalize(client, second["id"])
    assert (redo["number"], redo["creditsApplied"], redo["amountDue"]) == (
        "INV-000002", "6.00", "4.00",
    )  # fmt: skip
    assert events(gw) == [
        ("invoice.finalized", f"invoice/{first['id']}/finalized"),
        ("invoice.voided", f"invoice/{first['id']}/voided"),
        ("invoice.finalized", f"invoice/{second['id']}/finalized"),
    ]
    assert client.post(f"/v1/invoices/{first['id']}/finalize").status_code == 409
    assert client.delete(f"/v1/invoices/{first['id']}").status_code == 409


def test_drafts_are_deleted_not_voided_and_finalized_ones_voided_not_deleted(
    gateway: tuple[Gateway, httpx.Client],
) -> None:
    _, client = gateway
    draft = create(client, "acme", MAY)
    r = client.post(f"/v1/invoices/{draft['id']}/void")
    assert r.status_code == 409
    assert "delete it" in r.json()["error"]
    read = {"Authorization": f"Bearer {READ_KEY}"}
    assert client.delete(f"/v1/invoices/{draft['id']}", headers=read).status_code == 403
    assert client.delete(f"/v1/invoices/{draft['id']}").status_code == 204
    assert client.get(f"/v1/invoices/{draft['id']}").status_code == 404
    assert client.delete(f"/v1/invoices/{draft['id']}").status_code == 404
    done = finalize(client, create(client, "acme", MAY)["id"])
    r = client.delete(f"/v1/invoices/{done['id']}")
    assert r.status_code == 409
    assert "void it instead" in r.json()["error"]
    assert client.post("/v1/invoices/inv_nope/void").status_code == 404
    assert client.post(f"/v1/invoices/{done['id']}/void", headers=read).status_code == 403


# --- listing -----------------------------------------------------------------------------------


def test_invoices_are_listed_across_customers_with_filters(
    gateway: tuple[Gateway, httpx.Client],
) -> None:
    _, client = gateway
    a_may = finalize(client, create(client, "acme", MAY)["id"])
    a_june = create(client, "acme", JUNE)
    k_may = finalize(client, create(client, "kaisha", MAY)["id"])
    client.post(f"/v1/invoices/{k_may['id']}/void")
    k_june = create(client, "kaisha", JUNE)

    def ids(**q: str) -> list[str]:
        r = client.get("/v1/invoices", params=q)
        assert r.status_code == 200, r.text
        return [i["id"] for i in r.json()["data"]]

    assert ids() == [a_may["id"], a_june["id"], k_may["id"], k_june["id"]]
    assert ids(status="draft") == [a_june["id"], k_june["id"]]
    assert ids(status="finalized") == [a_may["id"]]
    assert ids(status="void") == [k_may["id"]]
    assert ids(customerId="acme-prod") == [a_may["id"], a_june["id"]]  # an alias
    assert ids(**{"from": "2026-06-01T00:00:00Z"}) == [a_june["id"], k_june["id"]]
    assert ids(to="2026-06-01T00:00:00Z") == [a_may["id"], k_may["id"]]
    assert ids(**{"from": "2026-05-31T00:00:00Z", "to": "2026-06-02T00:00:00Z"}) == ids()
    assert ids(customerId="kaisha", status="void", to="2026-05-02T00:00:00Z") == [k_may["id"]]
    page = client.get("/v1/invoices", params={"limit": 3}).json()
    assert client.get("/v1/invoices", params={"cursor": page["cursor"]}).json()["data"] == [
        s for s in client.get("/v1/invoices").json()["data"] if s["id"] == k_june["id"]
    ]
    (void,) = [s for s in page["data"] if s["id"] == k_may["id"]]
    assert (void["status"], void["number"], void["voidedAt"]) == (
        "void", "INV-000002", "2026-07-02T12:00:00Z",
    )  # fmt: skip
    for bad, parameter in [
        ({"status": "paid"}, "status"),
        ({"from": "yesterday"}, "from"),
        ({"from": "2026-06-01T00:00:00Z", "to": "2026-05-01T00:00:00Z"}, "to"),
        ({"number": "INV-000001"}, "number"),
    ]:
        r = client.get("/v1/invoices", params=bad)
        assert (r.status_code, r.json().get("parameter")) == (400, parameter), r.text
    assert client.get("/v1/invoices", params={"customerId": "nobody"}).status_code == 404


# --- invoices finalized before numbers ----------------------------------------------------------


def test_invoices_finalized_before_numbers_keep_their_bytes(
    gateway: tuple[Gateway, httpx.Client],
) -> None:
    """A finalized invoice stored by an earlier version (no number, no line types, no period
    columns) is served byte for byte, gets its period at start-up, and can be voided."""
    gw, client = gateway
    stored = {f: (GOLDEN / f"finalized.{f}").read_bytes() for f in ("json", "csv", "html")}
    doc = orjson.loads(stored["json"])
    legacy = InvoiceRow(
        doc["id"], "acme", "finalized", ts("2026-05-20T12:00:00"), ts("2026-05-20T12:00:00"),
        doc, stored,
    )  # fmt: skip
    gw.store.invoice_create(legacy)
    assert gw.invoices.backfill_periods() == 1
    row = gw.store.invoice_get(doc["id"])
    assert row is not None
    assert (row.number, row.from_ns, row.to_ns) == (None, ts("2026-05-01"), ts("2026-06-01"))
    for f, body in stored.items():
        assert client.get(f"/v1/invoices/{doc['id']}", params={"format": f}).content == body
    # its period is taken: a new invoice for May cannot be finalized beside it
    beside = create(client, "acme", MAY)
    assert client.post(f"/v1/invoices/{beside['id']}/finalize").status_code == 409
    void = client.post(f"/v1/invoices/{doc['id']}/void").json()
    assert (void["status"], void.get("number")) == ("void", None)
