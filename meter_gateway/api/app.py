"""The Starlette application: routes of SPEC §5 over the services of ``api.services``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from zoneinfo import ZoneInfo

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from meter_gateway.aggregation.windows import Window
from meter_gateway.api import params
from meter_gateway.api.billing import billing_routes
from meter_gateway.api.errors import ApiError, exception_handlers, shown
from meter_gateway.api.idempotency import Idempotency
from meter_gateway.api.openapi import openapi_document
from meter_gateway.api.schemas import CancellationRequest, decode_object, parse_body
from meter_gateway.api.services import ApiServices
from meter_gateway.billing import plans, rating
from meter_gateway.billing.invoices import InvoiceError
from meter_gateway.billing.wallet import WalletError
from meter_gateway.catalog import MODELS, CatalogError
from meter_gateway.decimals import fmt
from meter_gateway.http import json_response
from meter_gateway.model import Reason
from meter_gateway.pipeline.timestamps import format_timestamp
from meter_gateway.store.base import ConflictError
from meter_gateway.usage import current_period, windows
from receivers.rest import ingest

Handler = Callable[[Request], Awaitable[Response]]
#: Query parameters of the paths that take any (declared in params, with their schemas); every
#: other guarded path takes none.
USAGE_PARAMS = params.USAGE_PARAMS
PERIOD_PARAMS = params.PERIOD_PARAMS
REJECTED_PARAMS = params.REJECTED_PARAMS


def domain_error(exc: Exception) -> ApiError | None:
    """The answer for an error of a lower layer, or None if it is not one of theirs."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, CatalogError):
        return ApiError(exc.status, "; ".join(exc.errors), errors=exc.errors)
    if isinstance(exc, InvoiceError):
        return ApiError(exc.status, exc.message)
    if isinstance(exc, WalletError):
        return ApiError(422, str(exc))
    if isinstance(exc, ConflictError):
        return ApiError(409, str(exc))
    return None


def create_app(gw: ApiServices) -> Starlette:
    def guarded(scope: str | None, handler: Handler, query: Collection[str] | None = ()) -> Handler:
        """``handler`` behind the scope check, refusing query parameters not in ``query``
        (None: the path keeps its own rules, as ingest does), with every error as JSON."""
        allowed = None if query is None else frozenset(query)

        async def endpoint(request: Request) -> Response:
            try:
                if scope is not None:
                    gw.keys.check(request.headers.get("authorization"), scope)
                if allowed is not None:
                    params.check_known(request.query_params.multi_items(), allowed)
                return await handler(request)
            except Exception as exc:
                error = domain_error(exc)
                if error is None:
                    raise
                return error.response()

        return endpoint

    ops_scope = None if gw.config.auth.open_operations else "read"

    async def post_usage(request: Request) -> Response:
        return await ingest(request, gw)

    async def post_write(request: Request) -> Response:
        return await gw.remote_write.handle(request)

    async def get_write(request: Request) -> Response:
        # Vector's prometheus_remote_write healthcheck: a GET that must answer 200.
        return Response(status_code=200)

    async def head_usage(request: Request) -> Response:
        return Response(status_code=200)

    def window_cap(
        customer: str | None,
        dimension: str | None,
        from_ns: int,
        to_ns: int,
        w: Window,
        tz: ZoneInfo,
    ) -> None:
        """Refuse, before computing it, an answer of more than MAX_WINDOWS windows."""
        cap = params.MAX_WINDOWS
        spans = params.window_count(from_ns, to_ns, w, tz, cap)
        pairs = 1
        if spans <= cap and (customer is None or dimension is None):
            pairs = len(gw.store.pairs(customer, dimension, to_ns))
        if spans * pairs > cap:
            many = f"more than {cap:,}" if spans > cap else f"{spans:,} × {pairs:,} series"
            raise params.bad(
                "window",
                f"{w} windows from {format_timestamp(from_ns)} to {format_timestamp(to_ns)} "
                f"would be {many}; one answer holds at most {cap:,} windows: narrow from/to, or "
                "set customerId and dimensionId",
            )

    async def get_usage(request: Request) -> Response:
        q = request.query_params
        catalog = gw.catalog.current
        customer = q.get("customerId")
        if customer is not None:
            cid = catalog.customer_id(customer)
            if cid is None:
                raise ApiError(404, f"unknown customer {shown(customer)}")
            customer = cid
        dimension = q.get("dimensionId")
        if dimension is not None and dimension not in catalog.dimensions:
            raise ApiError(404, f"unknown dimension {shown(dimension)}")
        tz = params.time_zone(q.get("tz"), gw.tz)
        now = gw.clock.now_ns()
        default_from, _ = current_period(now, tz)
        from_ns, to_ns = params.period(q.get("from"), q.get("to"), (default_from, now + 1))
        window = params.choice(q.get("window"), "window", ("raw", "hour", "day", "month"), "raw")
        if window == "raw":
            limit = params.limit(q.get("limit"))
            after = params.record_cursor(q.get("cursor"))
            # No record lies past the store's horizon, so a later bound changes nothing.
            rows = (
                []
                if from_ns >= params.STORE_HORIZON_NS
                else await run_in_threadpool(
                    gw.store.records,
                    customer,
                    dimension,
                    from_ns,
                    min(to_ns, params.STORE_HORIZON_NS),
                    after,
                    limit,
                )
            )
            data = [
                {
                    "id": r.record_id,
                    "timestamp": format_timestamp(r.timestamp_ns),
                    "customerId": r.customer_id,
                    "dimensionId": r.dimension_id,
                    "recordValue": fmt(r.value),
                    "metadata": r.metadata,
                    "source": r.source,
                    "receivedAt": format_timestamp(r.received_ns),
                }
                for r in rows
            ]
            cursor = (
                params.encode_record_cursor(rows[-1].timestamp_ns, rows[-1].seq)
                if len(rows) == limit
                else None
            )
            return json_response({"data": data, "cursor": cursor})
        for name in ("limit", "cursor"):
            if name in q:
                raise params.bad(name, "only window=raw is paginated")
        w: Window = window  # type: ignore[assignment]
        params.within_store(to_ns)
        await run_in_threadpool(window_cap, customer, dimension, from_ns, to_ns, w, tz)
        values = await run_in_threadpool(
            windows, gw.store, catalog, customer, dimension, from_ns, to_ns, w, tz, now
        )
        return json_response(
            {
                "asOf": format_timestamp(min(now, to_ns)),
                "data": [
                    {
                        "start": format_timestamp(v.start),
                        "end": format_timestamp(v.end),
                        "customerId": v.customer,
                        "dimensionId": v.dimension,
                        "value": None if v.value is None else fmt(v.value),
                        **({} if v.projected is None else {"projected": fmt(v.projected)}),
                    }
                    for v in values
                ],
            }
        )

    async def usage_summary(request: Request) -> Response:
        q = request.query_params
        catalog = gw.catalog.current
        cid = catalog.customer_id(request.path_params["id"])
        if cid is None:
            raise ApiError(404, f"unknown customer {shown(request.path_params['id'])}")
        now = gw.clock.now_ns()
        from_ns, to_ns = params.period(q.get("from"), q.get("to"), current_period(now, gw.tz))
        params.within_store(to_ns)
        at = rating.as_of(now, from_ns, to_ns)
        s = await run_in_threadpool(rating.rate, gw.store, catalog, cid, from_ns, to_ns, at, gw.tz)
        return json_response(
            {
                "customerId": s.customer,
                "from": format_timestamp(s.from_ns),
                "to": format_timestamp(s.to_ns),
                "asOf": format_timestamp(s.as_of_ns),
                "currency": s.currency,
                "dimensions": [
                    {
                        "dimensionId": ln.dimension.id,
                        "unit": ln.dimension.unit,
                        "quantity": fmt(ln.quantity),
                        **plans.usage_fields(ln),
                        **({} if ln.credits is None else {"credits": fmt(ln.credits)}),
                        "amount": None if ln.amount is None else str(ln.amount),
                        **({"warnings": list(ln.warnings)} if ln.warnings else {}),
                    }
                    for ln in s.lines
                ],
                **({} if s.credit is None else {"credit": plans.credit_line(s.credit)}),
                **({"fees": [plans.fee_line(f) for f in s.fees]} if s.fees else {}),
                "total": None if s.total is None else str(s.total),
            }
        )

    # Creating POSTs honour Idempotency-Key (SPEC 11): the first answer again for a retry.
    once = Idempotency(gw.store, gw.clock).wrap

    def catalog_routes(kind: str) -> list[Route]:
        async def list_(request: Request) -> Response:
            items = getattr(gw.catalog.current, kind)
            return json_response(
                {"data": [v.model_dump(mode="json") for _, v in sorted(items.items())]}
            )

        async def get(request: Request) -> Response:
            item = getattr(gw.catalog.current, kind).get(request.path_params["id"])
            if item is None:
                raise ApiError(404, f"{kind[:-1]} {shown(request.path_params['id'])} not found")
            return json_response(item.model_dump(mode="json"))

        async def create(request: Request) -> Response:
            item = gw.catalog.parse(kind, decode_object(await request.body()))
            stored = await run_in_threadpool(gw.catalog.put, kind, item, True)
            return json_response(stored.model_dump(mode="json"), 201)

        async def replace(request: Request) -> Response:
            body = decode_object(await request.body())
            body.setdefault("id", request.path_params["id"])
            item = gw.catalog.parse(kind, body)
            if getattr(item, "id") != request.path_params["id"]:  # noqa: B009
                raise ApiError(400, "the body's id differs from the path's id")
            stored = await run_in_threadpool(gw.catalog.put, kind, item)
            return json_response(stored.model_dump(mode="json"))

        async def delete(request: Request) -> Response:
            found = await run_in_threadpool(gw.catalog.delete, kind, request.path_params["id"])
            if not found:
                raise ApiError(404, f"{kind[:-1]} {shown(request.path_params['id'])} not found")
            return Response(status_code=204)

        return [
            Route(f"/v1/{kind}", guarded("read", list_), methods=["GET"]),
            Route(f"/v1/{kind}", guarded("admin", once(create)), methods=["POST"]),
            Route(f"/v1/{kind}/{{id}}", guarded("read", get), methods=["GET"]),
            Route(f"/v1/{kind}/{{id}}", guarded("admin", replace), methods=["PUT"]),
            Route(f"/v1/{kind}/{{id}}", guarded("admin", delete), methods=["DELETE"]),
        ]

    async def rejected(request: Request) -> Response:
        q = request.query_params
        limit = params.limit(q.get("limit"))
        after = params.seq_cursor(q.get("cursor"))
        reason = q.get("reason") or None
        if reason is not None:
            reason = params.choice(reason, "reason", list(Reason), reason)
        rows = await run_in_threadpool(gw.store.rejected, after, limit, reason)
        data = [
            {
                "seq": r.seq,
                "receivedAt": format_timestamp(r.received_ns),
                "receiver": r.source,
                "reason": r.reason,
                "field": r.field,
                "error": r.error,
                "record": r.raw,
            }
            for r in rows
        ]
        return json_response(
            {"data": data, "cursor": str(rows[-1].seq) if len(rows) == limit else None}
        )

    async def cancel_usage(request: Request) -> Response:
        body = parse_body(CancellationRequest, await request.body())
        unique_keys = {
            d.id: d.unique_key for d in gw.catalog.current.dimensions.values() if d.unique_key
        }
        results = await run_in_threadpool(
            gw.store.cancel_records, body.ids, body.reason, gw.clock.now_ns(), unique_keys
        )
        return json_response(
            {
                "results": [
                    {"id": r.id, "status": r.status, "invoiceId": r.invoice_id} for r in results
                ]
            }
        )

    async def cancellations(request: Request) -> Response:
        q = request.query_params
        limit = params.limit(q.get("limit"))
        rows = await run_in_threadpool(
            gw.store.cancellations, params.seq_cursor(q.get("cursor")), limit
        )
        data = [
            {
                "seq": r.seq,
                "id": r.record_id,
                "timestamp": format_timestamp(r.timestamp_ns),
                "customerId": r.customer_id,
                "dimensionId": r.dimension_id,
                "recordValue": fmt(r.value),
                "metadata": r.metadata,
                "source": r.source,
                "receivedAt": format_timestamp(r.received_ns),
                "cancelledAt": format_timestamp(r.cancelled_ns),
                "reason": r.reason,
            }
            for r in rows
        ]
        return json_response(
            {"data": data, "cursor": str(rows[-1].seq) if len(rows) == limit else None}
        )

    async def metrics(request: Request) -> Response:
        body = await run_in_threadpool(generate_latest, gw.telemetry.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if not gw.ready:
            return json_response({"status": "draining"}, 503)
        return json_response({"status": "ready", "queued_records": gw.ingestor.queued_records})

    document: list[bytes] = []  # made on the first request: most gateways are never asked

    async def openapi(request: Request) -> Response:
        if not document:
            document.append(orjson.dumps(openapi_document(gw.config)))
        return Response(document[0], media_type="application/json")

    routes = [
        # Ingest paths keep their own contract (README "Ingest status codes"): query=None.
        Route("/v1/usage", guarded("ingest", post_usage, None), methods=["POST"]),
        Route("/usage", guarded("ingest", post_usage, None), methods=["POST"]),
        Route("/api/v1/write", guarded("ingest", post_write, None), methods=["POST"]),
        Route("/api/v1/write", guarded(None, get_write, None), methods=["GET", "HEAD"]),
        Route("/v1/usage", guarded("ingest", head_usage, None), methods=["HEAD"]),
        Route("/v1/usage", guarded("read", get_usage, USAGE_PARAMS), methods=["GET"]),
        Route(
            "/v1/customers/{id}/usage-summary",
            guarded("read", usage_summary, PERIOD_PARAMS),
            methods=["GET"],
        ),
        Route("/v1/rejected", guarded("read", rejected, REJECTED_PARAMS), methods=["GET"]),
        Route(
            "/v1/usage/cancellations",
            guarded("admin", once(cancel_usage)),
            methods=["POST"],
        ),
        Route(
            "/v1/usage/cancellations",
            guarded("read", cancellations, params.CANCELLATION_PARAMS),
            methods=["GET"],
        ),
        Route("/metrics", guarded(ops_scope, metrics), methods=["GET"]),
        Route("/healthz", guarded(ops_scope, healthz), methods=["GET", "HEAD"]),
        Route("/readyz", guarded(ops_scope, readyz), methods=["GET", "HEAD"]),
        Route("/openapi.json", guarded(None, openapi), methods=["GET"]),
    ]
    for kind in MODELS:
        routes.extend(catalog_routes(kind))
    routes.extend(billing_routes(gw, guarded))
    app = Starlette(routes=routes, exception_handlers=exception_handlers())
    # no redirect for a trailing "/" (an id "%2F" decodes to one): every answer is the JSON shape
    app.router.redirect_slashes = False
    return app
