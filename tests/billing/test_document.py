"""The invoice a customer receives (issue 19): issuer and bill-to, net terms and due date, tax
exact per line and rounded once, readable dates, money and units in the customer's locale, the
same content in JSON, CSV, HTML and PDF; golden files for a finalized invoice with all of it,
and invoices stored before it served byte for byte.

Regenerate the golden files with ``UPDATE_GOLDEN=1 pytest tests/billing/test_document.py`` and
review the diff.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from meter_gateway.billing import document, tax
from meter_gateway.clock import FixedClock
from meter_gateway.config import ConfigError, TaxRate, parse_config
from meter_gateway.service import Gateway
from meter_gateway.store.base import InvoiceRow
from tests.billing.appserver import serve
from tests.gatewayproc import BASE_CONFIG
from tests.helpers import ts

GOLDEN = Path(__file__).parent.parent / "testdata" / "invoices"
OCTOBER = {"from": "2026-10-01T00:00:00Z", "to": "2026-11-01T00:00:00Z"}
#: WeasyPrint's first page in a process takes seconds (more on a loaded CI machine).
PDF_TIMEOUT = 120

CONFIG: dict[str, Any] = {
    "auth": BASE_CONFIG["auth"],
    "billing": {
        "issuer": {"name": "Meter & Co Ltd", "address": ["1 Long Street", "London EC1A 1AA"],
                   "email": "billing@meter.example", "tax_id": "GB123456789"},
        "due_days": 30,
        "tax_rates": [{"id": "vat", "name": "VAT", "percentage": "20"},
                      {"id": "vat-incl", "name": "VAT", "percentage": "20", "inclusive": True},
                      {"id": "mwst", "name": "MwSt", "percentage": "19"}],
    },
    "dimensions": [
        {"id": "compute", "name": "Compute Time", "unit": "minute",
         "aggregation_interval": "hour", "usage_increment": 60, "rounding": "ceil"},
        {"id": "data-processed", "name": "Data Processed", "unit": "gigabyte", "price": "0.08"},
    ],
    "offerings": [
        {"id": "pay-as-you-go", "name": "Pay-as-you-go", "currency": "USD", "tax_rate": "vat",
         "charges": [
             {"dimension": "compute", "model": "graduated", "tiers": [
                 {"up_to": 10, "unit_price": "0.096"},
                 {"up_to": None, "unit_price": "0.08", "flat_fee": "2.4"}]},
             {"dimension": "data-processed", "model": "per_unit"}]},
        {"id": "gross", "name": "Gross", "currency": "EUR", "tax_rate": "vat-incl",
         "charges": [{"dimension": "data-processed", "model": "per_unit",
                      "unit_price": "1.19"}]},
    ],
    "customers": [
        {"id": "dumm-ai", "name": "Dumm AI Corp", "offering": "pay-as-you-go",
         "billing_details": {"legal_name": "Dumm AI Corporation",
                             "address": ["500 Market St", "San Francisco, CA 94105"],
                             "email": "ap@dumm.example", "tax_id": "US-99-1234567"}},
        {"id": "gmbh", "name": "Muster GmbH", "offering": "gross",
         "billing_details": {"locale": "de_DE", "tax_rate": "mwst"}},
        {"id": "plain", "name": "Plain Ltd", "offering": "gross"},
    ],
}  # fmt: skip


# --- pure pieces -----------------------------------------------------------------------------


def rate(pct: str, inclusive: bool = False) -> TaxRate:
    return TaxRate(id="t", name="Tax", percentage=Decimal(pct), inclusive=inclusive)


def test_tax_is_exact_per_line_and_rounded_once_per_invoice() -> None:
    # three lines of 0.02 at 20%: 0.004 each; rounded per line that is 0.00, once it is 0.01
    t = tax.apply([Decimal("0.02")] * 3, rate("20"), "USD")
    assert (t.subtotal, t.exact_tax, t.tax, t.total) == (
        Decimal("0.06"), Decimal("0.012"), Decimal("0.01"), Decimal("0.07"),
    )  # fmt: skip
    # inclusive: the lines hold the tax; 1.19 at 19% holds exactly 0.19
    t = tax.apply([Decimal("1.00"), Decimal("0.19")], rate("19", inclusive=True), "EUR")
    assert (t.tax, t.total) == (Decimal("0.19"), Decimal("1.19"))
    # a share that does not terminate (10 / 120 × 20) is rounded once, half-up
    t = tax.apply([Decimal("10.00")], rate("20", inclusive=True), "USD")
    assert (t.tax, t.total) == (Decimal("1.67"), Decimal("10.00"))
    # zero-decimal currency: whole yen
    t = tax.apply([Decimal("105"), Decimal("3")], rate("10"), "JPY")
    assert (str(t.tax), str(t.total)) == ("11", "119")
    assert tax.apply([Decimal("5.00")], None, "USD").total == Decimal("5.00")


@pytest.mark.parametrize(
    ("unit", "increment", "named"),
    [
        ("minute", "60", "hour"),
        ("minute", "30", "30 minutes"),
        ("second", "3600", "hour"),
        ("byte", "1000000000", "GB"),
        ("byte", "1073741824", "GiB"),
        ("gigabyte", "1000", "terabyte"),
        ("request", "1", "request"),
        ("query", "1000", "1000 queries"),
        ("GB", "10", "10 GB"),
    ],
)
def test_a_billed_unit_is_named_by_its_increment(unit: str, increment: str, named: str) -> None:
    assert document.billed_unit(unit, Decimal(increment)) == named


def text_of(html: bytes) -> str:
    """The page's words with markup and Babel's narrow spaces flattened (a rough reading; the
    browser test reads what Chromium lays out)."""
    import re

    words = re.sub(r"<[^>]+>", " ", re.sub(r"<style>.*?</style>", "", html.decode(), flags=re.S))
    return " ".join(words.replace("\u202f", " ").replace("\u2009", " ").split())


def doc_of(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "inv_x", "number": None, "customerId": "c", "customerName": "C", "offeringId": "o",
        "offeringName": "O", "currency": "USD", "from": "2026-10-01T00:00:00Z",
        "to": "2026-11-01T00:00:00Z", "asOf": "2026-11-01T00:00:00Z", "timezone": "UTC",
        "status": "draft", "createdAt": "2026-11-01T00:00:00Z", "finalizedAt": None,
        "locale": "en_GB", "paymentTermsDays": 30, "lines": [], "subtotal": "0.00",
        "total": "0.00", "creditsApplied": "0.00", "amountDue": "0.00", "walletBalance": "0.00",
    }  # fmt: skip
    return {**base, **changes}


@pytest.mark.parametrize(
    ("changes", "period"),
    [
        ({}, "1 – 31 Oct 2026"),  # the end is exclusive: the last day shown is the 31st
        ({"to": "2026-10-02T00:00:00Z"}, "1 Oct 2026"),
        ({"to": "2026-12-01T00:00:00Z"}, "1 Oct – 30 Nov 2026"),
        ({"locale": "de_DE"}, "1.–31. Okt. 2026"),
        # midnights of the invoice's zone, not of UTC
        ({"timezone": "America/New_York", "from": "2026-10-01T04:00:00Z",
          "to": "2026-11-01T04:00:00Z"}, "1 – 31 Oct 2026"),
    ],
)  # fmt: skip
def test_the_period_reads_as_days(changes: dict[str, Any], period: str) -> None:
    page = text_of(document.render_html(doc_of(**changes)))
    assert f"Period {period}" in page


def test_a_draft_is_titled_draft_and_money_is_to_the_minor_unit() -> None:
    line = {
        "type": "usage", "dimensionId": "compute", "name": "Compute", "quantity": "40",
        "unit": "minute", "model": "graduated", "exactAmount": "3.36", "amount": "3.36",
        "tiers": [
            {"tier": 1, "upTo": "10", "units": "10", "unitPrice": "0.096", "flatFee": "0",
             "amount": "0.96"},
            {"tier": 2, "upTo": None, "units": "30", "unitPrice": "0.08", "flatFee": "0",
             "amount": "2.4"}],
        "usage": {"usageIncrement": "60", "query": "/v1/usage?x=1", "rule": "quantity = r"},
    }  # fmt: skip
    page = text_of(document.render_html(doc_of(lines=[line], subtotal="3.36", total="3.36")))
    assert page.startswith("Draft invoice — C Draft invoice DRAFT — amounts change")
    assert "Compute 1 40 hours graduated tiers US$3.36" in page  # no billedUnit: from increment
    assert "Tier 1, up to 10 hours 10 hours US$0.096 per hour US$0.96" in page
    assert "Tier 2, over 10 hours 30 hours US$0.08 per hour US$2.40" in page
    assert "Due 30 days after issue" in page
    assert "quantity = r: GET /v1/usage?x=1" in page  # the footnote


def test_included_units_volume_tiers_and_fees_read_plainly() -> None:
    volume = {
        "type": "usage", "name": "Calls", "quantity": "101", "unit": "call", "model": "volume",
        "included": "10", "exactAmount": "2.0505", "amount": "2.05",
        "tiers": [{"tier": 2, "upTo": None, "units": "101", "unitPrice": "0.0005",
                   "flatFee": "2", "amount": "2.0505"}],
    }  # fmt: skip
    fee = {"type": "fee", "description": "Pro plan, Oct 2026", "quantity": "1",
           "unitPrice": "20", "exactAmount": "20", "amount": "20.00"}  # fmt: skip
    page = text_of(document.render_html(doc_of(lines=[volume, fee])))
    assert "Calls 101 calls (10 included) volume tiers US$2.05" in page
    assert "Tier 2, the top tier, priced on every unit 101 calls" in page
    assert "US$0.0005 per call + US$2.00 flat US$2.0505" in page
    assert "Pro plan, Oct 2026 1 US$20.00 each US$20.00" in page


def test_a_prorated_fee_shows_its_days_and_cycle() -> None:
    fee = {"type": "fee", "description": "Pro plan", "quantity": "0.677419354838709677",
           "unitPrice": "31", "exactAmount": "21", "amount": "21.00",
           "fee": {"interval": "month", "timing": "advance", "cycleFrom": "2026-10-01T00:00:00Z",
                   "cycleTo": "2026-11-01T00:00:00Z", "from": "2026-10-11T00:00:00Z",
                   "to": "2026-11-01T00:00:00Z", "days": 21, "cycleDays": 31}}  # fmt: skip
    page = text_of(document.render_html(doc_of(lines=[fee])))
    assert "Pro plan 21/31 US$31.00 each US$21.00" in page
    assert "Monthly fee in advance, 11 – 31 Oct 2026 21 of 31 days" in page


def test_every_value_is_escaped_and_csv_formulas_defused() -> None:
    evil = "<img src=x onerror=alert(1)>"
    doc = doc_of(
        customerName=evil,
        issuer={"name": evil, "address": [evil], "email": None, "taxId": "=1+1", "logoUrl": None},
        billTo={"name": "=HYPERLINK(1)", "address": [], "email": None, "taxId": None},
        lines=[{"type": "item", "description": evil, "quantity": "1", "unitPrice": "1",
                "exactAmount": "1", "amount": "1.00"}],
    )  # fmt: skip
    html = document.render_html(doc).decode()
    assert "<img" not in html
    assert html.count("&lt;img src=x onerror=alert(1)&gt;") == 5  # title, issuer ×2, customer, item
    header, row = list(csv.reader(io.StringIO(document.render_csv(doc).decode())))
    assert row[header.index("bill_to")] == "'=HYPERLINK(1)"
    assert row[header.index("issuer")] == evil  # plain text: CSV needs no escaping of <


def test_the_pdf_is_deterministic_and_fetches_nothing() -> None:
    doc = doc_of(
        issuer={"name": "I", "address": [], "email": None, "taxId": None,
                "logoUrl": "http://127.0.0.1:9/logo.png"},
    )  # fmt: skip
    first = document.render_pdf(doc)
    assert first.startswith(b"%PDF-")
    assert document.render_pdf(doc) == first  # no creation date, a fixed identifier


# --- through the API -------------------------------------------------------------------------


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(ts("2026-11-01T02:00:00"))


@pytest.fixture
def gateway(tmp_path: Path, clock: FixedClock) -> Iterator[tuple[Gateway, httpx.Client]]:
    ids = (f"inv_doc{i}" for i in itertools.count(1))
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


def seed_october(client: httpx.Client) -> None:
    """40 started hours of compute (one record of 61 minutes makes 2) and 12.5 GB."""
    usage(
        client,
        *[("dumm-ai", "compute", f"2026-10-{d:02d}T10:05:00Z", "61") for d in range(1, 11)],
        *[("dumm-ai", "compute", f"2026-10-{d:02d}T10:05:00Z", "5") for d in range(11, 31)],
        ("dumm-ai", "data-processed", "2026-10-15T00:00:00Z", "12.5"),
    )


def finalized_october(client: httpx.Client) -> dict[str, Any]:
    """Dumm AI Corp's October, finalized on 1 Nov 2026 with 5.00 of prepaid credits: the
    getting-started customer and offering (examples/getting-started.yaml), with a tiered
    compute charge beside its data line so the page shows a tier breakdown."""
    seed_october(client)
    r = client.post("/v1/customers/dumm-ai/wallet/top-ups", json={"amount": "5", "id": "t1"})
    assert r.status_code == 201, r.text
    draft = client.post("/v1/customers/dumm-ai/invoices", json=OCTOBER)
    assert draft.status_code == 201, draft.text
    final = client.post(f"/v1/invoices/{draft.json()['id']}/finalize")
    assert final.status_code == 200, final.text
    doc: dict[str, Any] = final.json()
    return doc


def golden(name: str, body: bytes) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_bytes(body)
    assert body == path.read_bytes(), f"{name} differs from the golden file"


def test_a_finalized_invoice_carries_issuer_terms_and_tax(
    gateway: tuple[Gateway, httpx.Client], clock: FixedClock
) -> None:
    _, client = gateway
    inv = finalized_october(client)
    assert (inv["number"], inv["issueDate"], inv["dueDate"]) == (
        "INV-000001", "2026-11-01", "2026-12-01",
    )  # fmt: skip
    assert inv["issuer"] == {
        "name": "Meter & Co Ltd", "address": ["1 Long Street", "London EC1A 1AA"],
        "email": "billing@meter.example", "taxId": "GB123456789", "logoUrl": None,
    }  # fmt: skip
    assert inv["billTo"]["name"] == "Dumm AI Corporation"
    assert (inv["locale"], inv["paymentTermsDays"]) == ("en_GB", 30)
    compute, data = inv["lines"]
    assert (compute["quantity"], compute["unit"], compute["billedUnit"]) == ("40", "minute", "hour")
    # 10 × 0.096 + 30 × 0.08 + 2.4 = 5.76; 12.5 × 0.08 = 1.00
    assert (compute["amount"], data["amount"], inv["subtotal"]) == ("5.76", "1.00", "6.76")
    # 20% of 6.76 = 1.352 → 1.35, added: exclusive
    assert inv["taxes"] == [
        {"id": "vat", "name": "VAT", "percentage": "20", "inclusive": False,
         "taxableAmount": "6.76", "exactAmount": "1.352", "amount": "1.35"},
    ]  # fmt: skip
    assert (inv["tax"], inv["total"]) == ("1.35", "8.11")
    # prepaid credits come off the total, tax included
    assert (inv["creditsApplied"], inv["amountDue"]) == ("5.00", "3.11")
    for f in ("json", "csv", "html"):
        body = client.get(f"/v1/invoices/{inv['id']}", params={"format": f}).content
        golden(f"document.{f}", body)


def test_the_pdf_is_served_and_stays_the_same(
    gateway: tuple[Gateway, httpx.Client], clock: FixedClock
) -> None:
    _, client = gateway
    inv = finalized_october(client)
    r = client.get(f"/v1/invoices/{inv['id']}", params={"format": "pdf"}, timeout=PDF_TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/pdf"
    assert r.headers["content-disposition"] == f'inline; filename="{inv["id"]}.pdf"'
    assert r.content.startswith(b"%PDF-")
    # later usage and a new issuer change nothing on a finalized invoice
    usage(client, ("dumm-ai", "data-processed", "2026-10-16T00:00:00Z", "1000"))
    again = client.get(f"/v1/invoices/{inv['id']}", params={"format": "pdf"}, timeout=PDF_TIMEOUT)
    assert again.content == r.content
    draft = client.post("/v1/customers/dumm-ai/invoices", json=OCTOBER).json()
    r = client.get(f"/v1/invoices/{draft['id']}", params={"format": "pdf"}, timeout=PDF_TIMEOUT)
    assert (r.status_code, r.content[:5]) == (200, b"%PDF-")
    r = client.get(f"/v1/invoices/{inv['id']}", params={"format": "docx"})
    assert (r.status_code, r.json()["parameter"]) == (400, "format")


def test_inclusive_tax_locale_and_details_set_through_the_catalog_api(
    gateway: tuple[Gateway, httpx.Client],
) -> None:
    _, client = gateway
    usage(client, ("gmbh", "data-processed", "2026-10-02T00:00:00Z", "1000"))
    inv = client.post("/v1/customers/gmbh/invoices", json=OCTOBER).json()
    # the customer's own rate (19%, exclusive) wins over the offering's inclusive 20%
    assert (inv["subtotal"], inv["tax"], inv["total"]) == ("1190.00", "226.10", "1416.10")
    page = text_of(client.get(f"/v1/invoices/{inv['id']}", params={"format": "html"}).content)
    assert "MwSt 19% 226,10 €" in page
    assert "1.–31. Okt. 2026" in page
    # billing details are part of the customer, through the catalog API
    customer = next(c for c in CONFIG["customers"] if c["id"] == "plain")
    details = {"legal_name": "Plain Limited", "address": ["2 Short Rd"], "locale": "fr_FR"}
    r = client.put("/v1/customers/plain", json={**customer, "billing_details": details})
    assert r.status_code == 200, r.text
    usage(client, ("plain", "data-processed", "2026-10-02T00:00:00Z", "10"))
    inv = client.post("/v1/customers/plain/invoices", json=OCTOBER).json()
    assert inv["billTo"] == {
        "name": "Plain Limited", "address": ["2 Short Rd"], "email": None, "taxId": None,
    }  # fmt: skip
    assert inv["locale"] == "fr_FR"
    # the offering's inclusive 20%: 11.90 holds 1.98333… → 1.98; the total does not move
    assert (inv["subtotal"], inv["tax"], inv["total"]) == ("11.90", "1.98", "11.90")
    assert inv["taxes"][0]["inclusive"] is True
    page = text_of(client.get(f"/v1/invoices/{inv['id']}", params={"format": "html"}).content)
    assert "VAT 20% (included) 1,98 €" in page
    r = client.put(
        "/v1/customers/plain",
        json={**customer, "billing_details": {**details, "locale": "xx_NOPE"}},
    )
    assert r.status_code == 422, r.text
    assert "xx_NOPE" in r.text


def test_unknown_tax_rates_are_config_errors_with_their_paths() -> None:
    raw = {
        "offerings": [{"id": "o", "name": "O", "tax_rate": "nope"}],
        "customers": [{"id": "c", "name": "C", "billing_details": {"tax_rate": "gone"}}],
        "billing": {"tax_rates": [{"id": "vat", "name": "VAT", "percentage": "120"}]},
    }
    with pytest.raises(ConfigError) as err:
        parse_config(orjson.dumps(raw).decode())
    text = str(err.value)
    assert "offerings.0.tax_rate: unknown tax rate 'nope'" in text
    assert "customers.0.billing_details.tax_rate: unknown tax rate 'gone'" in text
    assert "billing.tax_rates.0.percentage" in text


@pytest.mark.parametrize("name", ["numbered", "finalized"])
def test_invoices_stored_before_documents_keep_their_bytes(
    gateway: tuple[Gateway, httpx.Client], name: str
) -> None:
    """Invoices finalized by earlier versions are served as stored, and get a PDF of their
    stored page."""
    gw, client = gateway
    stored = {f: (GOLDEN / f"{name}.{f}").read_bytes() for f in ("json", "csv", "html")}
    doc = orjson.loads(stored["json"])
    gw.store.invoice_create(
        InvoiceRow(
            doc["id"], doc["customerId"], "finalized", ts("2026-05-20T12:00:00"),
            ts("2026-05-20T12:00:00"), doc, stored,
        )
    )  # fmt: skip
    for f, body in stored.items():
        assert client.get(f"/v1/invoices/{doc['id']}", params={"format": f}).content == body
    pdf = client.get(f"/v1/invoices/{doc['id']}", params={"format": "pdf"}, timeout=PDF_TIMEOUT)
    assert pdf.content == document.html_to_pdf(stored["html"])
    # voiding renders the void document; an old document lacks the new fields and still reads
    void = client.post(f"/v1/invoices/{doc['id']}/void")
    assert void.status_code == 200, void.text
    page = text_of(client.get(f"/v1/invoices/{doc['id']}", params={"format": "html"}).content)
    assert "VOID since" in page
    assert "Amount due (void)" in page


# --- every line type on one draft (issue 16 item 8) -----------------------------------------

PLAN_CONFIG: dict[str, Any] = {
    "auth": BASE_CONFIG["auth"],
    "dimensions": [
        {"id": "data-processed", "name": "Data Processed", "unit": "gigabyte", "price": "0.08"},
        {"id": "queries", "name": "Queries", "unit": "query"},
    ],
    "offerings": [
        {"id": "suite", "name": "Suite", "currency": "USD",
         "fee": {"amount": "20", "timing": "arrears", "description": "Suite platform fee"},
         "credit": {"unit": "credit", "name": "Suite credits", "unit_price": "0.5"},
         "charges": [
             {"dimension": "data-processed", "model": "per_unit"},
             {"dimension": "queries", "model": "per_unit", "credits_per_unit": "2"}]},
    ],
    "customers": [{"id": "suite-co", "name": "Suite Co", "offering": "suite",
                   "start": "2026-10-01T00:00:00Z"}],
}  # fmt: skip


def test_a_draft_shows_usage_credit_fee_and_item_lines_in_html_and_csv(tmp_path: Path) -> None:
    """A usage line, the credit line (a usage line of the offering's unit, with the charges it
    converts), the fee (with its cycle) and a manual item: each in the HTML page and the CSV
    with its type and amount, and the total their sum."""
    with serve(tmp_path, PLAN_CONFIG, FixedClock(ts("2026-11-01T02:00:00"))) as (_, client):
        usage(
            client,
            ("suite-co", "data-processed", "2026-10-15T00:00:00Z", "12.5"),
            ("suite-co", "queries", "2026-10-15T00:00:00Z", "3"),
        )
        body = {**OCTOBER, "items": [{"description": "Onboarding", "quantity": 2,
                                      "unitPrice": "150"}]}  # fmt: skip
        r = client.post("/v1/customers/suite-co/invoices", json=body)
        assert r.status_code == 201, r.text
        doc = r.json()
        # 12.5 × 0.08; 3 queries × 2 credits × 0.5; the October fee; 2 × 150
        amounts = [(ln["type"], ln.get("name", ln.get("description")), ln["amount"])
                   for ln in doc["lines"]]  # fmt: skip
        assert amounts == [
            ("usage", "Data Processed", "1.00"), ("usage", "Suite credits", "3.00"),
            ("fee", "Suite platform fee", "20.00"), ("item", "Onboarding", "300.00"),
        ]  # fmt: skip
        assert doc["total"] == "324.00"
        html = client.get(f"/v1/invoices/{doc['id']}", params={"format": "html"}).content
        page = text_of(html)
        assert "Data Processed 1 12.5 gigabytes US$0.08 per gigabyte US$1.00" in page  # 1: note
        assert "Suite credits 6 credits US$0.50 per credit US$3.00" in page
        assert "Queries 3 queries × 2 credits per query 6 credits" in page  # the conversion
        assert "Suite platform fee 1 US$20.00 each US$20.00" in page
        assert "Monthly fee in arrears, 1 – 31 Oct 2026" in page  # the cycle it bills
        assert "Onboarding 2 US$150.00 each US$300.00" in page
        assert "US$324.00" in page
        csv_body = client.get(f"/v1/invoices/{doc['id']}", params={"format": "csv"}).content
        header, *rows = list(csv.reader(io.StringIO(csv_body.decode())))
        typed = [
            (row[header.index("line_type")], row[header.index("name")], row[header.index("amount")])
            for row in rows
        ]
        assert typed == amounts
        assert {row[header.index("invoice_total")] for row in rows} == {"324.00"}
