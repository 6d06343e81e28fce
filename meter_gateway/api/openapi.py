"""The OpenAPI 3.1 description served at ``/openapi.json``.

Bodies and answers come from the pydantic models the handlers validate with (``api.schemas``,
and the config models for the catalog), query parameters from the declarations the guard
enforces (``api.params``). ``OPERATIONS`` lists every route of the app; a test holds the two
to each other, and schemathesis holds a running gateway to the document.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, create_model
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from meter_gateway import __version__
from meter_gateway.api import params, schemas
from meter_gateway.api.params import Param
from meter_gateway.catalog import MODELS
from meter_gateway.config import Config

JSON = "application/json"
REF = "#/components/schemas/{model}"

#: A response: a model (JSON), a raw content map, or None (no body).
Content = type[BaseModel] | Mapping[str, Any] | None


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    operation_id: str
    summary: str
    tag: str
    #: "ingest", "read", "admin"; None: open; "operations": open unless auth.open_operations
    #: is false, then "read".
    scope: str | None
    #: The answers this operation describes itself (2xx, and any error not of the one shape).
    ok: Mapping[int, tuple[str, Content]]
    #: Error answers of the one JSON shape (401 and 403 are added for a scope).
    errors: Sequence[int] = ()
    query: Mapping[str, Param] = field(default_factory=dict)
    path_id: str | None = None
    body: Content = None
    body_required: bool = True
    description: str = ""
    #: Error answers in text/plain (remote write: what Prometheus senders expect).
    text_errors: Sequence[int] = ()
    #: Takes an Idempotency-Key header (api.idempotency).
    idempotent: bool = False


def _catalog_operations() -> list[Operation]:
    ops = []
    for kind, model in MODELS.items():
        one = kind[:-1]
        name = one.capitalize()
        listing = create_model(
            f"{name}List",
            __base__=schemas._Response,
            data=(list[model], ...),  # type: ignore[valid-type]
        )
        path = f"/v1/{kind}"
        item = f"{path}/{{id}}"
        ops += [
            Operation("get", path, f"list{name}s", f"List {kind}", "catalog", "read",
                      {200: (f"Every {one}, by id", listing)}, (400,)),
            Operation("post", path, f"create{name}", f"Create a {one}", "catalog", "admin",
                      {201: (f"The {one} as stored", model)}, (400, 409, 413, 422), body=model,
                      description=f"409 if a {one} with this id exists; 422 naming every "
                      "unknown or invalid field, and every reference to an unknown entry.",
                      idempotent=True),
            Operation("get", item, f"get{name}", f"Get a {one}", "catalog", "read",
                      {200: (f"The {one}", model)}, (400, 404), path_id=f"The {one}'s id."),
            Operation("put", item, f"put{name}", f"Create or replace a {one}", "catalog", "admin",
                      {200: (f"The {one} as stored", model)}, (400, 409, 413, 422), body=model,
                      path_id=f"The {one}'s id (the body's id may be left out).",
                      description="400 if the body's id differs from the path's."),
            Operation("delete", item, f"delete{name}", f"Delete a {one}", "catalog", "admin",
                      {204: (f"The {one} is gone", None)}, (400, 404, 409),
                      path_id=f"The {one}'s id.",
                      description=f"409 while another entry refers to the {one}."),
        ]  # fmt: skip
    return ops


_INGEST_BODY = {
    JSON: {
        "schema": {
            "oneOf": [
                {"$ref": REF.format(model="UsageRecord")},
                {"type": "array", "items": {"$ref": REF.format(model="UsageRecord")}},
            ]
        }
    },
    "application/x-ndjson": {"schema": {"type": "string"}},
}
_ATOMIC = {
    "atomic": Param(
        {"type": "boolean", "default": False},
        "true: store nothing if any record is invalid (422 with every error).",
    )
}
_TEXT = {"text/plain": {"schema": {"type": "string"}}}
_BINARY = {"type": "string", "format": "binary"}
_INGEST_DESCRIPTION = (
    "One record, a JSON array or NDJSON, optionally compressed (Content-Encoding gzip, "
    "deflate, zstd or snappy). Answers after the commit. In a batch the valid records are "
    "stored and the invalid ones listed (200); a lone invalid record answers 422."
)
_INGEST_OK: dict[int, tuple[str, Content]] = {
    200: ("Committed: counts and the errors of rejected records", schemas.IngestResult),
    422: ("A lone invalid record, or an atomic batch with invalid ones (nothing stored)",
          schemas.IngestResult),
}  # fmt: skip


def _ingest(path: str, operation_id: str, summary: str) -> Operation:
    return Operation("post", path, operation_id, summary, "ingest", "ingest", _INGEST_OK,
                     (400, 413, 415, 429, 503), _ATOMIC, body=_INGEST_BODY,
                     description=_INGEST_DESCRIPTION)  # fmt: skip


OPERATIONS: list[Operation] = [
    _ingest("/v1/usage", "ingestUsage", "Ingest usage records"),
    _ingest("/usage", "ingestUsagePaigo", "Ingest usage records (Paigo's path)"),
    Operation("head", "/v1/usage", "checkIngest", "Healthcheck for Vector's http sink", "ingest",
              "ingest", {200: ("The key may ingest", None)}),
    Operation("get", "/v1/usage", "getUsage", "Raw records or aggregated windows", "usage", "read",
              {200: ("window=raw: a page of records; otherwise the windows",
                     {JSON: {"schema": {"oneOf": [{"$ref": REF.format(model="UsagePage")},
                                                  {"$ref": REF.format(model="UsageWindows")}]}}})},
              (400, 404), params.USAGE_PARAMS,
              description="404 for an unknown customerId or dimensionId."),
    Operation("post", "/api/v1/write", "remoteWrite", "Prometheus remote write 1.0", "ingest",
              "ingest", {204: ("Every sample committed", None)}, (400, 413, 415, 429, 503),
              body={"application/x-protobuf": {"schema": _BINARY}},
              description="A snappy-compressed protobuf WriteRequest. 400 lists invalid "
              "samples (the valid ones were stored); 415 for remote write 2.0; 429 (to Vector) "
              "or 503 when the queue is full. Errors are JSON like every other (senders only "
              "log the body); a 400 counts the refused samples (rejected) and lists the first "
              "100 (errors)."),
    Operation("get", "/api/v1/write", "checkRemoteWrite", "Healthcheck for remote-write senders",
              "ingest", None, {200: ("Reachable", None)}),
    Operation("head", "/api/v1/write", "checkRemoteWriteHead",
              "Healthcheck for remote-write senders (HEAD)", "ingest", None,
              {200: ("Reachable", None)}),
    Operation("get", "/v1/customers/{id}/usage-summary", "getUsageSummary",
              "Billable quantity and amount per dimension", "usage", "read",
              {200: ("Measured up to asOf = min(now, to)", schemas.UsageSummary)}, (400, 404),
              params.PERIOD_PARAMS, path_id="Customer id or alias."),
    Operation("get", "/v1/rejected", "listRejected", "Rejected records with reasons", "usage",
              "read", {200: ("A page, oldest first", schemas.RejectedPage)}, (400,),
              params.REJECTED_PARAMS),
    Operation("post", "/v1/usage/cancellations", "cancelUsage",
              "Cancel usage records by id (removed from every aggregate exactly)", "usage",
              "admin", {200: ("What became of each id", schemas.CancellationResults)},
              (400, 409, 413, 422), body=schemas.CancellationRequest, idempotent=True,
              description="Each id is cancelled, not_found, already_cancelled, or invoiced "
              "(its usage is on a finalized invoice, named by invoiceId, and stays billed). "
              "A cancelled id stays used: the record sent again is a duplicate."),
    Operation("get", "/v1/usage/cancellations", "listCancellations",
              "Cancelled usage records (the audit list)", "usage", "read",
              {200: ("A page, oldest cancellation first", schemas.CancellationPage)}, (400,),
              params.CANCELLATION_PARAMS),
    Operation("post", "/v1/customers/{id}/invoices", "createInvoice",
              "Create a draft invoice (off-cycle, any period), with manual items",
              "billing", "admin",
              {201: ("The draft", schemas.Invoice)}, (400, 404, 409, 413, 422),
              path_id="Customer id or alias.", body=schemas.InvoiceRequest, body_required=False,
              description="409 if the customer has no offering.", idempotent=True),
    Operation("get", "/v1/customers/{id}/invoices", "listInvoices", "List a customer's invoices",
              "billing", "read", {200: ("A page, oldest first", schemas.InvoiceList)},
              (400, 404), params.INVOICE_LIST_PARAMS, path_id="Customer id or alias."),
    Operation("get", "/v1/invoices", "searchInvoices", "List invoices across customers",
              "billing", "read", {200: ("A page, oldest first", schemas.InvoiceList)},
              (400, 404), params.INVOICE_SEARCH_PARAMS,
              description="404 for an unknown customerId."),
    Operation("delete", "/v1/invoices/{id}", "deleteInvoice", "Delete a draft invoice",
              "billing", "admin", {204: ("The draft is gone", None)}, (400, 404, 409),
              path_id="Invoice id.",
              description="409 for a finalized or void invoice (void a finalized one)."),
    Operation("post", "/v1/invoices/{id}/void", "voidInvoice",
              "Void a finalized invoice (credits back, its period free again)", "billing",
              "admin", {200: ("The void invoice (again, if it already was)", schemas.Invoice)},
              (400, 404, 409), path_id="Invoice id.",
              description="409 for a draft (delete it instead). Sends invoice.voided."),
    Operation("get", "/v1/invoices/{id}", "getInvoice", "An invoice as JSON, CSV, HTML or PDF",
              "billing", "read",
              {200: ("The invoice; a draft as of now",
                     {JSON: {"schema": {"$ref": REF.format(model="Invoice")}},
                      "text/csv": {"schema": {"type": "string"}},
                      "text/html": {"schema": {"type": "string"}},
                      "application/pdf": {"schema": _BINARY}})},
              (400, 404, 409, 501), params.INVOICE_PARAMS, path_id="Invoice id.",
              description="501 for pdf where WeasyPrint (or Pango under it) is not installed."),
    Operation("post", "/v1/invoices/{id}/finalize", "finalizeInvoice",
              "Finalize an invoice (immutable from then on)", "billing", "admin",
              {200: ("The finalized invoice (again, if it already was)", schemas.Invoice)},
              (400, 404, 409), path_id="Invoice id."),
    Operation("get", "/v1/customers/{id}/wallet", "getWallet", "Prepaid balances and ledger",
              "billing", "read", {200: ("Balances and up to 1,000 entries", schemas.Wallet)},
              (400, 404), params.WALLET_PARAMS, path_id="Customer id or alias."),
    Operation("post", "/v1/customers/{id}/wallet/top-ups", "topUpWallet", "Add prepaid credits",
              "billing", "admin",
              {201: ("The new ledger entry", schemas.WalletEntry),
               200: ("The entry an earlier top-up with this id made", schemas.WalletEntry)},
              (400, 404, 409, 413, 422), path_id="Customer id or alias.", body=schemas.TopUp,
              idempotent=True),
    Operation("get", "/v1/customers/{id}/margin", "getMargin", "Revenue, cost and margin",
              "billing", "read", {200: ("Measured up to asOf = min(now, to)", schemas.Margin)},
              (400, 404), params.PERIOD_PARAMS, path_id="Customer id or alias."),
    Operation("get", "/v1/meters/{id}/state", "getMeterState",
              "A meter's value and thresholds", "usage", "read",
              {200: ("The meter's current period", schemas.MeterState)}, (400, 404, 409),
              path_id="Meter id.", description="409 if the meter's dimension is gone."),
    Operation("get", "/metrics", "getMetrics", "The gateway's own Prometheus metrics",
              "operations", "operations",
              {200: ("Prometheus text format", {"text/plain": {"schema": {"type": "string"}}})},
              (400,)),
    Operation("get", "/healthz", "getHealth", "Liveness", "operations", "operations",
              {200: ("Alive", schemas.Health)}, (400,)),
    Operation("head", "/healthz", "headHealth", "Liveness (HEAD)", "operations", "operations",
              {200: ("Alive", None)}, (400,)),
    Operation("get", "/readyz", "getReadiness", "Readiness", "operations", "operations",
              {200: ("Ready", schemas.Readiness),
               503: ("Draining, or commits are failing", schemas.Readiness)}, (400,)),
    Operation("head", "/readyz", "headReadiness", "Readiness (HEAD)", "operations", "operations",
              {200: ("Ready", None), 503: ("Draining, or commits are failing", None)}, (400,)),
    Operation("get", "/openapi.json", "getOpenApi", "This document", "operations", None,
              {200: ("OpenAPI 3.1", {JSON: {"schema": {"type": "object"}}})}, (400,)),
    *_catalog_operations(),
]  # fmt: skip

#: OTLP/HTTP listens on its own port (``server.otlp_http``): documented with its own server.
OTLP_OPERATION = Operation(
    "post", "/v1/metrics", "otlpExportMetrics", "OTLP/HTTP metrics export", "ingest", "ingest",
    {200: ("Committed; partial_success counts the rejected points",
           {"application/x-protobuf": {"schema": _BINARY}, JSON: {"schema": {"type": "object"}}})},
    body={"application/x-protobuf": {"schema": _BINARY}, JSON: {"schema": {"type": "object"}}},
    description="An ExportMetricsServiceRequest, protobuf or JSON, gzip allowed. Answers in "
    "the request's content type; errors are a google.rpc.Status (400, 401, 403, 413, 415, "
    "429 with Retry-After, 503).",
)  # fmt: skip
_OTLP_ERRORS = (400, 401, 403, 413, 415, 429, 503)

_ERRORS: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "A query parameter, body or time that is not understood"),
    401: ("Unauthorized", "No API key, or an unknown one"),
    403: ("Forbidden", "The key lacks the scope"),
    404: ("NotFound", "No such entry"),
    409: ("Conflict", "The change conflicts with the current state"),
    413: ("PayloadTooLarge", "The body is over the limit"),
    415: ("UnsupportedMediaType", "Content-Type or Content-Encoding not supported"),
    422: ("UnprocessableEntity", "The body names unknown fields or holds invalid values"),
    429: ("TooManyRequests", "The ingest queue is full; retry after Retry-After seconds"),
    501: ("NotImplemented", "This gateway cannot produce it (a missing optional library)"),
    503: ("ServiceUnavailable", "The store cannot commit, or the gateway is draining; retry"),
}
_RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}}


def openapi_document(config: Config | None = None) -> dict[str, Any]:
    """The document for a gateway run with ``config`` (which decides whether the operations
    paths need a key, and where OTLP/HTTP listens)."""
    config = config or Config()
    ops_scope = None if config.auth.open_operations else "read"
    otlp = config.server.otlp_http
    operations = list(OPERATIONS)
    if otlp.enabled:
        operations.append(OTLP_OPERATION)
    models = _models(operations)
    refs, defs = models_json_schema(
        list(models), ref_template=REF, schema_generator=schemas.ApiJsonSchema
    )
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        scope = ops_scope if op.scope == "operations" else op.scope
        doc = _operation(op, scope, lambda m, mode: refs[(m, mode)])
        if op is OTLP_OPERATION:
            doc["responses"].update(
                {str(s): {"description": _ERRORS[s][1], "content": op.ok[200][1]}
                 for s in _OTLP_ERRORS}
            )  # fmt: skip
            doc["servers"] = [_otlp_server(otlp.listen, otlp.cert_file is not None)]
        paths.setdefault(op.path, {})[op.method] = doc
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "meter-gateway",
            "version": __version__,
            "description": (
                "Usage metering: ingest, usage, invoices, wallets and the catalog. Every error "
                'is JSON {"error": ...} (unknown paths 404, wrong methods 405 with Allow); '
                "unknown query parameters answer 400 and unknown body fields 422, naming them. "
                "Decimals are exact and written as text."
            ),
        },
        "tags": [
            {"name": "ingest", "description": "Usage in (REST, Vector, Logstash, remote write)"},
            {"name": "usage", "description": "Usage out"},
            {"name": "billing", "description": "Invoices, wallets, margin"},
            {"name": "catalog", "description": "Dimensions, offerings, customers, meters"},
            {"name": "operations", "description": "Health and metrics"},
        ],
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "responses": {
                name: _error_response(status, text) for status, (name, text) in _ERRORS.items()
            },
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Authorization: Bearer <API key>",
                },
                "basic": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "The API key as the password (for Logstash)",
                },
            },
        },
    }


def _models(operations: Sequence[Operation]) -> dict[tuple[type[BaseModel], JsonSchemaMode], None]:
    found: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {
        (schemas.Error, "serialization"): None,
        (schemas.UsageRecord, "validation"): None,
        (schemas.UsagePage, "serialization"): None,
        (schemas.UsageWindows, "serialization"): None,
        (schemas.Invoice, "serialization"): None,
    }
    for op in operations:
        if isinstance(op.body, type):
            found[(op.body, "validation")] = None
        for _, content in op.ok.values():
            if isinstance(content, type):
                found[(content, "serialization")] = None
    return found


def _operation(op: Operation, scope: str | None, ref: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
    }
    if op.description:
        doc["description"] = op.description
    parameters = []
    if op.path_id is not None:
        parameters.append(
            {"name": "id", "in": "path", "required": True, "description": op.path_id,
             "schema": {"type": "string", "minLength": 1}}
        )  # fmt: skip
    if op.idempotent:
        parameters.append(
            {"name": "Idempotency-Key", "in": "header", "required": False,
             "description": "The same key and body answer the first answer again (kept 24 "
             "h); the same key with another body, or while its first request runs, answers "
             "409.", "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"}}
        )  # fmt: skip
    for name, p in op.query.items():
        q: dict[str, Any] = {"name": name, "in": "query", "required": False,
                             "description": p.description, "schema": dict(p.schema)}  # fmt: skip
        if p.example is not None:
            q["example"] = p.example
        parameters.append(q)
    if parameters:
        doc["parameters"] = parameters
    if op.body is not None:
        content = (
            {JSON: {"schema": ref(op.body, "validation")}}
            if isinstance(op.body, type)
            else dict(op.body)
        )
        doc["requestBody"] = {"required": op.body_required, "content": content}
    responses: dict[str, Any] = {}
    for status, (text, body) in sorted(op.ok.items()):
        response: dict[str, Any] = {"description": text}
        if isinstance(body, type):
            response["content"] = {JSON: {"schema": ref(body, "serialization")}}
        elif body is not None:
            response["content"] = dict(body)
        responses[str(status)] = response
    errors = set(op.errors)
    if scope is not None:
        errors |= {401, 403}
        doc["security"] = [{"bearer": [scope]}, {"basic": [scope]}]
    for status in sorted(errors):
        responses[str(status)] = {"$ref": f"#/components/responses/{_ERRORS[status][0]}"}
    for status in op.text_errors:
        responses[str(status)] = {"description": _ERRORS[status][1], "content": _TEXT}
    doc["responses"] = dict(sorted(responses.items()))
    return doc


def _error_response(status: int, text: str) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": text,
        "content": {JSON: {"schema": {"$ref": REF.format(model="Error")}}},
    }
    if status == 401:
        response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    if status in (429, 503):
        response["headers"] = _RETRY_AFTER
    return response


def _otlp_server(listen: str, tls: bool) -> dict[str, Any]:
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = "localhost"
    return {
        "url": "{scheme}://{host}:{port}",
        "description": "The OTLP/HTTP listener (server.otlp_http)",
        "variables": {
            "scheme": {"default": "https" if tls else "http", "enum": ["http", "https"]},
            "host": {"default": host},
            "port": {"default": port},
        },
    }
