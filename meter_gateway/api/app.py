"""The Starlette application: routes of SPEC §5 over a ``Gateway``."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from meter_gateway.aggregation.windows import Window
from meter_gateway.api.auth import AuthError
from meter_gateway.api.billing import billing_routes
from meter_gateway.api.openapi import openapi_document
from meter_gateway.billing import rating
from meter_gateway.catalog import MODELS, CatalogError
from meter_gateway.decimals import fmt
from meter_gateway.pipeline.timestamps import format_timestamp, parse_timestamp
from meter_gateway.service import Gateway
from meter_gateway.usage import current_period, windows
from receivers.remote_write import RemoteWriteReceiver
from receivers.rest import error_response, ingest, json_response

Handler = Callable[[Request], Awaitable[Response]]
MAX_PAGE = 10_000


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def create_app(gw: Gateway) -> Starlette:
    def guarded(scope: str | None, handler: Callable[[Request], Awaitable[Response]]) -> Handler:
        async def endpoint(request: Request) -> Response:
            if scope is not None:
                try:
                    gw.keys.check(request.headers.get("authorization"), scope)
                except AuthError as exc:
                    headers = {"WWW-Authenticate": 'Bearer realm="meter-gateway"'}
                    return error_response(
                        exc.status, exc.message, headers if exc.status == 401 else None
                    )
            try:
                return await handler(request)
            except BadRequest as exc:
                return error_response(exc.status, str(exc))
            except CatalogError as exc:
                return json_response(
                    {"error": "invalid catalog change", "errors": exc.errors}, exc.status
                )

        return endpoint

    ops_scope = None if gw.config.auth.open_operations else "read"

    async def post_usage(request: Request) -> Response:
        return await ingest(request, gw)

    remote_write = RemoteWriteReceiver(
        gw.config.rules,
        gw.validator,
        gw.ingestor,
        gw.store,
        gw.config.ingest,
        gw.telemetry,
        gw.config.ingest.retry_after.total_seconds(),
    )

    async def post_write(request: Request) -> Response:
        return await remote_write.handle(request)

    async def get_write(request: Request) -> Response:
        # Vector's prometheus_remote_write healthcheck: a GET that must answer 200.
        return Response(status_code=200)

    async def head_usage(request: Request) -> Response:
        return Response(status_code=200)

    async def get_usage(request: Request) -> Response:
        q = request.query_params
        catalog = gw.catalog.current
        customer = q.get("customerId")
        if customer is not None:
            cid = catalog.customer_id(customer)
            if cid is None:
                raise BadRequest(f"unknown customer {customer!r}", 404)
            customer = cid
        dimension = q.get("dimensionId")
        if dimension is not None and dimension not in catalog.dimensions:
            raise BadRequest(f"unknown dimension {dimension!r}", 404)
        tz = _tz(q.get("tz"), gw.tz)
        now = gw.clock.now_ns()
        default_from, _ = current_period(now, tz)
        from_ns = _time(q.get("from"), "from", default_from)
        to_ns = _time(q.get("to"), "to", now + 1)
        if to_ns <= from_ns:
            raise BadRequest("'to' must be after 'from'")
        window = q.get("window", "raw")
        if window == "raw":
            limit = _int(q.get("limit"), "limit", 1000, 1, MAX_PAGE)
            after = _cursor(q.get("cursor"))
            rows = await run_in_threadpool(
                gw.store.records, customer, dimension, from_ns, to_ns, after, limit
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
                _encode_cursor(rows[-1].timestamp_ns, rows[-1].seq) if len(rows) == limit else None
            )
            return json_response({"data": data, "cursor": cursor})
        if window not in ("hour", "day", "month"):
            raise BadRequest(f"window must be raw, hour, day or month, got {window!r}")
        w: Window = window  # type: ignore[assignment]
        max_windows = {"hour": 24 * 400, "day": 3660, "month": 1200}[w]
        if (to_ns - from_ns) // 1_000_000_000 // {"hour": 3600, "day": 82800, "month": 2_419_200}[
            w
        ] > max_windows:
            raise BadRequest(f"too many {w} windows in the range; narrow from/to")
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
            raise BadRequest(f"unknown customer {request.path_params['id']!r}", 404)
        now = gw.clock.now_ns()
        p_start, p_end = current_period(now, gw.tz)
        from_ns = _time(q.get("from"), "from", p_start)
        to_ns = _time(q.get("to"), "to", p_end)
        if to_ns <= from_ns:
            raise BadRequest("'to' must be after 'from'")
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
                        "amount": None if ln.amount is None else str(ln.amount),
                        **({"warnings": list(ln.warnings)} if ln.warnings else {}),
                    }
                    for ln in s.lines
                ],
                "total": None if s.total is None else str(s.total),
            }
        )

    def catalog_routes(kind: str) -> list[Route]:
        async def list_(request: Request) -> Response:
            items = getattr(gw.catalog.current, kind)
            return json_response(
                {"data": [v.model_dump(mode="json") for _, v in sorted(items.items())]}
            )

        async def get(request: Request) -> Response:
            item = getattr(gw.catalog.current, kind).get(request.path_params["id"])
            if item is None:
                raise BadRequest(f"{kind[:-1]} {request.path_params['id']!r} not found", 404)
            return json_response(item.model_dump(mode="json"))

        async def create(request: Request) -> Response:
            item = gw.catalog.parse(kind, await _json_body(request))
            await run_in_threadpool(gw.catalog.put, kind, item, True)
            return json_response(item.model_dump(mode="json"), 201)

        async def replace(request: Request) -> Response:
            body = await _json_body(request)
            if isinstance(body, dict):
                body.setdefault("id", request.path_params["id"])
            item = gw.catalog.parse(kind, body)
            if getattr(item, "id") != request.path_params["id"]:  # noqa: B009
                raise BadRequest("the body's id differs from the path's id")
            await run_in_threadpool(gw.catalog.put, kind, item)
            return json_response(item.model_dump(mode="json"))

        async def delete(request: Request) -> Response:
            found = await run_in_threadpool(gw.catalog.delete, kind, request.path_params["id"])
            if not found:
                raise BadRequest(f"{kind[:-1]} {request.path_params['id']!r} not found", 404)
            return Response(status_code=204)

        return [
            Route(f"/v1/{kind}", guarded("read", list_), methods=["GET"]),
            Route(f"/v1/{kind}", guarded("admin", create), methods=["POST"]),
            Route(f"/v1/{kind}/{{id}}", guarded("read", get), methods=["GET"]),
            Route(f"/v1/{kind}/{{id}}", guarded("admin", replace), methods=["PUT"]),
            Route(f"/v1/{kind}/{{id}}", guarded("admin", delete), methods=["DELETE"]),
        ]

    async def rejected(request: Request) -> Response:
        q = request.query_params
        limit = _int(q.get("limit"), "limit", 100, 1, MAX_PAGE)
        after = _int(q.get("cursor"), "cursor", 0, 0, 2**62)
        rows = await run_in_threadpool(gw.store.rejected, after, limit, q.get("reason"))
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

    async def metrics(request: Request) -> Response:
        body = await run_in_threadpool(generate_latest, gw.telemetry.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if not gw.ready:
            return json_response({"status": "draining"}, 503)
        return json_response({"status": "ready", "queued_records": gw.ingestor.queued_records})

    async def openapi(request: Request) -> Response:
        return json_response(openapi_document())

    routes = [
        Route("/v1/usage", guarded("ingest", post_usage), methods=["POST"]),
        Route("/usage", guarded("ingest", post_usage), methods=["POST"]),
        Route("/api/v1/write", guarded("ingest", post_write), methods=["POST"]),
        Route("/api/v1/write", guarded(None, get_write), methods=["GET", "HEAD"]),
        Route("/v1/usage", guarded("ingest", head_usage), methods=["HEAD"]),
        Route("/v1/usage", guarded("read", get_usage), methods=["GET"]),
        Route("/v1/customers/{id}/usage-summary", guarded("read", usage_summary), methods=["GET"]),
        Route("/v1/rejected", guarded("read", rejected), methods=["GET"]),
        Route("/metrics", guarded(ops_scope, metrics), methods=["GET"]),
        Route("/healthz", guarded(ops_scope, healthz), methods=["GET", "HEAD"]),
        Route("/readyz", guarded(ops_scope, readyz), methods=["GET", "HEAD"]),
        Route("/openapi.json", guarded(None, openapi), methods=["GET"]),
    ]
    for kind in MODELS:
        routes.extend(catalog_routes(kind))
    routes.extend(billing_routes(gw, guarded))
    return Starlette(routes=routes)


async def _json_body(request: Request) -> Any:
    body = await request.body()
    if len(body) > 1024 * 1024:
        raise BadRequest("catalog documents are limited to 1 MiB", 413)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None


def _time(raw: str | None, name: str, default: int) -> int:
    if raw is None or raw == "":
        return default
    try:
        return parse_timestamp(raw)
    except ValueError as exc:
        raise BadRequest(f"{name}: {exc}") from None


def _tz(raw: str | None, default: ZoneInfo) -> ZoneInfo:
    if not raw:
        return default
    try:
        return ZoneInfo(raw)
    except (ZoneInfoNotFoundError, ValueError):
        raise BadRequest(f"tz: {raw!r} is not an IANA time zone") from None


def _int(raw: str | None, name: str, default: int, lo: int, hi: int) -> int:
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise BadRequest(f"{name} must be a whole number from {lo} to {hi}, got {raw!r}")
    return int(raw)


def _encode_cursor(ts: int, seq: int) -> str:
    return base64.urlsafe_b64encode(f"{ts}:{seq}".encode()).decode()


def _cursor(raw: str | None) -> tuple[int, int] | None:
    if not raw:
        return None
    try:
        ts, seq = base64.urlsafe_b64decode(raw.encode()).decode().split(":")
        return int(ts), int(seq)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadRequest("cursor is not one this API returned") from None
