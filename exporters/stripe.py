"""The Stripe exporter: a finalized invoice becomes a Stripe invoice of the customer's Stripe
customer (``customers[].stripe_account_id``, a ``cus_...`` id); voiding ours voids it there.

One ``invoice.finalized`` event is synced in steps, each safe to repeat: find or create the
draft (``auto_advance=false``, ``pending_invoice_items_behavior=exclude``: nothing else of the
customer slips onto it), add each line as an invoice item on it (same amount in the currency's
minor units, currency, a description of the line; wallet credits drawn as one negative item),
then finalize it (``finalize: true``, the default, with ``auto_advance=true``: Stripe collects it
by ``collection_method``) or leave it a draft to review. Every create call carries an
idempotency key derived from our invoice id (and the line), and before creating anything the
sink looks for what an earlier attempt made (the invoice by its metadata
``meter_gateway_invoice_id``, items by ``meter_gateway_line``), because Stripe forgets keys
after 24 hours and an outbox event can wait longer. So a crash between any two calls never
makes a second invoice or item. The Stripe invoice's id and status are kept in the store's job
state (``stripe_link``).

Errors: no connection, Stripe 5xx or 429 stop the round (``DeliveryError``: retried with
backoff); any other refusal (a 4xx: no such customer, a paid invoice that cannot be voided)
fails this event alone (``EventError``: retried with its own backoff, its error kept in the
outbox and logged). A customer without a Stripe id is skipped (``Skip``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, NoReturn, TypeVar

import httpx
import orjson
import stripe
from stripe.params import InvoiceCreateParams

from exporters.outbox import DeliveryError, EventError, Skip
from meter_gateway.clock import Clock
from meter_gateway.currencies import minor_unit
from meter_gateway.pipeline.timestamps import format_timestamp
from meter_gateway.store.base import BillingStore, OutboxItem

T = TypeVar("T")
S = TypeVar("S", bound=stripe.StripeObject)
CollectionMethod = Literal["charge_automatically", "send_invoice"]

log = logging.getLogger(__name__)

NAME = "stripe"  # the exporter's name in the outbox (exporters.stripe is one exporter)
STATE_PREFIX = "exporter:stripe:invoice/"
INVOICE_ID_KEY = "meter_gateway_invoice_id"
LINE_KEY = "meter_gateway_line"
CREDITS_LINE = "credits"

# Stripe's minor unit where it differs from ISO 4217's (docs.stripe.com/currencies): ISK stays
# a two-decimal currency in Stripe's API (100 is 1 króna); Stripe counts MGA in whole ariary.
_STRIPE_MINOR_UNIT: Mapping[str, int] = {"ISK": 2, "MGA": 0}


class AmountError(ValueError):
    """An amount that is no whole number of Stripe's minor units of its currency."""


def minor_amount(amount: Decimal, currency: str) -> int:
    """``amount`` in Stripe's minor units of ``currency`` ("12.34" USD → 1234), exactly."""
    digits = _STRIPE_MINOR_UNIT.get(currency, minor_unit(currency))
    scaled = amount.scaleb(digits)
    if scaled != scaled.to_integral_value():
        raise AmountError(
            f"{amount} {currency} is not a whole number of Stripe's minor units (10^-{digits})"
        )
    return int(scaled)


@dataclass(frozen=True)
class PlannedItem:
    """One invoice item the Stripe invoice must carry: ``line`` is its stable key (the line's
    index, or ``credits``)."""

    line: str
    amount: int
    description: str


def describe(line: Mapping[str, Any]) -> str:
    """What the Stripe line says: the dimension's name, the quantity and its unit (a manual
    item: its description, quantity and unit price)."""
    name = str(line.get("name") or line.get("description") or line.get("dimensionId") or "")
    quantity, unit = line.get("quantity"), line.get("unit")
    if quantity is None:
        return name
    if unit:
        return f"{name}: {quantity} {unit}"
    price = line.get("unitPrice")
    return f"{name}: {quantity} × {price}" if price is not None else f"{name}: {quantity}"


def planned_items(doc: Mapping[str, Any]) -> list[PlannedItem]:
    """The invoice items of a finalized invoice document, in line order: one per line (zero
    amounts too, so the Stripe invoice shows every line ours does), then the wallet credits it
    drew as one negative item, so Stripe's amount due is ours."""
    currency = str(doc["currency"])
    items = [
        PlannedItem(str(i), minor_amount(Decimal(ln["amount"]), currency), describe(ln))
        for i, ln in enumerate(doc.get("lines", ()))
    ]
    credits = Decimal(doc.get("creditsApplied") or "0")
    if credits > 0:
        items.append(
            PlannedItem(CREDITS_LINE, -minor_amount(credits, currency), "Prepaid credits applied")
        )
    return items


@dataclass(frozen=True)
class StripeLink:
    """Where one of our invoices lives in Stripe (kept in the store's job state)."""

    invoice_id: str
    stripe_invoice_id: str
    stripe_customer_id: str
    status: str  # Stripe's: draft, open, paid, void, uncollectible; or deleted (a draft voided)
    synced_ns: int


def stripe_link(store: BillingStore, invoice_id: str) -> StripeLink | None:
    """The Stripe invoice of one of ours, once synced."""
    doc = store.job_state(STATE_PREFIX + invoice_id).get(STATE_PREFIX + invoice_id)
    return None if doc is None else _link(invoice_id, doc)


def stripe_links(store: BillingStore) -> dict[str, StripeLink]:
    """Every synced invoice by our invoice id."""
    return {
        k.removeprefix(STATE_PREFIX): _link(k.removeprefix(STATE_PREFIX), d)
        for k, d in store.job_state(STATE_PREFIX).items()
    }


def _link(invoice_id: str, doc: Mapping[str, Any]) -> StripeLink:
    return StripeLink(
        invoice_id,
        str(doc["stripeInvoiceId"]),
        str(doc["stripeCustomerId"]),
        str(doc["status"]),
        int(doc["syncedNs"]),
    )


def _metadata(obj: stripe.StripeObject) -> Mapping[str, str]:
    meta = getattr(obj, "metadata", None)
    return {str(k): str(v) for k, v in meta.to_dict().items()} if meta else {}


class HttpxTransport(stripe.HTTPClient):
    """Stripe's calls over one httpx client with a timeout. (The library's own httpx transport
    posts its form body as ``data=``, which httpx deprecates.) Retries are the outbox's."""

    name = "httpx"

    def __init__(self, timeout_s: float = 30.0) -> None:
        super().__init__()
        self._client = httpx.Client(timeout=timeout_s)

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[str, int, Mapping[str, str]]:
        try:
            r = self._client.request(method, url, headers=headers, content=post_data)
        except httpx.HTTPError as exc:
            raise stripe.APIConnectionError(  # type: ignore[no-untyped-call]  # unannotated
                f"{method.upper()} {url}: {type(exc).__name__}: {exc}", should_retry=True
            ) from exc
        # The base class says str; every transport of the library returns the body's bytes.
        return r.content, r.status_code, r.headers  # type: ignore[return-value]

    def close(self) -> None:
        self._client.close()


class StripeSink:
    """Syncs ``invoice.finalized`` and ``invoice.voided`` events to Stripe."""

    def __init__(
        self,
        api_key: str,
        store: BillingStore,
        stripe_customer: Callable[[str], str | None],
        clock: Clock,
        *,
        api_base: str | None = None,
        timeout_s: float = 30.0,
        finalize: bool = True,
        collection_method: CollectionMethod = "charge_automatically",
        days_until_due: int | None = None,
        http_client: HttpxTransport | None = None,
        name: str = NAME,
    ) -> None:
        self.name = name
        self._http = http_client or HttpxTransport(timeout_s)
        # No retries of its own: the outbox retries, with backoff and the same idempotency keys.
        self._stripe = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else None,
            max_network_retries=0,
            http_client=self._http,
        )
        self._store = store
        self._stripe_customer = stripe_customer
        self._clock = clock
        self._finalize = finalize
        self._collection = collection_method
        self._days_until_due = days_until_due

    def deliver(self, item: OutboxItem) -> None:
        event = orjson.loads(item.payload)
        doc = event["data"]
        if item.type == "invoice.finalized":
            self._sync(doc)
        elif item.type == "invoice.voided":
            self._void(doc)
        else:
            raise Skip(f"{item.type} events are not synced to Stripe")

    def close(self) -> None:
        self._http.close()

    # --- the two events

    def _sync(self, doc: Mapping[str, Any]) -> None:
        invoice_id = str(doc["id"])
        customer = self._customer(doc)
        ours = self._store.invoice_get(invoice_id)
        if ours is not None and ours.status == "void":
            raise Skip(f"invoice {invoice_id} was voided before it reached Stripe")
        try:
            planned = planned_items(doc)
        except AmountError as exc:
            raise EventError(f"invoice {invoice_id}: {exc}") from exc
        inv = self._find(customer, invoice_id)
        if inv is None:
            inv = self._call(
                "create invoice",
                lambda: self._stripe.v1.invoices.create(
                    params=self._invoice_params(customer, doc),
                    options={"idempotency_key": f"meter-gateway/{invoice_id}/invoice/{customer}"},
                ),
            )
        sid = inv.id
        if inv.status == "draft":
            have = {_metadata(ln).get(LINE_KEY) for ln in self._lines(sid)}  # added before
            for p in planned:
                if p.line not in have:
                    self._add_item(customer, sid, invoice_id, doc, p)
            if self._finalize:
                inv = self._call(
                    "finalize invoice",
                    lambda: self._stripe.v1.invoices.finalize_invoice(
                        sid,
                        params={"auto_advance": True},
                        options={"idempotency_key": f"meter-gateway/{invoice_id}/finalize"},
                    ),
                )
        self._keep(invoice_id, customer, sid, str(inv.status))

    def _void(self, doc: Mapping[str, Any]) -> None:
        invoice_id = str(doc["id"])
        customer = self._customer(doc)
        inv = self._find(customer, invoice_id)
        if inv is None:
            # Its finalization never reached Stripe, and never will: _sync skips void invoices.
            raise Skip(f"invoice {invoice_id} has no Stripe invoice to void")
        sid, status = inv.id, str(inv.status)
        if status == "draft":  # Stripe voids only finalized invoices; a draft is deleted
            self._call("delete draft invoice", lambda: self._stripe.v1.invoices.delete(sid))
            status = "deleted"
        elif status in ("open", "uncollectible"):
            inv = self._call(
                "void invoice",
                lambda: self._stripe.v1.invoices.void_invoice(
                    sid, options={"idempotency_key": f"meter-gateway/{invoice_id}/void"}
                ),
            )
            status = str(inv.status)
        elif status != "void":
            raise EventError(
                f"invoice {invoice_id}: Stripe invoice {sid} is {status} and cannot be "
                "voided (refund it in Stripe)"
            )
        self._keep(invoice_id, customer, sid, status)

    # --- steps

    def _customer(self, doc: Mapping[str, Any]) -> str:
        customer_id = str(doc.get("customerId"))
        stripe_id = self._stripe_customer(customer_id)
        if not stripe_id:
            raise Skip(f"customer {customer_id!r} has no stripe_account_id")
        return stripe_id

    def _invoice_params(self, customer: str, doc: Mapping[str, Any]) -> InvoiceCreateParams:
        number = doc.get("number") or doc["id"]
        params: InvoiceCreateParams = {
            "customer": customer,
            "currency": str(doc["currency"]).lower(),
            "collection_method": self._collection,
            "auto_advance": False,  # not before every item is on it
            "pending_invoice_items_behavior": "exclude",
            "description": f"{number}: {doc.get('from')} to {doc.get('to')}",
            "metadata": {INVOICE_ID_KEY: str(doc["id"]), "number": str(doc.get("number") or "")},
        }
        if self._days_until_due is not None:
            params["days_until_due"] = self._days_until_due
        return params

    def _add_item(
        self,
        customer: str,
        stripe_invoice: str,
        invoice_id: str,
        doc: Mapping[str, Any],
        p: PlannedItem,
    ) -> None:
        self._call(
            f"create invoice item {p.line}",
            lambda: self._stripe.v1.invoice_items.create(
                params={
                    "customer": customer,
                    "invoice": stripe_invoice,
                    "amount": p.amount,
                    "currency": str(doc["currency"]).lower(),
                    "description": p.description,
                    "metadata": {INVOICE_ID_KEY: invoice_id, LINE_KEY: p.line},
                },
                options={
                    "idempotency_key": f"meter-gateway/{invoice_id}/item/{p.line}/{stripe_invoice}"
                },
            ),
        )

    def _find(self, customer: str, invoice_id: str) -> stripe.Invoice | None:
        """The Stripe invoice an earlier attempt made for ``invoice_id`` (newest first: it is
        among the customer's latest)."""
        link = stripe_link(self._store, invoice_id)
        if link is not None and link.stripe_customer_id == customer:
            if link.status == "deleted":
                return None
            return self._call(
                "retrieve invoice",
                lambda: self._stripe.v1.invoices.retrieve(link.stripe_invoice_id),
            )
        listed = self._call(
            "list invoices",
            lambda: self._stripe.v1.invoices.list(params={"customer": customer, "limit": 100}),
        )
        for inv in self._pages(listed):
            if _metadata(inv).get(INVOICE_ID_KEY) == invoice_id:
                return inv
        return None

    def _lines(self, stripe_invoice: str) -> Iterator[stripe.InvoiceLineItem]:
        listed = self._call(
            "list invoice lines",
            lambda: self._stripe.v1.invoices.line_items.list(stripe_invoice, params={"limit": 100}),
        )
        return self._pages(listed)

    def _pages(self, listed: stripe.ListObject[S]) -> Iterator[S]:
        try:
            yield from listed.auto_paging_iter()
        except stripe.StripeError as exc:
            self._fail("list the next page", exc)

    def _keep(self, invoice_id: str, customer: str, stripe_invoice: str, status: str) -> None:
        now = self._clock.now_ns()
        doc = {
            "stripeInvoiceId": stripe_invoice,
            "stripeCustomerId": customer,
            "status": status,
            "syncedNs": now,
            "syncedAt": format_timestamp(now),
        }
        self._store.job_commit({STATE_PREFIX + invoice_id: doc}, [], None, now)

    def _call(self, what: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except stripe.StripeError as exc:
            self._fail(what, exc)

    def _fail(self, what: str, exc: stripe.StripeError) -> NoReturn:
        status = exc.http_status
        detail = f"Stripe {what}: {type(exc).__name__}"
        if status is not None:
            detail += f" HTTP {status}"
        if exc.code:
            detail += f" {exc.code}"
        detail += f": {exc.user_message or exc}"
        if exc.request_id:
            detail += f" (request {exc.request_id})"
        # A refusal of this request (400, 404, 409: no such customer, a paid invoice) fails this
        # event alone; no answer, 5xx, 429 or a bad API key concern every event.
        refused = isinstance(exc, stripe.InvalidRequestError | stripe.IdempotencyError)
        if refused and status is not None and 400 <= status < 500 and status != 429:
            raise EventError(detail) from exc
        raise DeliveryError(detail) from exc
