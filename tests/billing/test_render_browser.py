"""The invoice as a person sees it (issue 19): the HTML laid out by headless Chromium (a
screenshot and its printed text) and the PDF rasterized and read back by poppler
(``pdftoppm``, ``pdftotext``), each holding the issuer, number, dates, every line, the tax, the
total and the due date.

Needs the Debian packages ``chromium`` and ``poppler-utils`` (``.ci/run`` installs them; without
them these tests fail rather than skip: a real component that is missing is a defect).
``METER_INVOICE_PNG_DIR=examples`` writes the two PNGs the README shows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from meter_gateway.clock import FixedClock
from tests.billing.appserver import serve
from tests.billing.test_document import CONFIG, PDF_TIMEOUT, finalized_october
from tests.helpers import ts

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
POPPLER = shutil.which("pdftotext") and shutil.which("pdftoppm")


@pytest.fixture(autouse=True)
def _tools_present() -> None:
    if not (CHROMIUM and POPPLER):
        pytest.fail("needs chromium and poppler-utils (Debian packages; .ci/run installs them)")


#: What a reader must find on the page (columns side by side interleave in the text layer,
#: so each is looked for on its own).
EXPECTED = [
    "Invoice INV-000001",
    "Invoice number INV-000001",
    "Issue date 1 Nov 2026",
    "Due date 1 Dec 2026",
    "Period 1 – 31 Oct 2026",
    "Meter & Co Ltd",
    "GB123456789",
    "BILL TO",
    "Dumm AI Corporation",
    "500 Market St",
    "Compute Time",
    "40 hours",
    "US$5.76",
    "Tier 1, up to 10 hours",
    "US$0.096 per hour",
    "US$0.96",
    "Tier 2, over 10 hours",
    "US$0.08 per hour + US$2.40 flat",
    "US$4.80",
    "Data Processed",
    "12.5 gigabytes",
    "US$0.08 per gigabyte",
    "US$1.00",
    "Subtotal US$6.76",
    "VAT 20% US$1.35",
    "Total US$8.11",
    "Prepaid credits applied −US$5.00",
    "Amount due US$3.11",
    "Please pay US$3.11 by 1 Dec 2026 (net 30 days).",
]


def flat(text: str) -> str:
    """Words in reading order, Babel's narrow spaces and the layout's columns flattened."""
    return " ".join(text.replace("\u202f", " ").replace("\u2009", " ").split())


def shows(text: str, expected: list[str]) -> None:
    missing = [want for want in expected if want not in text]
    assert not missing, f"{missing} not in:\n{text}"


def run(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done


def chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    assert CHROMIUM is not None
    return run(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--hide-scrollbars", f"--user-data-dir={tmp / 'profile'}", *args,
    )  # fmt: skip


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def inked(png_path: Path) -> float:
    """The share of pixels that are not white: a blank or failed rendering has none."""
    from PIL import Image

    with Image.open(png_path) as im:
        gray = im.convert("L")
        histogram = gray.histogram()
    return 1 - sum(histogram[250:]) / sum(histogram)


@pytest.fixture
def invoice(tmp_path: Path) -> Iterator[tuple[httpx.Client, str]]:
    with serve(tmp_path, CONFIG, FixedClock(ts("2026-11-01T02:00:00"))) as (_, client):
        inv = finalized_october(client)
        yield client, inv["id"]


def keep(png: Path, name: str) -> None:
    out = os.environ.get("METER_INVOICE_PNG_DIR")
    if out:
        shutil.copyfile(png, Path(out) / name)


def test_chromium_shows_the_html_invoice(invoice: tuple[httpx.Client, str]) -> None:
    client, invoice_id = invoice
    html = client.get(f"/v1/invoices/{invoice_id}", params={"format": "html"}).content
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        page = tmp / "invoice.html"
        page.write_bytes(html)
        shot = tmp / "invoice-html.png"
        chromium(tmp, f"--screenshot={shot}", "--window-size=900,1250", page.as_uri())
        assert png_size(shot.read_bytes()) == (900, 1250)
        assert inked(shot) > 0.02  # text on the page, not a blank or an error tab
        # the DOM Chromium built: every value escaped, so text, not markup
        dom = chromium(tmp, "--dump-dom", page.as_uri()).stdout.decode()
        assert "Meter &amp; Co Ltd" in dom
        # what it lays out and prints, read back as text
        printed = tmp / "printed.pdf"
        chromium(tmp, f"--print-to-pdf={printed}", "--no-pdf-header-footer", page.as_uri())
        text = flat(run("pdftotext", "-layout", str(printed), "-").stdout.decode())
        shows(text, EXPECTED)
        keep(shot, "invoice-html.png")


def test_the_pdf_reads_the_same(invoice: tuple[httpx.Client, str]) -> None:
    client, invoice_id = invoice
    r = client.get(f"/v1/invoices/{invoice_id}", params={"format": "pdf"}, timeout=PDF_TIMEOUT)
    assert r.headers["content-type"] == "application/pdf"
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        pdf = tmp / "invoice.pdf"
        pdf.write_bytes(r.content)
        info = run("pdfinfo", str(pdf)).stdout.decode()
        assert "Pages:           1" in info  # one A4 page
        assert "595.276 x 841.89 pts (A4)" in info
        text = flat(run("pdftotext", "-layout", str(pdf), "-").stdout.decode())
        shows(text, EXPECTED)
        assert "GET /v1/usage?" in text  # the footnotes
        run("pdftoppm", "-png", "-r", "110", "-singlefile", str(pdf), str(tmp / "invoice-pdf"))
        shot = tmp / "invoice-pdf.png"
        assert inked(shot) > 0.02
        keep(shot, "invoice-pdf.png")
