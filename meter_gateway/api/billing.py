"""Routes for invoices, the prepaid wallet, margin and meter state (SPEC §5, §11).

``billing_routes`` is handed the gateway and the app's guard, which checks the scope and the
query parameters and turns the errors handlers raise (``ApiError``, the billing modules' own)
into ``{"error": ...}`` answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from meter_gateway import meters
from meter_gateway.api import params
from meter_gateway.api.errors import ApiError, shown
from meter_gateway.api.idempotency import Idempotency, derived_id
from meter_gateway.api.schemas import InvoiceRequest, TopUp, parse_body
from meter_gateway.api.services import ApiServices
from meter_gateway.billing import cycles, rating, wallet
from meter_gateway.billing import invoices as inv
from meter_gateway.decimals import fmt
from meter_gateway.http import json_response
from meter_gateway.pipeline.timestamps import format_timestamp
from meter_gateway.store.base import ConflictError, LedgerEntry
from meter_gateway.usage import current_period

Handler = Callable[[Request], Awaitable[Response]]
Guard = Callable[[str | None, Handler, Collection[str] | None], Handler]
INVOICE_STATUSES = ("draft", "finalized", "void")


def billing_routes(gw: ApiServices, guarded: Guard) -> list[Route]:
    def route(
        path: str, scope: str, method: str, handler: Handler, query: Collection[str] = ()
    ) -> Route:
        return Route(path, guarded(scope, handler, query), methods=[method])

    def customer_of(request: Request) -> str:
        ref = request.path_params["id"]
        cid = gw.catalog.current.customer_id(ref)
        if cid is None:
            raise ApiError(404, f"unknown customer {shown(ref)}")
        return cid

    def invoice_of(request: Request) -> str:
        # Checked before the store sees it: an id no invoice can have (NUL, 10k characters).
        ref: str = request.path_params["id"]
        if not params.resource_id(ref):
            raise ApiError(404, f"invoice {shown(ref)} not found")
        return ref

    def period(raw_from: Any, raw_to: Any, customer: str | None = None) -> tuple[int, int]:
        """from/to, by default the current month (the customer's current billing cycle, when
        it has one)."""
        now = gw.clock.now_ns()
        default = current_period(now, gw.tz)
        found = gw.catalog.current.customers.get(customer) if customer else None
        if found is not None and found.billing is not None:
            default = cycles.current_cycle(found, cycles.zone(found.billing, gw.tz), now)
        from_ns, to_ns = params.period(raw_from, raw_to, default)
        return from_ns, params.within_store(to_ns)

    once = Idempotency(gw.store, gw.clock).wrap

    # --- invoices

    async def create_invoice(request: Request) -> Response:
        body = parse_body(InvoiceRequest, await request.body(), empty_ok=True)
        ref = request.path_params["id"]
        from_ns, to_ns = period(body.from_, body.to, gw.catalog.current.customer_id(ref))
        items = [inv.Item(i.description, i.quantity, i.unitPrice) for i in body.items or ()]
        invoice_id = derived_id(request, "inv_")

        def create() -> dict[str, Any]:
            try:
                return gw.invoices.create(ref, from_ns, to_ns, items, invoice_id).document
            except ConflictError:
                if invoice_id is None:
                    raise
                # A retry whose first answer was never recorded (its process died after the
                # commit): the draft the key named is there.
                return gw.invoices.get(invoice_id).document

        doc = await run_in_threadpool(create)
        return _bytes(inv.render_json(doc), "json", 201)

    async def search_invoices(request: Request) -> Response:
        q = request.query_params
        limit = params.limit(q.get("limit"))
        after = params.invoice_cursor(q.get("cursor"))
        status = q.get("status") or None
        if status is not None:
            status = params.choice(status, "status", INVOICE_STATUSES, status)
        from_ns = params.time(q.get("from"), "from", 0) if q.get("from") else None
        to_ns = params.time(q.get("to"), "to", 0) if q.get("to") else None
        if from_ns is not None and to_ns is not None and to_ns <= from_ns:
            raise params.bad("to", f"must be after from ({format_timestamp(from_ns)})")
        # Filters, not periods to measure: past the store's horizon they hold nothing more.
        horizon = params.STORE_HORIZON_NS
        from_ns = None if from_ns is None else min(from_ns, horizon)
        to_ns = None if to_ns is None else min(to_ns, horizon)
        rows = await run_in_threadpool(
            gw.invoices.search, q.get("customerId") or None, status, from_ns, to_ns, after, limit
        )
        cursor = None
        if len(rows) == limit:
            cursor = params.encode_invoice_cursor(rows[-1].created_ns, rows[-1].id)
        return json_response({"data": [inv.summary_json(r) for r in rows], "cursor": cursor})

    async def delete_invoice(request: Request) -> Response:
        await run_in_threadpool(gw.invoices.delete, invoice_of(request))
        return Response(status_code=204)

    async def void_invoice(request: Request) -> Response:
        row = await run_in_threadpool(gw.invoices.void, invoice_of(request))
        return _bytes(row.renditions["json"], "json", 200)

    async def list_invoices(request: Request) -> Response:
        q = request.query_params
        limit = params.limit(q.get("limit"))
        after = params.invoice_cursor(q.get("cursor"))
        rows = await run_in_threadpool(
            gw.invoices.for_customer, request.path_params["id"], after, limit
        )
        cursor = None
        if len(rows) == limit:
            cursor = params.encode_invoice_cursor(rows[-1].created_ns, rows[-1].id)
        return json_response({"data": [inv.summary_json(r) for r in rows], "cursor": cursor})

    async def get_invoice(request: Request) -> Response:
        invoice_id = invoice_of(request)
        fmt_ = params.choice(
            request.query_params.get("format"), "format", list(inv.FORMATS), "json"
        )
        body = await run_in_threadpool(gw.invoices.render, invoice_id, fmt_)
        return _bytes(body, fmt_, 200, invoice_id)

    async def finalize_invoice(request: Request) -> Response:
        row = await run_in_threadpool(gw.invoices.finalize, invoice_of(request))
        return _bytes(row.renditions["json"], "json", 200)

    # --- wallet

    async def get_wallet(request: Request) -> Response:
        cid = customer_of(request)
        after = params.seq_cursor(request.query_params.get("after"), "after")

        def read() -> tuple[list[LedgerEntry], list[LedgerEntry]]:
            last = [w for w in gw.store.wallets() if w.customer == cid]
            return last, gw.store.wallet_entries(cid, None, after, 1000)

        last, entries = await run_in_threadpool(read)
        return json_response(
            {
                "customerId": cid,
                "balances": [{"currency": w.currency, "balance": str(w.balance)} for w in last],
                "entries": [wallet.entry_json(e) for e in entries],
            }
        )

    async def top_up(request: Request) -> Response:
        cid = customer_of(request)
        body = parse_body(TopUp, await request.body())
        currency = body.currency
        if currency is None:
            customer = gw.catalog.current.customers[cid]
            offering = gw.catalog.current.offerings.get(customer.offering or "")
            if offering is None:
                raise ApiError(422, "currency: required (the customer has no offering)")
            currency = offering.currency
        result = await run_in_threadpool(
            wallet.top_up,
            gw.store,
            cid,
            currency,
            body.amount,
            gw.clock.now_ns(),
            body.id or derived_id(request, "key:"),
            body.note,
        )
        return json_response(wallet.entry_json(result.entry), 201 if result.created else 200)

    # --- margin and meters

    async def get_margin(request: Request) -> Response:
        cid = customer_of(request)
        from_ns, to_ns = period(request.query_params.get("from"), request.query_params.get("to"))
        at = rating.as_of(gw.clock.now_ns(), from_ns, to_ns)
        m = await run_in_threadpool(
            rating.rate, gw.store, gw.catalog.current, cid, from_ns, to_ns, at, gw.tz
        )
        return json_response(
            {
                "customerId": cid,
                "from": format_timestamp(from_ns),
                "to": format_timestamp(to_ns),
                "asOf": format_timestamp(m.as_of_ns),
                "currency": m.currency,
                "dimensions": [
                    {
                        "dimensionId": ln.dimension.id,
                        "quantity": fmt(ln.quantity),
                        "billed": ln.charge is not None,
                        "revenue": str(ln.revenue),
                        "cost": str(ln.cost),
                        "margin": str(ln.margin),
                        **({"warnings": list(ln.warnings)} if ln.warnings else {}),
                    }
                    for ln in m.lines
                ],
                "revenue": str(m.revenue),
                "cost": str(m.cost),
                "margin": str(m.margin),
            }
        )

    async def meter_state(request: Request) -> Response:
        catalog = gw.catalog.current
        meter = catalog.meters.get(request.path_params["id"])
        if meter is None:
            raise ApiError(404, f"meter {shown(request.path_params['id'])} not found")

        def read() -> meters.MeterReading | None:
            st = gw.store.job_state(meters.STATE_PREFIX + meter.id).get(
                meters.STATE_PREFIX + meter.id
            )
            return meters.reading(gw.store, catalog, meter, gw.tz, gw.clock.now_ns(), st)

        r = await run_in_threadpool(read)
        if r is None:
            raise ApiError(409, f"meter {meter.id!r}: dimension {meter.dimension!r} is gone")
        return json_response(r.to_json())

    return [
        route("/v1/customers/{id}/invoices", "admin", "POST", once(create_invoice)),
        route(
            "/v1/customers/{id}/invoices",
            "read",
            "GET",
            list_invoices,
            params.INVOICE_LIST_PARAMS,
        ),
        route("/v1/invoices", "read", "GET", search_invoices, params.INVOICE_SEARCH_PARAMS),
        route("/v1/invoices/{id}", "read", "GET", get_invoice, params.INVOICE_PARAMS),
        route("/v1/invoices/{id}", "admin", "DELETE", delete_invoice),
        route("/v1/invoices/{id}/finalize", "admin", "POST", finalize_invoice),
        route("/v1/invoices/{id}/void", "admin", "POST", void_invoice),
        route("/v1/customers/{id}/wallet", "read", "GET", get_wallet, params.WALLET_PARAMS),
        route("/v1/customers/{id}/wallet/top-ups", "admin", "POST", once(top_up)),
        route("/v1/customers/{id}/margin", "read", "GET", get_margin, params.PERIOD_PARAMS),
        route("/v1/meters/{id}/state", "read", "GET", meter_state),
    ]


def _bytes(body: bytes, format: str, status: int, name: str | None = None) -> Response:
    headers = None
    if name is not None and format != "json":
        headers = {"Content-Disposition": f'inline; filename="{name}.{format}"'}
    return Response(body, status_code=status, media_type=inv.FORMATS[format], headers=headers)
