"""Routes for invoices, the prepaid wallet, margin and meter state (SPEC §5).

``billing_routes`` is handed the gateway and the app's scope guard; handlers raise the billing
modules' errors, which become ``{"error": ...}`` answers with their status here.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from meter_gateway import meters
from meter_gateway.billing import invoices as inv
from meter_gateway.billing import rating, wallet
from meter_gateway.decimals import DecimalError, fmt, parse_value
from meter_gateway.pipeline.timestamps import format_timestamp, parse_timestamp
from meter_gateway.service import Gateway
from meter_gateway.store.base import ConflictError, LedgerEntry
from meter_gateway.usage import current_period
from receivers.rest import error_response, json_response

Handler = Callable[[Request], Awaitable[Response]]
Guard = Callable[[str | None, Handler], Handler]
MAX_BODY = 64 * 1024


class _Error(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def billing_routes(gw: Gateway, guarded: Guard) -> list[Route]:
    def handled(handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except (_Error, inv.InvoiceError) as exc:
                return error_response(exc.status, str(exc))
            except wallet.WalletError as exc:
                return error_response(422, str(exc))
            except ConflictError as exc:
                return error_response(409, str(exc))

        return endpoint

    def route(path: str, scope: str, method: str, handler: Handler) -> Route:
        return Route(path, guarded(scope, handled(handler)), methods=[method])

    def customer_of(request: Request) -> str:
        ref = request.path_params["id"]
        cid = gw.catalog.current.customer_id(ref)
        if cid is None:
            raise _Error(404, f"unknown customer {ref!r}")
        return cid

    def period(raw_from: Any, raw_to: Any) -> tuple[int, int]:
        p_start, p_end = current_period(gw.clock.now_ns(), gw.tz)
        from_ns = _time(raw_from, "from", p_start)
        to_ns = _time(raw_to, "to", p_end)
        if to_ns <= from_ns:
            raise _Error(400, "'to' must be after 'from'")
        return from_ns, to_ns

    # --- invoices

    async def create_invoice(request: Request) -> Response:
        body = await _body(request)
        from_ns, to_ns = period(body.get("from"), body.get("to"))
        row = await run_in_threadpool(gw.invoices.create, request.path_params["id"], from_ns, to_ns)
        return _bytes(inv.render_json(row.document), "json", 201)

    async def list_invoices(request: Request) -> Response:
        q = request.query_params
        limit = _limit(q.get("limit"))
        after = _cursor(q.get("cursor"))
        rows = await run_in_threadpool(
            gw.invoices.for_customer, request.path_params["id"], after, limit
        )
        cursor = None
        if len(rows) == limit:
            cursor = base64.urlsafe_b64encode(f"{rows[-1].created_ns}:{rows[-1].id}".encode())
        return json_response(
            {
                "data": [inv.summary_json(r) for r in rows],
                "cursor": None if cursor is None else cursor.decode(),
            }
        )

    async def get_invoice(request: Request) -> Response:
        fmt_ = request.query_params.get("format", "json")
        body = await run_in_threadpool(gw.invoices.render, request.path_params["id"], fmt_)
        return _bytes(body, fmt_, 200, request.path_params["id"])

    async def finalize_invoice(request: Request) -> Response:
        row = await run_in_threadpool(gw.invoices.finalize, request.path_params["id"])
        return _bytes(row.renditions["json"], "json", 200)

    # --- wallet

    async def get_wallet(request: Request) -> Response:
        cid = customer_of(request)
        after = _int(request.query_params.get("after"), "after")

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
        body = await _body(request)
        try:
            amount = parse_value(body.get("amount"))
        except DecimalError as exc:
            raise _Error(422, f"amount: {exc}") from None
        currency = body.get("currency")
        if currency is None:
            customer = gw.catalog.current.customers[cid]
            offering = gw.catalog.current.offerings.get(customer.offering or "")
            if offering is None:
                raise _Error(422, "currency: required (the customer has no offering)")
            currency = offering.currency
        for field in ("currency", "id", "note"):
            v = body.get(field) if field != "currency" else currency
            if v is not None and (not isinstance(v, str) or len(v) > 200):
                raise _Error(422, f"{field}: expected a string of at most 200 characters")
        result = await run_in_threadpool(
            wallet.top_up,
            gw.store,
            cid,
            currency,
            amount,
            gw.clock.now_ns(),
            body.get("id"),
            body.get("note"),
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
            raise _Error(404, f"meter {request.path_params['id']!r} not found")

        def read() -> meters.MeterReading | None:
            st = gw.store.job_state(meters.STATE_PREFIX + meter.id).get(
                meters.STATE_PREFIX + meter.id
            )
            return meters.reading(gw.store, catalog, meter, gw.tz, gw.clock.now_ns(), st)

        r = await run_in_threadpool(read)
        if r is None:
            raise _Error(409, f"meter {meter.id!r}: dimension {meter.dimension!r} is gone")
        return json_response(r.to_json())

    return [
        route("/v1/customers/{id}/invoices", "admin", "POST", create_invoice),
        route("/v1/customers/{id}/invoices", "read", "GET", list_invoices),
        route("/v1/invoices/{id}", "read", "GET", get_invoice),
        route("/v1/invoices/{id}/finalize", "admin", "POST", finalize_invoice),
        route("/v1/customers/{id}/wallet", "read", "GET", get_wallet),
        route("/v1/customers/{id}/wallet/top-ups", "admin", "POST", top_up),
        route("/v1/customers/{id}/margin", "read", "GET", get_margin),
        route("/v1/meters/{id}/state", "read", "GET", meter_state),
    ]


def _bytes(body: bytes, format: str, status: int, name: str | None = None) -> Response:
    headers = None
    if name is not None and format != "json":
        headers = {"Content-Disposition": f'inline; filename="{name}.{format}"'}
    return Response(body, status_code=status, media_type=inv.FORMATS[format], headers=headers)


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise _Error(413, f"the body is limited to {MAX_BODY} bytes")
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _Error(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _Error(400, "body must be a JSON object")
    return body


def _time(raw: Any, name: str, default: int) -> int:
    if raw is None or raw == "":
        return default
    if not isinstance(raw, str):
        raise _Error(400, f"{name}: expected an RFC 3339 timestamp string, got {raw!r}")
    try:
        return parse_timestamp(raw)
    except ValueError as exc:
        raise _Error(400, f"{name}: {exc}") from None


def _int(raw: str | None, name: str) -> int:
    if raw is None or raw == "":
        return 0
    if not raw.isdigit() or len(raw) > 18:
        raise _Error(400, f"{name} must be a whole number, got {raw!r}")
    return int(raw)


def _limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return 100
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise _Error(400, f"limit must be a whole number from 1 to 1000, got {raw!r}")
    return int(raw)


def _cursor(raw: str | None) -> tuple[int, str] | None:
    if not raw:
        return None
    try:
        created, _, id_ = base64.urlsafe_b64decode(raw.encode()).decode().partition(":")
        return int(created), id_
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise _Error(400, "cursor is not one this API returned") from None
