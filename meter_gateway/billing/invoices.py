"""Invoices: a customer's charges for a period ``[from, to)``, drafted, finalized, voided.

A draft is recomputed from the usage whenever it is read (a period that ends in the future is
billed to date: ``asOf``); it may carry manual items (``type: item`` lines) and can be deleted.
Finalizing computes it once more and, in ONE store transaction, takes the next number of the one
gapless sequence (``INV-000001``, ...), stores the exact JSON, CSV and HTML bytes (served
verbatim from then on: later usage never changes them), draws the wallet down by
``min(balance, total)`` and queues the ``invoice.finalized`` event. Voiding a finalized invoice
gives those credits back, queues ``invoice.voided`` and frees its period to be invoiced again
(one finalized invoice per customer and period). Every usage line carries how to reproduce its
quantity (the ``GET /v1/usage`` query and the rule that turns its windows into the quantity)
and its tier breakdown. Amounts are rounded once per line (``pricing.round_money``); subtotal
and total are the exact sums of the rounded lines.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from meter_gateway import pricing
from meter_gateway.billing import document, plans, rating, tax
from meter_gateway.billing.document import FORMATS, render_json
from meter_gateway.billing.events import EventRoute
from meter_gateway.billing.wallet import balance
from meter_gateway.catalog import Catalog
from meter_gateway.clock import Clock
from meter_gateway.config import BillingConfig, Dimension
from meter_gateway.decimals import EXACT, ZERO, fmt
from meter_gateway.pipeline.timestamps import format_timestamp, parse_timestamp
from meter_gateway.store.base import (
    ConflictError,
    FinalInvoice,
    InvoiceRow,
    LedgerEntry,
    MeteredBillingStore,
    PeriodInvoicedError,
)

__all__ = ["FORMATS", "InvoiceError", "Invoices", "Item", "compute", "render_json"]

RETRIES = 20


class InvoiceError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def new_invoice_id() -> str:
    return f"inv_{uuid.uuid4().hex[:20]}"


#: Manual items one draft may carry.
MAX_ITEMS = 100


@dataclass(frozen=True, slots=True)
class Item:
    """A one-off charge on a draft (a line of ``type: item``): quantity × unit price."""

    description: str
    quantity: Decimal
    unit_price: Decimal


def _item_line(item: Item, currency: str) -> dict[str, Any]:
    exact = EXACT.multiply(item.quantity, item.unit_price)
    return {
        "type": "item",
        "description": item.description,
        "quantity": fmt(item.quantity),
        "unitPrice": fmt(item.unit_price),
        "exactAmount": fmt(exact),
        "amount": _money(pricing.round_money(exact, currency)),
    }


def items_of(doc: Mapping[str, Any]) -> list[Item]:
    """The manual items a stored document carries (its lines of type item)."""
    return [
        Item(ln["description"], Decimal(ln["quantity"]), Decimal(ln["unitPrice"]))
        for ln in doc.get("lines", ())
        if ln.get("type") == "item"
    ]


# --- computing -----------------------------------------------------------------------------


def _money(amount: Decimal) -> str:
    return str(amount)


def _usage_query(
    customer: str, dim: Dimension, from_ns: int, to_ns: int, tz: ZoneInfo
) -> tuple[str, str]:
    """The ``GET /v1/usage`` query behind a line's quantity, and the rule that makes it."""
    interval = dim.aggregation_interval
    window = "raw" if interval == "none" else interval
    params = {
        "customerId": customer,
        "dimensionId": dim.id,
        "from": format_timestamp(from_ns),
        "to": format_timestamp(to_ns),
        "window": window,
    }
    if window != "raw":
        params["tz"] = str(tz.key)
    step = "" if dim.usage_increment == 1 else f" ÷ {fmt(dim.usage_increment)}"
    rounded = "x" if dim.rounding == "none" else f"{dim.rounding}(x)"
    if interval == "none":
        rule = f"quantity = {rounded.replace('x', f'{dim.aggregation} of the records{step}')}"
    else:
        rule = (
            f"quantity = Σ over the {interval} windows of "
            f"{rounded.replace('x', f'window value{step}')}"
        )
    return "/v1/usage?" + urlencode(params), rule


def _line(
    rated: rating.Line, customer: str, from_ns: int, as_of_ns: int, tz: ZoneInfo
) -> dict[str, Any]:
    """A rated line (of a charge: priced) as the invoice shows it."""
    dim, quantity, pc, priced = rated.dimension, rated.quantity, rated.charge, rated.priced
    billed = quantity if rated.billed is None else rated.billed  # after included units
    assert pc is not None
    assert priced is not None
    amount, usage = rated.revenue, rated.usage
    query, rule = _usage_query(customer, dim, from_ns, as_of_ns, tz)
    line: dict[str, Any] = {
        "type": "usage",
        "dimensionId": dim.id,
        "name": dim.name,
        "quantity": fmt(quantity),
        "unit": dim.unit,
        **plans.usage_fields(rated),
        "billedUnit": document.billed_unit(dim.unit, dim.usage_increment),
        "model": pc.model,
    }
    line.update(plans.price_fields(pc, billed, priced))
    line["exactAmount"] = fmt(priced.amount)
    line["amount"] = _money(amount)
    line["usage"] = {
        "aggregation": dim.aggregation,
        "aggregationInterval": dim.aggregation_interval,
        "usageIncrement": fmt(dim.usage_increment),
        "rounding": dim.rounding,
        "periodValue": None if usage is None else fmt(usage),
        "query": query,
        "rule": rule,
    }
    if rated.warnings:
        line["warnings"] = list(rated.warnings)
    return line


def compute(
    store: MeteredBillingStore,
    catalog: Catalog,
    tz: ZoneInfo,
    invoice_id: str,
    customer_id: str,
    from_ns: int,
    to_ns: int,
    created_ns: int,
    as_of_ns: int,
    items: Sequence[Item] = (),
    billing: BillingConfig | None = None,
) -> dict[str, Any]:
    """The invoice document of a draft as of ``as_of_ns`` (usage up to then): a usage line per
    charge of the offering, then the manual ``items``; the issuer, bill-to, locale, terms and
    tax of ``billing`` (the ``billing`` config section)."""
    catalog = catalog.at(from_ns)  # the offering as it rates this period (Catalog.at)
    customer = catalog.customers.get(customer_id)
    if customer is None:
        raise InvoiceError(409, f"customer {customer_id!r} is no longer in the catalog")
    offering = catalog.offerings.get(customer.offering) if customer.offering else None
    if offering is None:
        raise InvoiceError(409, f"customer {customer_id!r} has no offering: nothing to invoice")
    currency = offering.currency
    end = rating.as_of(as_of_ns, from_ns, to_ns)
    for charge in offering.charges:
        if charge.dimension not in catalog.dimensions:
            raise InvoiceError(409, f"dimension {charge.dimension!r} is not in the catalog")
    rated = rating.rate(store, catalog, customer_id, from_ns, to_ns, end, tz, charged_only=True)
    # Charges in credits are lines of the credit line's conversions, not lines of their own.
    lines = [_line(ln, customer_id, from_ns, end, tz) for ln in rated.lines if ln.credits is None]
    lines += plans.plan_lines(rated)  # the credit line and recurring fees (type fee)
    rated_lines = len(lines)  # their amounts are in rated.total
    lines += [_item_line(item, currency) for item in items]
    assert rated.total is not None  # the customer has an offering
    billing = billing or BillingConfig()
    try:
        rate = tax.rate_for(customer, offering, {r.id: r for r in billing.tax_rates})
    except ValueError as exc:
        raise InvoiceError(409, f"customer {customer_id!r}: {exc}") from None
    # Every line is rounded once, the tax once; the sums of rounded amounts are exact
    # (round_money only writes them with the currency's places).
    extra = [Decimal(ln["amount"]) for ln in lines[rated_lines:]]
    taxed = tax.apply([rated.total, *extra], rate, currency)
    subtotal, total = taxed.subtotal, taxed.total
    wallet, _ = balance(store, customer_id, currency)
    wallet = pricing.round_money(wallet, currency)  # top-ups are whole minor units: exact
    credits = min(max(wallet, ZERO), total)
    return {
        "id": invoice_id,
        "number": None,  # given at finalization
        "customerId": customer_id,
        "customerName": customer.name,
        "offeringId": offering.id,
        "offeringName": offering.name,
        "currency": currency,
        "from": format_timestamp(from_ns),
        "to": format_timestamp(to_ns),
        "asOf": format_timestamp(end),
        "timezone": str(tz.key),
        "status": "draft",
        "createdAt": format_timestamp(created_ns),
        "finalizedAt": None,
        **document.parties(billing, customer),
        "issueDate": None,  # given at finalization, with dueDate (paymentTermsDays later)
        "dueDate": None,
        "lines": lines,
        "subtotal": _money(subtotal),
        "taxes": taxed.taxes_json(),
        "tax": _money(taxed.tax),
        "total": _money(total),
        # For a draft, what the wallet would cover now; fixed at finalization.
        "creditsApplied": _money(credits),
        "amountDue": _money(EXACT.subtract(total, credits)),
        "walletBalance": _money(EXACT.subtract(wallet, credits)),
    }


# --- rendering (billing/document.py: pure functions of the document) ----------------------


def renditions(doc: Mapping[str, Any]) -> dict[str, bytes]:
    """The bytes a finalized (or voided) invoice is stored as and served verbatim from. Its
    PDF is made from the stored HTML when asked for (``render``): deterministic bytes, and
    half a second of WeasyPrint kept out of the transaction that holds the number sequence."""
    return {f: document.RENDERERS[f](doc) for f in ("json", "csv", "html")}


# --- the service ----------------------------------------------------------------------------

#: Called with an invoice being voided: the job state, written with the void, that lets the
#: billing-cycle job invoice its period again when it was a cycle (``cycles.reopen``), or None.
Reopen = Callable[[InvoiceRow, Catalog], Mapping[str, Mapping[str, Any] | None] | None]


@dataclass
class Invoices:
    store: MeteredBillingStore
    catalog: Callable[[], Catalog]
    clock: Clock
    tz: ZoneInfo
    route: EventRoute
    new_id: Callable[[], str] = new_invoice_id
    on_events: Callable[[], None] | None = None
    reopen: Reopen | None = None
    billing: BillingConfig = field(default_factory=BillingConfig)

    def create(
        self,
        customer_ref: str,
        from_ns: int,
        to_ns: int,
        items: Sequence[Item] = (),
        invoice_id: str | None = None,
    ) -> InvoiceRow:
        """A new draft; ``invoice_id`` (e.g. derived from an idempotency key) instead of a
        fresh one: ``ConflictError`` if that id exists."""
        catalog = self.catalog()
        customer = catalog.customer_id(customer_ref)
        if customer is None:
            raise InvoiceError(404, f"unknown customer {customer_ref!r}")
        if to_ns <= from_ns:
            raise InvoiceError(400, "'to' must be after 'from'")
        if len(items) > MAX_ITEMS:
            raise InvoiceError(422, f"items: at most {MAX_ITEMS} on one invoice")
        now = self.clock.now_ns()
        invoice_id = invoice_id or self.new_id()
        doc = compute(
            self.store, catalog, self.tz, invoice_id, customer, from_ns, to_ns, now, now, items,
            self.billing,
        )  # fmt: skip
        row = InvoiceRow(invoice_id, customer, "draft", now, None, doc, {}, None, from_ns, to_ns)
        self.store.invoice_create(row)
        return row

    def get(self, invoice_id: str) -> InvoiceRow:
        """The invoice; a draft is recomputed now (and saved when its amounts moved)."""
        row = self._row(invoice_id)
        if row.status != "draft":
            return row
        doc = self._recompute(row)
        if _without_as_of(doc) != _without_as_of(row.document):
            self.store.invoice_update_draft(invoice_id, doc)
        return _with(row, document=doc)

    def render(self, invoice_id: str, format: str) -> bytes:
        if format not in FORMATS:
            raise InvoiceError(400, f"format must be json, csv, html or pdf, got {format!r}")
        row = self.get(invoice_id)
        try:
            if row.status == "draft":
                return document.RENDERERS[format](row.document)
            if format in row.renditions:
                return row.renditions[format]
            # The PDF of the stored page (for invoices stored before documents too).
            return document.html_to_pdf(row.renditions["html"])
        except document.PdfUnavailable as exc:
            raise InvoiceError(501, str(exc)) from None

    def for_customer(
        self, customer_ref: str, after: tuple[int, str] | None, limit: int
    ) -> list[InvoiceRow]:
        customer = self.catalog().customer_id(customer_ref)
        if customer is None:
            raise InvoiceError(404, f"unknown customer {customer_ref!r}")
        return self.store.invoice_list(customer, after, limit)

    def search(
        self,
        customer_ref: str | None,
        status: str | None,
        from_ns: int | None,
        to_ns: int | None,
        after: tuple[int, str] | None,
        limit: int,
    ) -> list[InvoiceRow]:
        """Invoices across customers: of one customer (id or alias), of one status, whose
        period overlaps ``[from_ns, to_ns)``; by creation, after the cursor."""
        customer = None
        if customer_ref is not None:
            customer = self.catalog().customer_id(customer_ref)
            if customer is None:
                raise InvoiceError(404, f"unknown customer {customer_ref!r}")
        return self.store.invoice_list(
            customer, after, limit, status=status, from_ns=from_ns, to_ns=to_ns
        )

    def delete(self, invoice_id: str) -> None:
        """Delete a draft (a finalized or void invoice stays: 409)."""
        row = self._row(invoice_id)
        if row.status == "draft" and self.store.invoice_delete_draft(invoice_id):
            return
        row = self._row(invoice_id)  # finalized meanwhile?
        raise InvoiceError(
            409,
            f"invoice {invoice_id!r} is {row.status}: only drafts can be deleted"
            + (" (void it instead)" if row.status == "finalized" else ""),
        )

    def finalize(self, invoice_id: str) -> InvoiceRow:
        """Freeze the invoice (idempotent: finalizing a finalized invoice returns it)."""
        for _ in range(RETRIES):
            row = self._row(invoice_id)
            if row.status == "finalized":
                return row
            if row.status == "void":
                raise InvoiceError(409, f"invoice {invoice_id!r} is void")
            self._check_period_free(row)
            done = self._finalize(row, self._recompute(row, as_of_ns=self.clock.now_ns()))
            if done is not None:
                return done
        raise InvoiceError(409, f"invoice {invoice_id!r}: the wallet kept changing; try again")

    def issue(
        self,
        customer: str,
        from_ns: int,
        to_ns: int,
        fence: tuple[str, str] | None,
        states: Mapping[str, Mapping[str, Any] | None],
    ) -> InvoiceRow:
        """Create and finalize the invoice of ``[from_ns, to_ns)`` in one (fenced) store
        transaction that also writes ``states``: the billing-cycle job's step.
        ``PeriodInvoicedError`` when the period is invoiced already."""
        catalog = self.catalog()
        for _ in range(RETRIES):
            now = self.clock.now_ns()
            invoice_id = self.new_id()
            doc = compute(
                self.store, catalog, self.tz, invoice_id, customer, from_ns, to_ns, now, now,
                billing=self.billing,
            )  # fmt: skip
            row = InvoiceRow(
                invoice_id, customer, "draft", now, None, doc, {}, None, from_ns, to_ns,
                origin="cycle",
            )  # fmt: skip
            self._check_period_free(row)
            done = self._finalize(row, doc, insert=True, fence=fence, states=states)
            if done is not None:
                return done
        raise InvoiceError(409, f"customer {customer!r}: the wallet kept changing; try again")

    def void(self, invoice_id: str) -> InvoiceRow:
        """Void a finalized invoice: its credits go back to the wallet, its period is free
        again (idempotent: voiding a void invoice returns it)."""
        for _ in range(RETRIES):
            row = self._row(invoice_id)
            if row.status == "void":
                return row
            if row.status == "draft":
                raise InvoiceError(
                    409, f"invoice {invoice_id!r} is a draft: delete it instead of voiding it"
                )
            now = self.clock.now_ns()
            doc = dict(row.document)
            currency = doc["currency"]
            credits = Decimal(doc.get("creditsApplied") or "0")
            ledger: list[LedgerEntry] = []
            if credits > 0:
                wallet, seq = balance(self.store, row.customer, currency)
                ledger.append(
                    LedgerEntry(
                        row.customer,
                        currency,
                        seq + 1,
                        f"void:{invoice_id}",
                        "void",
                        credits,
                        EXACT.add(wallet, credits),
                        now,
                        invoice_id,
                    )
                )
            doc.update(status="void", voidedAt=format_timestamp(now))
            doc["creditsReturned"] = _money(credits)
            stored = renditions(doc)
            events = self.route("invoice.voided", f"invoice/{invoice_id}/voided", doc, now)
            voided = _with(row, status="void", document=doc, renditions=stored)
            states = None
            if self.reopen is not None:
                states = self.reopen(_with(voided, voided_ns=now), self.catalog())
            try:
                done = self.store.invoice_void(invoice_id, doc, stored, now, ledger, events, states)
            except ConflictError:
                continue  # the wallet moved: give back on top of the new balance
            if done:
                if events and self.on_events is not None:
                    self.on_events()
                return _with(voided, voided_ns=now)
        raise InvoiceError(409, f"invoice {invoice_id!r}: the wallet kept changing; try again")

    def backfill_periods(self) -> int:
        """Give invoices stored before periods were columns their period (once, at start)."""

        def period_of(doc: Mapping[str, Any]) -> tuple[int, int] | None:
            try:
                return parse_timestamp(doc["from"]), parse_timestamp(doc["to"])
            except (KeyError, TypeError, ValueError):
                return None

        return self.store.invoice_backfill_periods(period_of)

    # --- helpers

    def _row(self, invoice_id: str) -> InvoiceRow:
        row = self.store.invoice_get(invoice_id)
        if row is None:
            raise InvoiceError(404, f"invoice {invoice_id!r} not found")
        return row

    def _check_period_free(self, row: InvoiceRow) -> None:
        """409 if another invoice is finalized for exactly this period (the store's unique
        index decides races; this names the invoice, and covers invoices finalized before
        numbers existed, which the index leaves out)."""
        if row.from_ns is None or row.to_ns is None:
            return
        for other in self.store.invoice_list(
            row.customer, None, 100, status="finalized", from_ns=row.from_ns, to_ns=row.to_ns
        ):
            if (other.from_ns, other.to_ns) == (row.from_ns, row.to_ns) and other.id != row.id:
                raise PeriodInvoicedError(
                    f"customer {row.customer!r}'s period {format_timestamp(row.from_ns)} to "
                    f"{format_timestamp(row.to_ns)} is already invoiced by "
                    f"{other.number or other.id} (void it to invoice the period again)"
                )

    def _finalize(
        self,
        row: InvoiceRow,
        doc: dict[str, Any],
        *,
        insert: bool = False,
        fence: tuple[str, str] | None = None,
        states: Mapping[str, Mapping[str, Any] | None] | None = None,
    ) -> InvoiceRow | None:
        """One attempt: the finalized row, or None when the wallet moved (retry). A draft
        finalized meanwhile (another replica) is returned as stored."""
        now = self.clock.now_ns()
        currency, total = doc["currency"], Decimal(doc["total"])
        wallet, seq = balance(self.store, row.customer, currency)
        wallet = pricing.round_money(wallet, currency)  # whole minor units: exact
        credits = min(max(wallet, ZERO), total)
        ledger: Sequence[LedgerEntry] = ()
        if credits > 0:
            ledger = [
                LedgerEntry(
                    row.customer,
                    currency,
                    seq + 1,
                    f"invoice:{row.id}",
                    "invoice",
                    -credits,
                    EXACT.subtract(wallet, credits),
                    now,
                    row.id,
                )
            ]
        doc.update(
            status="finalized",
            finalizedAt=format_timestamp(now),
            **(document.issue_dates(doc, now) if "paymentTermsDays" in doc else {}),
            creditsApplied=_money(credits),
            amountDue=_money(EXACT.subtract(total, credits)),
            walletBalance=_money(EXACT.subtract(wallet, credits)),
        )

        def finish(number: str) -> FinalInvoice:
            final = {**doc, "number": number}
            events = self.route("invoice.finalized", f"invoice/{row.id}/finalized", final, now)
            return FinalInvoice(final, renditions(final), events)

        try:
            done = self.store.invoice_finalize(
                row, now, ledger, finish, insert=insert, fence=fence, states=states
            )
        except PeriodInvoicedError:
            raise
        except ConflictError:
            return None  # the wallet moved (a top-up, another invoice): recompute the credits
        if done is None:
            return self._row(row.id)
        if self.on_events is not None:
            self.on_events()
        return done

    def _recompute(self, row: InvoiceRow, as_of_ns: int | None = None) -> dict[str, Any]:
        d = row.document
        now = self.clock.now_ns() if as_of_ns is None else as_of_ns
        return compute(
            self.store,
            self.catalog(),
            self.tz,
            row.id,
            row.customer,
            parse_timestamp(d["from"]),
            parse_timestamp(d["to"]),
            row.created_ns,
            now,
            items_of(d),
            self.billing,
        )


def _with(row: InvoiceRow, **changes: Any) -> InvoiceRow:
    return replace(row, **changes)


def _without_as_of(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "asOf"}


def summary_json(row: InvoiceRow) -> dict[str, Any]:
    """A list entry: what the invoice is and its totals (of its last computation for drafts)."""
    d = row.document
    return {
        "id": row.id,
        "number": row.number,
        "customerId": row.customer,
        "status": row.status,
        "currency": d.get("currency"),
        "from": d.get("from"),
        "to": d.get("to"),
        "createdAt": format_timestamp(row.created_ns),
        "finalizedAt": None if row.finalized_ns is None else format_timestamp(row.finalized_ns),
        "voidedAt": None if row.voided_ns is None else format_timestamp(row.voided_ns),
        "total": d.get("total"),
        "amountDue": d.get("amountDue"),
    }
