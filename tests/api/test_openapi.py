"""SPEC §10 against a running gateway: /openapi.json is a valid OpenAPI 3.1 document that
describes every route (and only routes), the parameters and scopes the guard enforces, and
answers the gateway really gives; request bodies refuse unknown fields (422 naming them) while
ingest stays lenient about envelope fields.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from jsonschema import Draft202012Validator, FormatChecker
from openapi_spec_validator import OpenAPIV31SpecValidator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from starlette.routing import Route

from meter_gateway.api.app import create_app
from meter_gateway.config import parse_config
from meter_gateway.service import Gateway
from receivers import otlp_http
from tests.gatewayproc import BASE_CONFIG, INGEST_KEY, READ_KEY, GatewayProcess
from tests.helpers import next_id, now_iso, record
from tests.pgdb import store_url

METHODS = ("get", "put", "post", "delete", "head", "patch", "options", "trace")
#: Successful answers without a body besides HEAD and 204: remote-write senders' healthcheck.
EMPTY_ANSWERS = {"GET /api/v1/write"}
DOC_URI = "urn:meter-gateway:openapi"


@pytest.fixture(scope="module")
def doc(gateway: GatewayProcess) -> dict[str, Any]:
    r = httpx.get(f"{gateway.url}/openapi.json")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    document: dict[str, Any] = r.json()
    return document


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def test_served_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    assert doc["openapi"] == "3.1.0"
    errors = [e.message for e in OpenAPIV31SpecValidator(doc).iter_errors()]
    assert errors == []
    ids = [op["operationId"] for _, _, op in operations(doc)]
    assert len(ids) == len(set(ids)) > 40
    summaries = [op["summary"] for _, _, op in operations(doc)]
    assert "Create a meter" in summaries
    assert not [s for s in summaries if "one of" in s]
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "basic"}


def test_every_operation_has_schemas_for_parameters_bodies_and_answers(
    doc: dict[str, Any],
) -> None:
    for path, method, op in operations(doc):
        where = f"{method.upper()} {path}"
        for p in op.get("parameters", []):
            assert "schema" in p, (where, p["name"])
            assert p.get("description"), (where, p["name"])
        declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        assert declared == {part[1:-1] for part in path.split("/") if part.startswith("{")}, where
        for media in op.get("requestBody", {}).get("content", {}).values():
            assert "schema" in media, where
        responses = op["responses"]
        assert any(s.startswith("2") for s in responses), where
        for status, response in responses.items():
            if "$ref" in response:
                response = doc["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
            empty = method == "head" or status == "204" or where in EMPTY_ANSWERS
            if status.startswith("2") and not empty:
                assert response.get("content"), (where, status)
            for media in response.get("content", {}).values():
                assert "schema" in media, (where, status)
        if "security" in op:
            assert {"401", "403"} <= set(responses), where
    # the decimal grammar of the catalog's bodies reads numbers and text, and writes text
    price = doc["components"]["schemas"]["Dimension-Input"]["properties"]["price"]
    assert {"type": "number"} in price["anyOf"]
    out = doc["components"]["schemas"]["Dimension-Output"]["properties"]["price"]
    assert {"type": "number"} not in out["anyOf"]


def test_every_route_is_documented_and_every_operation_is_routed(
    doc: dict[str, Any], tmp_path: Path
) -> None:
    config = {**BASE_CONFIG, "store": {"url": store_url(tmp_path, "routes.db")}}
    gw = Gateway(parse_config(yaml.safe_dump(config)))
    try:
        app = create_app(gw)
        routed: set[tuple[str, str]] = set()
        for route in app.routes:
            assert isinstance(route, Route)
            methods = set(route.methods or ())
            if "GET" in methods and route.path != "/v1/usage":
                # Starlette answers HEAD wherever GET is routed; only those written out count
                methods.discard("HEAD")
            routed |= {(route.path, m.lower()) for m in methods}
        routed.add((otlp_http.PATH, "post"))  # the OTLP/HTTP app's one route, on its own port
    finally:
        gw.close()
    documented = {(path, method) for path, method, _ in operations(doc)}
    # HEAD of /healthz, /readyz and /api/v1/write are routed with their GET and documented
    documented_heads = {(p, m) for p, m in documented if m == "head" and p != "/v1/usage"}
    assert documented - documented_heads == routed - {(p, "head") for p, _ in documented_heads}
    assert {p for p, _ in documented_heads} <= {p for p, m in routed if m == "get"}
    assert doc["paths"][otlp_http.PATH]["post"]["servers"][0]["variables"]["port"]["default"]


@pytest.fixture(scope="module")
def ids(gateway: GatewayProcess) -> dict[str, str]:
    """Entries to address, so every path with an id has one that exists."""
    with gateway.client() as c:
        invoice = c.post(
            "/v1/customers/acme/invoices",
            json={"from": "2026-05-01T00:00:00Z", "to": "2026-06-01T00:00:00Z"},
        )
        assert invoice.status_code == 201, invoice.text
        meter = {"id": "acme-meter", "customer": "acme", "dimension": "data-processed"}
        assert c.post("/v1/meters", json=meter).status_code == 201
    return {
        "/v1/customers/{id}": "acme",
        "/v1/invoices/{id}": invoice.json()["id"],
        "/v1/meters/{id}": "acme-meter",
        "/v1/dimensions/{id}": "data-processed",
        "/v1/offerings/{id}": "pay-as-you-go",
    }


def _target(path: str, ids: dict[str, str], existing: bool = True) -> str:
    for prefix, id_ in ids.items():
        base = prefix.removesuffix("/{id}")
        if path.startswith(base + "/{id}"):
            return path.replace("{id}", id_ if existing else f"no-such-{next_id()}")
    return path


def _guarded_operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    # Ingest paths keep their own contract for query parameters (SPEC §4), and OTLP/HTTP is
    # served on its own port.
    return [
        (path, method, op)
        for path, method, op in operations(doc)
        if "ingest" not in op["tags"] and path != otlp_http.PATH
    ]


def test_query_parameters_are_the_documented_ones(
    gateway: GatewayProcess, doc: dict[str, Any], ids: dict[str, str]
) -> None:
    with gateway.client() as c:
        for path, method, op in _guarded_operations(doc):
            # a missing entry, so that nothing is written or deleted
            target = _target(path, ids, existing=method == "get")
            r = c.request(method.upper(), target, params={"bogus": "1"})
            assert r.status_code == 400, (method, target, r.status_code)
            if method != "head":
                assert r.json()["parameter"] == "bogus", (method, target, r.text)
            for p in op.get("parameters", []):
                if p["in"] != "query":
                    continue
                r = c.request(method.upper(), target, params={p["name"]: ""})
                refused = r.status_code == 400 and "not a parameter" in r.text
                assert not refused, (method, target, p["name"], r.text)


def test_scopes_are_the_documented_ones(
    gateway: GatewayProcess, doc: dict[str, Any], ids: dict[str, str]
) -> None:
    lacking = {"read": INGEST_KEY, "ingest": READ_KEY, "admin": READ_KEY}
    for path, method, op in operations(doc):
        base = gateway.otlp_http if path == otlp_http.PATH else gateway.url
        url = base + _target(path, ids, existing=False)
        # the body's media type, so that a receiver checking it first gets to the key
        media = next(iter(op.get("requestBody", {}).get("content", {})), "application/json")
        anonymous = httpx.request(method.upper(), url, headers={"Content-Type": media})
        if "security" not in op:
            assert anonymous.status_code not in (401, 403), (method, path)
            continue
        scope = op["security"][0]["bearer"][0]
        assert op["security"] == [{"bearer": [scope]}, {"basic": [scope]}]
        assert anonymous.status_code == 401, (method, path, anonymous.status_code)
        key = {"Authorization": f"Bearer {lacking[scope]}", "Content-Type": media}
        wrong = httpx.request(method.upper(), url, headers=key)
        assert wrong.status_code == 403, (method, path, wrong.status_code)


# --- unknown fields ---------------------------------------------------------------------------

UNKNOWN_FIELDS = [
    ("post", "/v1/customers/acme/invoices", {"from": "2026-05-01T00:00:00Z", "lines": []}, "lines"),
    ("post", "/v1/customers/acme/invoices", {"bogus": 1}, "bogus"),
    ("post", "/v1/customers/acme/wallet/top-ups", {"amount": "5", "memo": "x"}, "memo"),
    ("post", "/v1/dimensions", {"id": "dim-x", "name": "X", "colour": "red"}, "colour"),
    ("put", "/v1/offerings/off-x", {"name": "X", "currency": "EUR", "plan": "gold"}, "plan"),
    (
        "post",
        "/v1/offerings",
        {"id": "off-y", "name": "Y", "charges": [{"dimension": "data-processed", "rate": "1"}]},
        "charges.0.rate",
    ),
    ("post", "/v1/customers", {"id": "cust-x", "name": "X", "email": "x@example.com"}, "email"),
    (
        "post",
        "/v1/meters",
        {
            "id": "meter-x",
            "customer": "acme",
            "dimension": "data-processed",
            "thresholds": [{"value": "5", "colour": "red"}],
        },
        "thresholds.0.colour",
    ),
]


@pytest.mark.parametrize(("method", "path", "body", "field"), UNKNOWN_FIELDS)
def test_unknown_body_fields_answer_422_naming_them(
    client: httpx.Client, method: str, path: str, body: dict[str, Any], field: str
) -> None:
    before = client.get("/v1/customers/acme/invoices").json()["data"]
    wallet = client.get("/v1/customers/acme/wallet").json()
    r = client.request(method.upper(), path, json=body)
    assert r.status_code == 422, r.text
    out = r.json()
    assert f"{field}: unknown field" in out["error"]
    assert any(e.startswith(f"{field}: unknown field") for e in out["errors"])
    # nothing was made of it
    assert client.get("/v1/customers/acme/invoices").json()["data"] == before
    assert client.get("/v1/customers/acme/wallet").json() == wallet
    for kind in ("dimensions", "offerings", "customers", "meters"):
        assert client.get(f"/v1/{kind}/{body.get('id', 'off-x')}").status_code == 404


def test_unknown_invoice_field_names_the_fields_there_are(client: httpx.Client) -> None:
    r = client.post("/v1/customers/acme/invoices", json={"form": "2026-05-01T00:00:00Z"})
    assert r.status_code == 422
    assert r.json()["error"].startswith("form: unknown field (this body takes: from, to")


def test_catalog_bodies_are_checked_as_new_definitions(client: httpx.Client) -> None:
    r = client.post("/v1/offerings", json={"id": "off-xyz", "name": "X", "currency": "XYZ"})
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0].startswith("currency: ")
    assert "XYZ" in r.json()["error"]


def test_ingest_stays_lenient_about_envelope_fields(client: httpx.Client) -> None:
    r = client.post("/v1/usage", json=[record("acme", "1", source_system="billing-v1")])
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 1, "duplicates": 0, "rejected": 0, "errors": []}


# --- answers hold to their schemas ------------------------------------------------------------


class Schemas:
    """Validates an answer against the schema the document gives its operation and status."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        resource = Resource.from_contents(doc, default_specification=DRAFT202012)
        self.registry: Registry[Any] = Registry().with_resource(DOC_URI, resource)
        self.checked: set[str] = set()

    def check(self, method: str, path: str, r: httpx.Response) -> Any:
        where = ["paths", path, method, "responses", str(r.status_code)]
        response = self.doc["paths"][path][method]["responses"][str(r.status_code)]
        if "$ref" in response:
            where = response["$ref"].removeprefix("#/").split("/")
        media = r.headers["content-type"].split(";")[0]
        pointer = "/".join(_escape(p) for p in [*where, "content", media, "schema"])
        body = r.json()
        Draft202012Validator(
            {"$ref": f"{DOC_URI}#/{pointer}"},
            registry=self.registry,
            format_checker=FormatChecker(),
        ).validate(body)
        self.checked.add(f"{method.upper()} {path} {r.status_code}")
        return body


def _escape(part: str) -> str:
    """A JSON pointer's reference token (RFC 6901)."""
    return part.replace("~", "~0").replace("/", "~1")


TIERED = {
    "id": "tiered",
    "name": "Tiered",
    "currency": "EUR",
    "charges": [
        {"dimension": "data-processed", "model": "per_unit"},
        {
            "dimension": "compute-time",
            "model": "graduated",
            "tiers": [
                {"up_to": 1, "unit_price": "0.10", "flat_fee": "1"},
                {"up_to": None, "unit_price": "0.05"},
            ],
        },
        {
            "dimension": "active-users",
            "model": "package",
            "package_size": 10,
            "package_price": "50",
        },
        {"dimension": "storage", "model": "volume", "tiers": [{"up_to": None, "unit_price": 1}]},
    ],
}


def test_answers_match_the_document(client: httpx.Client, doc: dict[str, Any]) -> None:
    s = Schemas(doc)
    cid = f"cust-{next_id()}"
    assert s.check("post", "/v1/offerings", client.post("/v1/offerings", json=TIERED))["currency"]
    cust = client.put(f"/v1/customers/{cid}", json={"name": cid, "offering": "tiered"})
    assert s.check("put", "/v1/customers/{id}", cust)["offering"] == "tiered"
    meter = {
        "id": f"{cid}-data",
        "customer": cid,
        "dimension": "data-processed",
        "capacity": "10",
        "thresholds": [{"value": "1", "name": "first"}, {"percent": "90"}],
    }
    assert s.check("post", "/v1/meters", client.post("/v1/meters", json=meter))["capacity"]

    records = [
        record(cid, "2.5"),
        {**record(cid, "150"), "dimensionId": "compute-time"},
        {**record(cid, 1), "dimensionId": "active-users", "metadata": {"user_id": "u1"}},
        {**record(cid, "50"), "dimensionId": "storage"},
        record(cid, "-1"),
        record("nobody", "1"),
    ]
    ingested = s.check("post", "/v1/usage", client.post("/v1/usage", json=records))
    assert (ingested["accepted"], ingested["rejected"]) == (4, 2)
    lone = client.post("/v1/usage", json=record("nobody", "1"))
    assert s.check("post", "/v1/usage", lone)["rejected"] == 1
    atomic = client.post("/v1/usage", params={"atomic": "true"}, json=[record("nobody", "1")])
    assert s.check("post", "/v1/usage", atomic)["error"]

    raw = client.get("/v1/usage", params={"customerId": cid, "limit": 2})
    assert s.check("get", "/v1/usage", raw)["cursor"]
    for dim in ("data-processed", "storage"):
        windows = client.get(
            "/v1/usage", params={"customerId": cid, "dimensionId": dim, "window": "day"}
        )
        assert s.check("get", "/v1/usage", windows)["asOf"]
    summary = client.get(f"/v1/customers/{cid}/usage-summary")
    assert s.check("get", "/v1/customers/{id}/usage-summary", summary)["currency"] == "EUR"
    margin = client.get(f"/v1/customers/{cid}/margin")
    assert s.check("get", "/v1/customers/{id}/margin", margin)["customerId"] == cid
    state = client.get(f"/v1/meters/{cid}-data/state")
    assert s.check("get", "/v1/meters/{id}/state", state)["value"] == "2.5"
    rejected = client.get("/v1/rejected", params={"limit": 1})
    assert s.check("get", "/v1/rejected", rejected)["cursor"]

    top_up = client.post(f"/v1/customers/{cid}/wallet/top-ups", json={"amount": "3", "id": "t1"})
    assert s.check("post", "/v1/customers/{id}/wallet/top-ups", top_up)["balance"] == "3.00"
    again = client.post(f"/v1/customers/{cid}/wallet/top-ups", json={"amount": "3", "id": "t1"})
    assert again.status_code == 200
    s.check("post", "/v1/customers/{id}/wallet/top-ups", again)
    draft = client.post(f"/v1/customers/{cid}/invoices", json={})
    invoice = s.check("post", "/v1/customers/{id}/invoices", draft)
    assert {ln["model"] for ln in invoice["lines"]} == {
        "per_unit",
        "graduated",
        "package",
        "volume",
    }
    got = client.get(f"/v1/invoices/{invoice['id']}")
    assert s.check("get", "/v1/invoices/{id}", got)["status"] == "draft"
    final = client.post(f"/v1/invoices/{invoice['id']}/finalize")
    assert s.check("post", "/v1/invoices/{id}/finalize", final)["finalizedAt"]
    listed = client.get(f"/v1/customers/{cid}/invoices")
    assert s.check("get", "/v1/customers/{id}/invoices", listed)["data"][0]["status"]
    wallet = client.get(f"/v1/customers/{cid}/wallet")
    assert len(s.check("get", "/v1/customers/{id}/wallet", wallet)["entries"]) == 2

    for kind in ("dimensions", "offerings", "customers", "meters"):
        s.check("get", f"/v1/{kind}", client.get(f"/v1/{kind}"))
    s.check("get", "/v1/offerings/{id}", client.get("/v1/offerings/tiered"))
    s.check("get", "/healthz", client.get("/healthz"))
    s.check("get", "/readyz", client.get("/readyz"))
    # errors: the one JSON shape
    s.check("get", "/v1/meters/{id}/state", client.get("/v1/meters/nope/state"))
    s.check("post", "/v1/dimensions", client.post("/v1/dimensions", content=b"{"))
    conflict = client.post("/v1/offerings", json=TIERED)
    assert s.check("post", "/v1/offerings", conflict)["error"]
    in_use = client.delete("/v1/offerings/tiered")
    assert in_use.status_code == 409
    s.check("delete", "/v1/offerings/{id}", in_use)
    assert len(s.checked) >= 28  # distinct (operation, status) pairs held to the document


def test_documented_examples_are_answers_the_gateway_accepts(
    client: httpx.Client, doc: dict[str, Any]
) -> None:
    schemas = doc["components"]["schemas"]
    for invoice in schemas["InvoiceRequest"]["examples"]:
        r = client.post("/v1/customers/acme/invoices", json=invoice)
        assert r.status_code == 201, r.text
    for usage in schemas["UsageRecord"]["examples"]:
        stamped = {**usage, "id": f"ex-{next_id()}", "timestamp": now_iso()}
        assert client.post("/v1/usage", json=stamped).json()["accepted"] == 1
    for top_up in schemas["TopUp"]["examples"]:
        r = client.post("/v1/customers/acme/wallet/top-ups", json=top_up)
        assert r.status_code in (200, 201), r.text
        assert orjson.loads(r.content)["id"].endswith(top_up["id"])
    # the error example is the shape every error has
    for error in schemas["Error"]["examples"]:
        assert set(error) <= {"error", "parameter", "errors"}
