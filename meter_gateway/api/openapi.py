"""The OpenAPI description served at ``/openapi.json``."""

from __future__ import annotations

from typing import Any

from meter_gateway import __version__

_RECORD = {
    "type": "object",
    "required": ["customerId", "dimensionId", "recordValue", "timestamp"],
    "properties": {
        "id": {"type": "string", "description": "Idempotency key: counted once per dedup window"},
        "timestamp": {"type": "string", "format": "date-time"},
        "customerId": {"type": "string", "description": "Customer id or alias"},
        "dimensionId": {"type": "string"},
        "recordValue": {"oneOf": [{"type": "number"}, {"type": "string"}]},
        "metadata": {"type": "object"},
    },
}
_INGEST_RESULT = {
    "type": "object",
    "properties": {
        "accepted": {"type": "integer"},
        "duplicates": {"type": "integer"},
        "rejected": {"type": "integer"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "index": {"type": "integer"},
                    "field": {"type": "string", "nullable": True},
                    "error": {"type": "string"},
                    "reason": {"type": "string"},
                },
            },
        },
    },
}


def _op(summary: str, scope: str | None, **extra: Any) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {"200": {"description": "OK"}}}
    if scope:
        op["security"] = [{"bearer": [scope]}, {"basic": [scope]}]
        op["responses"].update(
            {
                "401": {"description": "missing or invalid key"},
                "403": {"description": f"key lacks the {scope} scope"},
            }
        )
    op.update(extra)
    return op


def openapi_document() -> dict[str, Any]:
    ingest = _op(
        "Ingest usage records: one object, a JSON array or NDJSON",
        "ingest",
        parameters=[{"name": "atomic", "in": "query", "schema": {"type": "boolean"}}],
        requestBody={
            "content": {
                "application/json": {
                    "schema": {"oneOf": [_RECORD, {"type": "array", "items": _RECORD}]}
                },
                "application/x-ndjson": {"schema": {"type": "string"}},
            }
        },
    )
    ingest["responses"]["200"] = {
        "description": "Stored",
        "content": {"application/json": {"schema": _INGEST_RESULT}},
    }
    ingest["responses"].update(
        {
            "413": {"description": "body or batch over the limit"},
            "422": {"description": "atomic batch with invalid records, or a lone invalid record"},
            "429": {"description": "queue full; retry after Retry-After seconds"},
            "503": {"description": "store unavailable or draining; retry"},
        }
    )
    paths: dict[str, Any] = {
        "/v1/usage": {
            "post": ingest,
            "head": _op("Healthcheck for Vector's http sink", "ingest"),
            "get": _op(
                "Raw records or aggregated windows",
                "read",
                parameters=[
                    {"name": n, "in": "query", "schema": {"type": "string"}}
                    for n in (
                        "customerId",
                        "dimensionId",
                        "from",
                        "to",
                        "window",
                        "tz",
                        "cursor",
                        "limit",
                    )
                ],
            ),
        },
        "/usage": {"post": ingest},
        "/api/v1/write": {
            "post": _op(
                "Prometheus remote write 1.0 (snappy protobuf WriteRequest); 204 when committed, "
                "400 invalid samples (valid ones stored), 413 too large, 415 remote write 2.0, "
                "429 (Vector) or 503 when overloaded",
                "ingest",
            ),
            "get": _op("Healthcheck for remote-write senders (200)", None),
        },
        "/v1/customers/{id}/usage-summary": {"get": _op("Billable quantity per dimension", "read")},
        "/v1/rejected": {"get": _op("Rejected records with reasons", "read")},
        "/v1/customers/{id}/invoices": {
            "post": _op("Create a draft invoice for {from, to} (off-cycle, any period)", "admin"),
            "get": _op("List a customer's invoices", "read"),
        },
        "/v1/invoices/{id}": {
            "get": _op(
                "An invoice as JSON, or ?format=csv|html",
                "read",
                parameters=[{"name": "format", "in": "query", "schema": {"type": "string"}}],
            )
        },
        "/v1/invoices/{id}/finalize": {"post": _op("Finalize (immutable from then on)", "admin")},
        "/v1/customers/{id}/wallet": {"get": _op("Prepaid balances and ledger", "read")},
        "/v1/customers/{id}/wallet/top-ups": {
            "post": _op("Add prepaid credits {amount, currency?, id?, note?}", "admin")
        },
        "/v1/customers/{id}/margin": {"get": _op("Revenue, cost and margin", "read")},
        "/v1/meters/{id}/state": {"get": _op("A meter's current value and thresholds", "read")},
        "/metrics": {"get": _op("Prometheus metrics", None)},
        "/healthz": {"get": _op("Liveness", None)},
        "/readyz": {"get": _op("Readiness", None)},
    }
    for kind in ("dimensions", "offerings", "customers", "meters"):
        paths[f"/v1/{kind}"] = {
            "get": _op(f"List {kind}", "read"),
            "post": _op(f"Create one of {kind}", "admin"),
        }
        paths[f"/v1/{kind}/{{id}}"] = {
            "get": _op(f"Get one of {kind}", "read"),
            "put": _op(f"Create or replace one of {kind}", "admin"),
            "delete": _op(f"Delete one of {kind}", "admin"),
        }
    return {
        "openapi": "3.0.3",
        "info": {"title": "meter-gateway", "version": __version__},
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "basic": {"type": "http", "scheme": "basic"},
            }
        },
        "paths": paths,
    }
