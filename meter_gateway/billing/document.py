"""The invoice as its customer receives it: JSON, CSV, HTML and PDF renditions of one document.

Every renderer is a pure function of the invoice document, which carries what it needs — the
issuer and bill-to as they were when it was computed, the locale, the terms, the taxes — so a
finalized invoice renders the same bytes from its stored document for as long as it lives.
Dates, numbers and money are written with Babel in the document's locale; money always to the
currency's ISO 4217 minor unit; a billed unit is named by its increment (``hour`` for 60
minutes). HTML escapes every value; CSV defuses cells a spreadsheet would run as formulas.
The PDF is the HTML through WeasyPrint, which fetches nothing and stamps no dates.
"""

from __future__ import annotations

import copy
import csv
import decimal
import io
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from html import escape
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from babel import Locale
from babel.dates import format_date, format_datetime, format_interval
from babel.numbers import format_decimal, parse_pattern

from meter_gateway import currencies
from meter_gateway.config import BillingConfig, Customer
from meter_gateway.decimals import EXACT
from meter_gateway.pipeline.timestamps import parse_timestamp

__all__ = [
    "FORMATS",
    "RENDERERS",
    "PdfUnavailable",
    "billed_unit",
    "html_to_pdf",
    "issue_dates",
    "parties",
    "render_csv",
    "render_html",
    "render_json",
    "render_pdf",
]

FORMATS = {
    "json": "application/json",
    "csv": "text/csv; charset=utf-8",
    "html": "text/html; charset=utf-8",
    "pdf": "application/pdf",
}
#: Documents stored before they carried a locale read in this one.
DEFAULT_LOCALE = "en_GB"


# --- what the document carries beyond the charges --------------------------------------------


def parties(billing: BillingConfig, customer: Customer) -> dict[str, Any]:
    """The issuer, the bill-to, the locale and the terms of a new invoice of ``customer``."""
    issuer = billing.issuer
    details = customer.billing_details
    return {
        "issuer": None
        if issuer is None
        else {
            "name": issuer.name,
            "address": list(issuer.address),
            "email": issuer.email,
            "taxId": issuer.tax_id,
            "logoUrl": issuer.logo_url,
        },
        "billTo": {
            "name": (details.legal_name if details else None) or customer.name,
            "address": list(details.address) if details else [],
            "email": details.email if details else None,
            "taxId": details.tax_id if details else None,
        },
        "locale": (details.locale if details else None) or billing.locale,
        "paymentTermsDays": billing.due_days,
    }


def issue_dates(doc: Mapping[str, Any], issued_ns: int) -> dict[str, str]:
    """``issueDate`` (the day it is issued, in the invoice's time zone) and ``dueDate`` (net
    terms: ``paymentTermsDays`` later)."""
    day = _local(issued_ns, doc).date()
    due = day + timedelta(days=int(doc.get("paymentTermsDays", 0)))
    return {"issueDate": day.isoformat(), "dueDate": due.isoformat()}


# Larger units a count of a known unit is named by: (how many, name).
_LARGER: Mapping[str, Sequence[tuple[int, str]]] = {
    "millisecond": ((1000, "second"), (60_000, "minute"), (3_600_000, "hour")),
    "second": ((60, "minute"), (3600, "hour"), (86_400, "day")),
    "minute": ((60, "hour"), (1440, "day")),
    "hour": ((24, "day"),),
    "byte": ((10**3, "KB"), (10**6, "MB"), (10**9, "GB"), (10**12, "TB"), (2**10, "KiB"),
             (2**20, "MiB"), (2**30, "GiB")),
    "kilobyte": ((10**3, "megabyte"), (10**6, "gigabyte"), (10**9, "terabyte")),
    "megabyte": ((10**3, "gigabyte"), (10**6, "terabyte")),
    "gigabyte": ((10**3, "terabyte"),),
}  # fmt: skip


def billed_unit(unit: str, increment: Decimal | str) -> str:
    """What one billed unit is: ``hour`` for minutes counted by 60, else ``60 minutes``."""
    inc = Decimal(increment)
    if inc == 1:
        return unit
    for count, name in _LARGER.get(unit, ()):
        if inc == count:
            return name
    return f"{inc.normalize():f} {_plural(unit)}"


def _plural(unit: str) -> str:
    if not unit or not unit[-1].islower() or unit.endswith("s") or unit[:1].isdigit():
        return unit
    if unit.endswith("y") and unit[-2:-1] not in ("a", "e", "o", "u"):
        return unit[:-1] + "ies"
    return unit + "s"


# --- formatting in the document's locale -----------------------------------------------------


class _Fmt:
    """Babel formatting for one document: its locale, currency and time zone."""

    def __init__(self, doc: Mapping[str, Any]) -> None:
        try:
            self.locale = Locale.parse(doc.get("locale") or DEFAULT_LOCALE)
        except (ValueError, TypeError):
            self.locale = Locale.parse(DEFAULT_LOCALE)
        self.currency = str(doc.get("currency") or "")
        try:
            self.digits = currencies.minor_unit(self.currency)
        except ValueError:
            self.digits = 2
        self.doc = doc
        pattern = self.locale.currency_formats["standard"]
        self._money = copy.copy(parse_pattern(pattern))
        self._money.frac_prec = (self.digits, self.digits)
        self._price = copy.copy(parse_pattern(pattern))
        self._price.frac_prec = (self.digits, 18)  # usage values' most places

    def money(self, raw: object) -> str:
        """An amount to the minor unit (``US$2.40``); it is already rounded there."""
        value = _dec(raw)
        if value is None:
            return ""
        return str(
            self._money.apply(value, self.locale, currency=self.currency, currency_digits=False)
        )

    def price(self, raw: object) -> str:
        """A unit price or an exact part: at least the minor unit, every digit it has."""
        value = _dec(raw)
        if value is None:
            return ""
        with decimal.localcontext(EXACT):  # Babel quantizes to 18 places in the default 28
            text = self._price.apply(
                value,
                self.locale,
                currency=self.currency,
                currency_digits=False,
                decimal_quantization=False,
            )
        return str(text)

    def number(self, raw: object) -> str:
        value = _dec(raw)
        if value is None:
            return "" if raw is None else str(raw)
        return format_decimal(value, locale=self.locale, decimal_quantization=False)

    def quantity(self, raw: object, unit: str) -> str:
        """``40 hours``, ``1 hour``, ``3 × 60 minutes``."""
        n = self.number(raw)
        if not unit:
            return n
        if unit[:1].isdigit():
            return f"{n} × {unit}"
        return f"{n} {unit if _dec(raw) == 1 else _plural(unit)}"

    def day(self, iso: object) -> str:
        if not isinstance(iso, str):
            return ""
        try:
            return format_date(date.fromisoformat(iso), "medium", locale=self.locale)
        except ValueError:
            return iso

    def moment(self, ts: object) -> str:
        if not isinstance(ts, str):
            return ""
        try:
            return format_datetime(
                _local(parse_timestamp(ts), self.doc), "medium", locale=self.locale
            )
        except ValueError:
            return ts

    def period(self) -> str:
        """``1–31 Oct 2026`` for [2026-10-01, 2026-11-01): the end is exclusive, so the last
        day shown is the day before it; a period not on midnights shows its times."""
        return self.span(self.doc.get("from"), self.doc.get("to"))

    def span(self, start_ts: object, end_ts: object) -> str:
        """A ``[start, end)`` of timestamps as ``period`` reads the document's."""
        try:
            start = _local(parse_timestamp(str(start_ts)), self.doc)
            end = _local(parse_timestamp(str(end_ts)), self.doc)
        except (TypeError, ValueError):
            return f"{start_ts} – {end_ts}"
        if _midnight(start) and _midnight(end):
            last = (end - timedelta(days=1)).date()
            if last == start.date():
                return format_date(last, "medium", locale=self.locale)
            return format_interval(start.date(), last, "yMMMd", locale=self.locale)
        return format_interval(start, end, "yMMMdHm", locale=self.locale)


def _dec(raw: object) -> Decimal | None:
    if isinstance(raw, Decimal):
        return raw
    if isinstance(raw, str | int):
        try:
            return Decimal(raw)
        except InvalidOperation:
            return None
    return None


def _mapping(v: object) -> Mapping[str, Any] | None:
    return v if isinstance(v, Mapping) else None


def _local(ns: int, doc: Mapping[str, Any]) -> datetime:
    try:
        zone = ZoneInfo(str(doc.get("timezone") or "UTC"))
    except (ValueError, KeyError, OSError):
        zone = ZoneInfo("UTC")
    return datetime.fromtimestamp(ns // 1_000_000_000, zone)


def _midnight(t: datetime) -> bool:
    return (t.hour, t.minute, t.second, t.microsecond) == (0, 0, 0, 0)


# --- the readable content, shared by HTML (and so PDF) and CSV --------------------------------


def _title(doc: Mapping[str, Any]) -> str:
    if doc.get("status") == "draft":
        return "Draft invoice"
    return f"Invoice {doc.get('number') or doc.get('id')}"


def _line_name(ln: Mapping[str, Any]) -> str:
    for key in ("name", "description", "dimensionId"):
        v = ln.get(key)
        if isinstance(v, str) and v:
            return v
    return str(ln.get("type") or "")


def _line_unit(ln: Mapping[str, Any]) -> str:
    """The billed unit of a usage line (as the document says, or from its unit and increment
    for documents stored before it did)."""
    if isinstance(ln.get("billedUnit"), str):
        return str(ln["billedUnit"])
    unit = ln.get("unit")
    if not isinstance(unit, str):
        return ""
    usage = ln.get("usage")
    inc = usage.get("usageIncrement", "1") if isinstance(usage, Mapping) else "1"
    try:
        return billed_unit(unit, inc)
    except InvalidOperation:
        return unit


def _pricing(ln: Mapping[str, Any], f: _Fmt, unit: str) -> str:
    if "unitPrice" in ln:
        per = f" per {unit}" if unit and ln.get("type", "usage") == "usage" else " each"
        return f.price(ln["unitPrice"]) + per
    pkg = ln.get("package")
    if isinstance(pkg, Mapping):
        text = (
            f"{f.number(pkg.get('packages'))} × package of {f.quantity(pkg.get('size'), unit)} "
            f"at {f.price(pkg.get('price'))}"
        )
        if _dec(pkg.get("freeUnits")):
            text += f" ({f.quantity(pkg.get('freeUnits'), unit)} free)"
        return text
    model = ln.get("model")
    return {"graduated": "graduated tiers", "volume": "volume tiers"}.get(str(model), "")


def _tier_rows(ln: Mapping[str, Any], f: _Fmt, unit: str) -> list[tuple[str, str, str, str]]:
    """(label, units, price, amount) per tier the line used."""
    rows = []
    previous: object = None
    for t in ln.get("tiers") or ():
        up_to = t.get("upTo")
        if up_to is not None:
            bound = f"up to {f.quantity(up_to, unit)}"
        elif previous is not None:
            bound = f"over {f.quantity(previous, unit)}"
        else:
            bound = "the top tier"  # a volume charge lists only the tier it used
        if ln.get("model") == "volume":
            bound += ", priced on every unit"
        price = f"{f.price(t.get('unitPrice'))} per {unit}" if unit else f.price(t.get("unitPrice"))
        if _dec(t.get("flatFee")):
            price += f" + {f.price(t.get('flatFee'))} flat"
        rows.append(
            (
                f"Tier {t.get('tier')}, {bound}",
                f.quantity(t.get("units"), unit),
                price,
                f.price(t.get("amount")),
            )
        )
        previous = up_to
    return rows


def _plan_rows(ln: Mapping[str, Any], f: _Fmt) -> list[tuple[str, str, str, str]]:
    """(label, units, price, amount) under a fee line (the cycle it bills, the days of it when
    prorated) or a credit line (each charge's usage converted into its credits)."""
    rows = []
    fee = ln.get("fee")
    if ln.get("type") == "fee" and isinstance(fee, Mapping):
        days = ""
        if fee.get("days") != fee.get("cycleDays"):
            days = f"{f.number(fee.get('days'))} of {f.quantity(fee.get('cycleDays'), 'day')}"
        timing = "in advance" if fee.get("timing") == "advance" else "in arrears"
        label = f"{str(fee.get('interval') or '').capitalize()}ly fee {timing}".strip()
        rows.append((f"{label}, {f.span(fee.get('from'), fee.get('to'))}", days, "", ""))
    credit_unit = str(ln.get("unit") or "")
    for c in ln.get("conversions") or ():
        if not isinstance(c, Mapping):
            continue
        unit = str(c.get("unit") or "")
        qty = f.quantity(c.get("billedQuantity", c.get("quantity")), unit)
        if _dec(c.get("included")):
            qty += f" (after {f.number(c['included'])} included)"
        per = f" per {unit}" if unit else ""
        rows.append(
            (
                str(c.get("name") or c.get("dimensionId") or ""),
                qty,
                f"× {f.quantity(c.get('creditsPerUnit'), credit_unit)}{per}",
                f.quantity(c.get("credits"), credit_unit),
            )
        )
    return rows


def _taxes(doc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    taxes = doc.get("taxes")
    return [t for t in taxes if isinstance(t, Mapping)] if isinstance(taxes, list) else []


def _tax_label(t: Mapping[str, Any], f: _Fmt) -> str:
    label = f"{t.get('name')} {f.number(t.get('percentage'))}%"
    return label + (" (included)" if t.get("inclusive") else "")


# --- JSON ------------------------------------------------------------------------------------


def render_json(doc: Mapping[str, Any]) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"


# --- CSV -------------------------------------------------------------------------------------

#: The columns of invoices before documents carried terms, then what they added.
CSV_COLUMNS = (
    "invoice_id", "status", "customer_id", "customer_name", "currency", "from", "to",
    "dimension_id", "name", "unit", "quantity", "model", "unit_price", "amount", "usage_query",
    "invoice_number", "line_type",
    "billed_unit", "issuer", "bill_to", "issue_date", "due_date", "invoice_subtotal",
    "invoice_tax", "invoice_total", "credits_applied", "amount_due",
)  # fmt: skip


def _cell(text: object) -> str:
    # Spreadsheets run cells that start with these as formulas (CSV injection).
    s = "" if text is None else str(text)
    return "'" + s if s[:1] in ("=", "+", "-", "@", "\t", "\r") else s


def render_csv(doc: Mapping[str, Any]) -> bytes:
    """One row per line (after a header row), RFC 4180 (CRLF, quoted where needed); amounts
    as exact decimal strings, for spreadsheets and accounting imports."""
    issuer = doc.get("issuer") or {}
    bill_to = doc.get("billTo") or {}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(CSV_COLUMNS)
    for ln in doc["lines"]:
        usage = ln.get("usage")
        w.writerow(
            [
                _cell(doc["id"]),
                doc["status"],
                _cell(doc["customerId"]),
                _cell(doc["customerName"]),
                doc["currency"],
                doc["from"],
                doc["to"],
                _cell(ln.get("dimensionId", "")),
                _cell(_line_name(ln)),
                _cell(ln.get("unit", "")),
                _cell(ln.get("quantity", "")),
                _cell(ln.get("model", "")),
                _cell(ln.get("unitPrice", "")),
                _cell(ln.get("amount", "")),
                _cell(usage.get("query", "")) if isinstance(usage, Mapping) else "",
                _cell(doc.get("number") or ""),
                _cell(ln.get("type", "usage")),
                _cell(_line_unit(ln)),
                _cell(issuer.get("name")),
                _cell(bill_to.get("name")),
                doc.get("issueDate") or "",
                doc.get("dueDate") or "",
                _cell(doc.get("subtotal")),
                _cell(doc.get("tax", "0")),
                _cell(doc.get("total")),
                _cell(doc.get("creditsApplied")),
                _cell(doc.get("amountDue")),
            ]
        )
    return buf.getvalue().encode()


# --- HTML ------------------------------------------------------------------------------------

_STYLE = """
@page{size:A4;margin:16mm 15mm 18mm}
*{box-sizing:border-box}
body{font-family:"DejaVu Sans","Helvetica Neue",Arial,sans-serif;color:#1a1a1a;font-size:10pt;
line-height:1.4;margin:0 auto;max-width:190mm;padding:8mm 0}
header{display:flex;justify-content:space-between;align-items:flex-start;gap:8mm}
.issuer{flex:1 1 auto;min-width:0}
.issuer img{max-height:16mm;max-width:60mm;display:block;margin-bottom:3mm}
.issuer .name{font-size:12pt;font-weight:700}
.doc{flex:0 0 auto;text-align:right}
h1{font-size:20pt;margin:0 0 2mm;font-weight:700;letter-spacing:-.01em;white-space:nowrap}
.status{display:inline-block;padding:1mm 3mm;border-radius:1mm;font-weight:700;font-size:9pt}
.status.draft{background:#fff3cd;color:#7a5300}.status.void{background:#fde2e1;color:#a40000}
table.meta{width:auto;margin:2mm 0 0 auto}
table.meta th,table.meta td{border:none;padding:.3mm 0 .3mm 5mm;text-align:right;
font-size:10pt;text-transform:none;letter-spacing:0}
table.meta th{color:#666;font-weight:400}table.meta td{font-weight:600;white-space:nowrap}
.parties{display:flex;gap:12mm;margin:9mm 0 6mm}
.parties h2{font-size:8pt;text-transform:uppercase;letter-spacing:.08em;color:#666;margin:0 0 1mm}
.parties p{margin:0}
table{border-collapse:collapse;width:100%}
th{font-size:8pt;text-transform:uppercase;letter-spacing:.06em;color:#666;font-weight:600;
text-align:left;border-bottom:1.5px solid #1a1a1a;padding:1.5mm 2mm}
td{padding:2mm;border-bottom:1px solid #e4e4e4;vertical-align:top}
.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.tier td{border-bottom:none;padding-top:.4mm;padding-bottom:.4mm;color:#555;font-size:9pt}
tr.tier td:first-child{padding-left:7mm}
tr.last td{border-bottom:1px solid #e4e4e4;padding-bottom:2mm}
sup{font-size:7pt;color:#666}
.totals{width:48%;margin:4mm 0 0 auto}
.totals td{border:none;padding:1mm 2mm}
.totals tr.total td{border-top:1.5px solid #1a1a1a;font-weight:700}
.totals tr.due td{font-size:12pt;font-weight:700;background:#f3f3f3}
.terms{margin:6mm 0 0}
.notes{margin-top:8mm;font-size:7.5pt;color:#666;border-top:1px solid #e4e4e4;padding-top:2mm}
.notes ol{margin:0;padding-left:4mm}.notes code{word-break:break-all}
footer{margin-top:4mm;font-size:7.5pt;color:#888}
@media print{body{padding:0;max-width:none}}
"""


def render_html(doc: Mapping[str, Any]) -> bytes:
    """A printable page (A4): issuer and bill-to, number, dates and terms, every line with its
    pricing and tiers, subtotal / tax / total, credits and the amount due, and the usage
    query behind each line as a footnote."""
    f = _Fmt(doc)

    def e(v: object) -> str:
        return escape("" if v is None else str(v), quote=True)

    status = doc.get("status")
    issuer: Mapping[str, Any] | None = _mapping(doc.get("issuer"))
    bill_to: Mapping[str, Any] = _mapping(doc.get("billTo")) or {}
    customer_name = doc.get("customerName")
    title = _title(doc)
    out = [
        "<!DOCTYPE html>",
        f'<html lang="{e(f.locale.language)}"><head><meta charset="utf-8">',
        f"<title>{e(title)} — {e(customer_name)}</title>",
        f"<style>{_STYLE}</style></head><body><main>",
        "<header>",
        '<div class="issuer">',
    ]
    if issuer is not None:
        if issuer.get("logoUrl"):
            out.append(f'<img src="{e(issuer["logoUrl"])}" alt="{e(issuer.get("name"))}">')
        out.append(f'<div class="name">{e(issuer.get("name"))}</div>')
        out += [f"<div>{e(a)}</div>" for a in issuer.get("address") or ()]
        if issuer.get("email"):
            out.append(f"<div>{e(issuer['email'])}</div>")
        if issuer.get("taxId"):
            out.append(f"<div>Tax ID: {e(issuer['taxId'])}</div>")
    out += ["</div>", '<div class="doc">', f"<h1>{e(title)}</h1>"]
    if status == "draft":
        out.append('<span class="status draft">DRAFT — amounts change until it is issued</span>')
    elif status == "void":
        out.append(
            f'<span class="status void">VOID since {e(f.moment(doc.get("voidedAt")))}</span>'
        )
    meta: list[tuple[str, str]] = []
    if doc.get("number"):
        meta.append(("Invoice number", str(doc["number"])))
    if doc.get("issueDate"):
        meta.append(("Issue date", f.day(doc["issueDate"])))
    elif status != "draft":
        meta.append(("Issued", f.moment(doc.get("finalizedAt") or doc.get("createdAt"))))
    if doc.get("dueDate"):
        meta.append(("Due date", f.day(doc["dueDate"])))
    elif status == "draft" and "paymentTermsDays" in doc:
        meta.append(("Due", f"{doc['paymentTermsDays']} days after issue"))
    meta.append(("Period", f.period()))
    if doc.get("asOf") and doc.get("asOf") != doc.get("to"):
        meta.append(("Usage to", f.moment(doc["asOf"])))
    out.append('<table class="meta"><tbody>')
    out += [f'<tr><th scope="row">{e(k)}</th><td>{e(v)}</td></tr>' for k, v in meta]
    out += ["</tbody></table>", "</div>", "</header>", '<section class="parties">', "<div>"]
    out.append("<h2>Bill to</h2>")
    out.append(f"<p><strong>{e(bill_to.get('name') or customer_name)}</strong></p>")
    out += [f"<p>{e(a)}</p>" for a in bill_to.get("address") or ()]
    if bill_to.get("email"):
        out.append(f"<p>{e(bill_to['email'])}</p>")
    if bill_to.get("taxId"):
        out.append(f"<p>Tax ID: {e(bill_to['taxId'])}</p>")
    out += [
        "</div>",
        "<div><h2>Plan</h2>",
        f"<p>{e(doc.get('offeringName'))}</p>",
        f"<p>{e(customer_name)} ({e(doc.get('customerId'))}) · {e(doc.get('currency'))}</p>",
        "</div>",
        "</section>",
        '<table class="lines"><thead><tr><th>Description</th><th class="n">Quantity</th>'
        '<th class="n">Unit price</th><th class="n">Amount</th></tr></thead><tbody>',
    ]
    notes: list[Mapping[str, Any]] = []
    for ln in doc.get("lines") or ():
        unit = _line_unit(ln)
        usage = ln.get("usage") if isinstance(ln.get("usage"), Mapping) else None
        mark = ""
        if usage is not None and usage.get("query"):
            notes.append(usage)
            mark = f"<sup>{len(notes)}</sup>"
        tiers = _tier_rows(ln, f, unit) + _plan_rows(ln, f)
        qty = f.quantity(ln.get("quantity"), unit) if "quantity" in ln else ""
        fee = ln.get("fee")
        if ln.get("type") == "fee" and isinstance(fee, Mapping) and _dec(ln.get("quantity")) != 1:
            qty = f"{f.number(fee.get('days'))}/{f.number(fee.get('cycleDays'))}"  # prorated
        if _dec(ln.get("included")):  # free units of the cycle (SPEC 11)
            qty += f" ({f.number(ln['included'])} included)"
        row_class = "" if tiers else ' class="last"'
        out.append(
            f"<tr{row_class}><td>{e(_line_name(ln))}{mark}</td>"
            f'<td class="n">{e(qty)}</td><td class="n">{e(_pricing(ln, f, unit))}</td>'
            f'<td class="n">{e(f.money(ln.get("amount")))}</td></tr>'
        )
        for i, (label, units, price, amount) in enumerate(tiers):
            cls = "tier last" if i == len(tiers) - 1 else "tier"
            out.append(
                f'<tr class="{cls}"><td>{e(label)}</td><td class="n">{e(units)}</td>'
                f'<td class="n">{e(price)}</td><td class="n">{e(amount)}</td></tr>'
            )
    out.append('</tbody></table><table class="totals"><tbody>')
    totals = [("", "Subtotal", f.money(doc.get("subtotal")))]
    totals += [("", _tax_label(t, f), f.money(t.get("amount"))) for t in _taxes(doc)]
    totals.append(("total", "Total", f.money(doc.get("total"))))
    if _dec(doc.get("creditsApplied")):
        totals.append(("", "Prepaid credits applied", "−" + f.money(doc["creditsApplied"])))
    if status == "void":
        totals.append(("due", "Amount due (void)", f.money("0")))
    else:
        totals.append(("due", "Amount due", f.money(doc.get("amountDue"))))
    out += [
        f'<tr class="{c}"><td>{e(k)}</td><td class="n">{e(v)}</td></tr>' if c else
        f'<tr><td>{e(k)}</td><td class="n">{e(v)}</td></tr>'
        for c, k, v in totals
    ]  # fmt: skip
    out.append("</tbody></table>")
    terms = []
    if doc.get("dueDate") and status == "finalized":
        terms.append(f"Please pay {f.money(doc.get('amountDue'))} by {f.day(doc['dueDate'])}")
        if "paymentTermsDays" in doc:
            terms[-1] += f" (net {doc['paymentTermsDays']} days)"
    if status == "void" and _dec(doc.get("creditsReturned")):
        terms.append(f"{f.money(doc['creditsReturned'])} of prepaid credits were given back.")
    elif _dec(doc.get("walletBalance")) is not None and status != "void":
        terms.append(f"Prepaid credit balance after this invoice: {f.money(doc['walletBalance'])}")
    out += [f'<p class="terms">{e(t)}.</p>'.replace("..", ".") for t in terms]
    if notes:
        out.append('<section class="notes"><ol>')
        out += [f"<li>{e(n.get('rule'))}: <code>GET {e(n.get('query'))}</code></li>" for n in notes]
        out.append("</ol></section>")
    out += [
        f"<footer>{e(title)} · id {e(doc.get('id'))}</footer>",
        "</main></body></html>",
        "",
    ]
    return "\n".join(out).encode()


# --- PDF -------------------------------------------------------------------------------------


class PdfUnavailable(RuntimeError):
    """WeasyPrint or the Pango libraries under it are not installed."""


def html_to_pdf(html: bytes) -> bytes:
    """The PDF of an invoice page: deterministic bytes (no creation date; the same HTML and
    fonts give the same file). ``PdfUnavailable`` without WeasyPrint/Pango."""
    try:
        import weasyprint
        import weasyprint.urls
    except (ImportError, OSError) as exc:
        raise PdfUnavailable(
            "PDF invoices need WeasyPrint and Pango (pip install weasyprint; Debian: "
            f"libpango-1.0-0 libpangoft2-1.0-0): {exc}"
        ) from None
    # Made while an invoice is read: nothing on the network may stall or change it. data: URIs
    # (an inline logo) are read; anything else is left out.
    fetcher = weasyprint.urls.URLFetcher(allowed_protocols={"data"}, fail_on_errors=False)
    pdf = weasyprint.HTML(string=html.decode(), url_fetcher=fetcher).write_pdf(
        uncompressed_pdf=False, pdf_identifier=b"meter-gateway-invoice"
    )
    assert isinstance(pdf, bytes)
    return pdf


def render_pdf(doc: Mapping[str, Any]) -> bytes:
    return html_to_pdf(render_html(doc))


RENDERERS: Mapping[str, Callable[[Mapping[str, Any]], bytes]] = {
    "json": render_json,
    "csv": render_csv,
    "html": render_html,
    "pdf": render_pdf,
}
