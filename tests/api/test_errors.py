"""SPEC §9 "Bounded time" and §10 strict edges against a running gateway: every error is JSON
``{"error": ...}``, undefined query parameters are refused by name, and no value of any
parameter of any GET path answers 5xx or leaves the gateway unable to answer the next request.
"""

from __future__ import annotations

import asyncio
import http.client
from collections.abc import Iterator
from datetime import timedelta
from urllib.parse import quote, urlencode

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from meter_gateway.api.errors import ApiError, exception_handlers, shown
from tests.gatewayproc import ADMIN_KEY, READ_KEY, GatewayProcess
from tests.helpers import now_iso, record

# Values for every parameter, percent-encoded as a client would send them...
HOSTILE_TEXT = [
    "",
    " ",
    "²",
    "①",
    "①" * 100,
    "\u0661\u0662",  # Arabic-Indic digits
    "\uff11\uff12",  # fullwidth digits
    "-1",
    "0",
    "+5",
    "1_000",
    "1e999",
    "NaN",
    "9" * 26,
    "9" * 10_000,
    "a" * 10_000,
    "\x00",
    "x\x00y",
    "\n",
    "../../etc/passwd",
    "Europe/../../../etc/passwd",
    "America",
    "leapseconds",
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59Z",
    "1969-12-31T23:59:59Z",
    "9999-01-01T00:00:00.000000001Z",
    "2026-W47-1T16:29:12Z",
    "2026-05-01T12:00:00.1234567891Z",
    "MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY6MQ==",  # base64 of a 26-digit "cursor"
    "MToxMjM0NTY3ODkwMTIzNDU2Nzg5MDEyMzQ1Ng==",
    "/",
    "'; DROP TABLE records; --",
]
# ... and raw, as only a hostile client sends them (invalid percent-encoding, bad UTF-8).
HOSTILE_RAW = ["%", "%Z", "%ZZ", "%%%", "%00", "%ED%A0%80", "%FF%FE", "%C0%80", "%2F%2E%2E"]
HOSTILE = [quote(v, safe="") for v in HOSTILE_TEXT] + HOSTILE_RAW

MONTH = {"from": "2026-05-01T00:00:00Z", "to": "2026-06-01T00:00:00Z"}
USAGE = ("customerId", "dimensionId", "from", "to", "window", "tz", "limit", "cursor")
WINDOWED = {"window": "day", "customerId": "acme", "dimensionId": "data-processed"}


@pytest.fixture(scope="module")
def ids(gateway: GatewayProcess) -> dict[str, str]:
    """An invoice and a meter to read, so every path has a request that answers 200."""
    with gateway.client() as c:
        invoice = c.post("/v1/customers/acme/invoices", json=MONTH)
        assert invoice.status_code == 201, invoice.text
        meter = {"id": "acme-data", "customer": "acme", "dimension": "data-processed"}
        r = c.post("/v1/meters", json=meter)
        assert r.status_code == 201, r.text
        assert c.post("/v1/usage", json=[record("acme", "2")]).status_code == 200
    return {"customer": "acme", "invoice": invoice.json()["id"], "meter": "acme-data"}


# (path, parameters it defines, parameters sent alongside)
GET_PATHS: list[tuple[str, tuple[str, ...], dict[str, str]]] = [
    ("/v1/usage", USAGE, {}),
    ("/v1/usage", ("from", "to", "tz"), WINDOWED),
    ("/v1/customers/{customer}/usage-summary", ("from", "to"), {}),
    ("/v1/customers/{customer}/margin", ("from", "to"), {}),
    ("/v1/customers/{customer}/invoices", ("cursor", "limit"), {}),
    ("/v1/customers/{customer}/wallet", ("after",), {}),
    ("/v1/invoices/{invoice}", ("format",), {}),
    ("/v1/rejected", ("reason", "cursor", "limit"), {}),
    ("/v1/meters/{meter}/state", (), {}),
    ("/v1/dimensions", (), {}),
    ("/v1/offerings", (), {}),
    ("/v1/customers", (), {}),
    ("/v1/meters", (), {}),
    ("/v1/dimensions/data-processed", (), {}),
    ("/v1/offerings/pay-as-you-go", (), {}),
    ("/v1/customers/{customer}", (), {}),
    ("/v1/meters/{meter}", (), {}),
    ("/metrics", (), {}),
    ("/healthz", (), {}),
    ("/readyz", (), {}),
    ("/openapi.json", (), {}),
]


class Raw:
    """One keep-alive connection sending request targets byte for byte (no client-side
    re-encoding), so a gateway that drops the connection after a bad request is caught too."""

    def __init__(self, gateway: GatewayProcess) -> None:
        host, _, port = gateway.url.removeprefix("http://").rpartition(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)

    def get(self, target: str, key: str = ADMIN_KEY) -> tuple[int, bytes, http.client.HTTPResponse]:
        self.conn.request("GET", target, headers={"Authorization": f"Bearer {key}"})
        resp = self.conn.getresponse()
        return resp.status, resp.read(), resp


@pytest.fixture
def raw(gateway: GatewayProcess) -> Iterator[Raw]:
    r = Raw(gateway)
    yield r
    r.conn.close()


def assert_json_error(status: int, body: bytes, target: str) -> None:
    assert status < 500, (status, target[:200], body[:300])
    if status >= 400:
        doc = orjson.loads(body)
        assert isinstance(doc, dict), body[:300]
        assert isinstance(doc["error"], str), body[:300]
        assert doc["error"], body[:300]


def _path(template: str, ids: dict[str, str]) -> str:
    return template.format(**ids)


def _params_id(case: tuple[str, tuple[str, ...], dict[str, str]]) -> str:
    path, _, base = case
    return path + ("?" + urlencode(base) if base else "")


@pytest.mark.parametrize("case", GET_PATHS, ids=_params_id)
def test_hostile_values_of_every_parameter_never_answer_5xx(
    raw: Raw, ids: dict[str, str], case: tuple[str, tuple[str, ...], dict[str, str]]
) -> None:
    template, names, base = case
    path = _path(template, ids)
    valid = path + ("?" + urlencode(base) if base else "")
    status, body, _ = raw.get(valid)
    assert status == 200, body[:300]
    # A path that defines no parameter gets the hostile values under a name it does not know.
    for name in names or ("limit",):
        for value in HOSTILE:
            target = (
                f"{path}?{urlencode(base)}&{name}={value}" if base else f"{path}?{name}={value}"
            )
            status, body, _ = raw.get(target)
            assert_json_error(status, body, target)
            if not names:
                assert status == 400, (target[:200], body[:300])
                assert orjson.loads(body)["parameter"] == "limit"
            again, body, _ = raw.get(valid)
            assert again == 200, (target[:200], body[:300])


PATH_IDS = sorted(
    (template, slot)
    for template in {p for p, _, _ in GET_PATHS}
    for slot in ("customer", "invoice", "meter")
    if "{" + slot + "}" in template
)


@pytest.mark.parametrize(("template", "slot"), PATH_IDS)
def test_hostile_path_ids_answer_json_404(
    raw: Raw, ids: dict[str, str], template: str, slot: str
) -> None:
    valid = _path(template, ids)
    for value in HOSTILE:
        target = _path(template, {**ids, slot: value})
        status, body, _ = raw.get(target)
        assert_json_error(status, body, target)
        assert status in (404, 307), (target[:200], status, body[:300])  # 307: a "/" id
        again, body, _ = raw.get(valid)
        assert again == 200, (target[:200], body[:300])


def test_unknown_paths_and_methods_answer_json(client: httpx.Client) -> None:
    r = client.get("/v2/usage")
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"error": "no such path: '/v2/usage'"}
    r = client.delete("/v1/usage")
    assert r.status_code == 405
    assert r.json()["error"] == "DELETE is not allowed on '/v1/usage'; allowed: GET, HEAD, POST"
    assert r.headers["allow"] == "GET, HEAD, POST"
    r = client.patch("/v1/dimensions/data-processed", json={})
    assert r.status_code == 405
    assert r.headers["allow"] == "DELETE, GET, HEAD, PUT"
    assert client.get("/v1/invoices/x/finalize").json()["error"].startswith("GET is not allowed")


@pytest.mark.parametrize(
    ("path", "query", "name"),
    [
        ("/v1/usage", {"groupBy": "customerId"}, "groupBy"),
        ("/v1/usage", {"metadata.Foo": "bar"}, "metadata.Foo"),
        ("/v1/usage", {"limit": "5", "window": "day"}, "limit"),
        ("/v1/usage", {"cursor": "x", "window": "month"}, "cursor"),
        ("/v1/dimensions", {"limit": "10"}, "limit"),
        ("/v1/customers", {"cursor": "x"}, "cursor"),
        ("/v1/customers/acme/usage-summary", {"tz": "UTC"}, "tz"),
        ("/v1/customers/acme/margin", {"window": "day"}, "window"),
        ("/v1/rejected", {"receiver": "otlp"}, "receiver"),
        ("/healthz", {"verbose": "1"}, "verbose"),
    ],
)
def test_undefined_query_parameters_are_refused_by_name(
    client: httpx.Client, path: str, query: dict[str, str], name: str
) -> None:
    r = client.get(path, params=query)
    assert r.status_code == 400, r.text
    assert r.json()["parameter"] == name
    assert r.json()["error"].startswith(f"{name}: ")


def test_a_parameter_given_twice_is_refused(client: httpx.Client) -> None:
    r = client.get("/v1/rejected", params=[("limit", "1"), ("limit", "2")])
    assert r.status_code == 400
    assert r.json() == {"error": "limit: given more than once", "parameter": "limit"}


OUT_OF_BOUNDS = [
    ({"from": "1969-12-31T23:59:59Z"}, "from"),
    ({"from": "0001-01-01T00:00:00Z"}, "from"),
    ({"to": "9999-01-01T00:00:00.000000001Z"}, "to"),
    ({"to": "9999-12-31T23:59:59Z"}, "to"),
    ({"from": "2026-05-02T00:00:00Z", "to": "2026-05-02T00:00:00Z"}, "to"),
    ({"from": "2026-05-02T00:00:00Z", "to": "2026-05-01T00:00:00Z"}, "to"),
    ({"from": "2026-05-01"}, "from"),
    ({"to": "tomorrow"}, "to"),
]
TIME_PATHS = [
    ("/v1/usage", {}),
    ("/v1/usage", WINDOWED),
    ("/v1/customers/acme/usage-summary", {}),
    ("/v1/customers/acme/margin", {}),
]


@pytest.mark.parametrize(("path", "base"), TIME_PATHS, ids=lambda v: str(v))
@pytest.mark.parametrize(("query", "name"), OUT_OF_BOUNDS, ids=lambda v: str(v))
def test_times_outside_the_bounds_answer_400_naming_them(
    client: httpx.Client, path: str, base: dict[str, str], query: dict[str, str], name: str
) -> None:
    r = client.get(path, params={**base, **query})
    assert r.status_code == 400, r.text
    assert r.json()["parameter"] == name
    assert r.json()["error"].startswith(f"{name}: ")


@pytest.mark.parametrize(("body", "name"), OUT_OF_BOUNDS, ids=lambda v: str(v))
def test_invoice_periods_outside_the_bounds_answer_400_naming_them(
    client: httpx.Client, body: dict[str, str], name: str
) -> None:
    r = client.post("/v1/customers/acme/invoices", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["parameter"] == name


@pytest.mark.parametrize("value", [0, 1.5, True, None, [], {}])
def test_invoice_period_times_must_be_strings(client: httpx.Client, value: object) -> None:
    r = client.post("/v1/customers/acme/invoices", json={**MONTH, "to": value})
    if value is None:  # absent: the default, the end of the current month
        assert r.status_code in (201, 400), r.text
        return
    assert r.status_code == 400, r.text
    assert r.json()["parameter"] == "to"


def test_raw_usage_over_the_whole_range_answers(client: httpx.Client) -> None:
    r = client.get(
        "/v1/usage",
        params={
            "customerId": "acme",
            "from": "1970-01-01T00:00:00Z",
            "to": "9999-01-01T00:00:00Z",
            "limit": "1",
        },
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 1
    later = {"from": "2300-01-01T00:00:00Z", "to": "9999-01-01T00:00:00Z"}  # past any record
    r = client.get("/v1/usage", params=later)
    assert r.status_code == 200, r.text
    assert r.json()["data"] == []


def test_windows_past_the_store_horizon_answer_400_naming_to(client: httpx.Client) -> None:
    r = client.get(
        "/v1/usage", params={**WINDOWED, "window": "month", "to": "2300-01-01T00:00:00Z"}
    )
    assert r.status_code == 400
    assert r.json()["parameter"] == "to"
    assert "2262-04-11T23:47:16" in r.json()["error"]


def test_window_answers_are_capped_before_they_are_computed(client: httpx.Client) -> None:
    hours = {**WINDOWED, "window": "hour", "from": "1970-01-01T00:00:00Z", "to": now_iso()}
    r = client.get("/v1/usage", params=hours)
    assert r.status_code == 400
    assert r.json()["parameter"] == "window"
    assert "at most 10,000 windows" in r.json()["error"]
    # 10,000 day windows exactly (1990-01-01 + 10,000 days) answer; one more day does not.
    days = {**WINDOWED, "from": "1990-01-01T00:00:00Z", "to": "2017-05-19T00:00:00Z"}
    r = client.get("/v1/usage", params=days)
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 10_000
    r = client.get("/v1/usage", params={**days, "to": "2017-05-19T00:00:00.000000001Z"})
    assert r.status_code == 400
    assert "more than 10,000" in r.json()["error"]


def test_the_cap_counts_every_series_of_the_answer(client: httpx.Client, customer: str) -> None:
    client.post("/v1/usage", json=[record(customer, "1")])
    months = {"customerId": customer, "window": "month", "from": "2000-01-01T00:00:00Z"}
    r = client.get("/v1/usage", params={**months, "to": now_iso(timedelta(days=1))})
    assert r.status_code == 200, r.text  # one series: ~320 months
    r = client.get("/v1/usage", params={"window": "hour", "from": "2026-01-01T00:00:00Z"})
    if r.status_code == 400:  # every series of the gateway: as many as the tests made by now
        assert "series" in r.json()["error"]
    else:
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]) <= 10_000


def test_auth_errors_keep_their_codes_and_come_first(gateway: GatewayProcess) -> None:
    with httpx.Client(base_url=gateway.url) as anon:
        r = anon.get("/v1/usage", params={"groupBy": "x", "limit": "²"})
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == 'Bearer realm="meter-gateway"'
        assert r.json() == {"error": "missing credentials: send Authorization: Bearer <api key>"}
        r = anon.get("/v1/usage", headers={"Authorization": "Bearer wrong"})
        assert (r.status_code, r.json()) == (401, {"error": "invalid API key"})
    with gateway.client(READ_KEY) as reader:
        r = reader.post("/v1/customers/acme/invoices", json=MONTH, params={"bogus": "1"})
        assert r.status_code == 403
        assert "www-authenticate" not in r.headers
        assert r.json() == {"error": "API key 'read' lacks the 'admin' scope"}


def test_ingest_keeps_its_contract(client: httpx.Client) -> None:
    # Ingest is lenient about what it does not know (SPEC §4); its answers are unchanged.
    r = client.post("/v1/usage", params={"source": "vector"}, json=[record("acme", "1")])
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 1
    r = client.post("/v1/usage", content=b"{not json")
    assert r.status_code == 400
    assert r.json()["error"]


def test_an_unexpected_exception_answers_json_500() -> None:
    # In-process: no request to the real gateway may reach this handler (that is the point of
    # the tests above), so a route that fails on purpose shows the shape.
    async def boom(request: Request) -> Response:
        raise RuntimeError("bug")

    app = Starlette(routes=[Route("/boom", boom)], exception_handlers=exception_handlers())

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            return await c.get("/boom")

    r = asyncio.run(call())
    assert r.status_code == 500
    assert r.json() == {"error": "internal error: the gateway's log has the details"}


def test_api_errors_carry_their_fields_and_headers() -> None:
    r = ApiError(401, "no key", headers={"WWW-Authenticate": "Bearer"}, parameter="x").response()
    assert (r.status_code, r.headers["www-authenticate"]) == (401, "Bearer")
    assert orjson.loads(bytes(r.body)) == {"error": "no key", "parameter": "x"}
    assert shown("a" * 1000) == repr("a" * 80) + "… (1000 characters)"


def test_a_trailing_slash_is_a_json_404_not_a_redirect(client: httpx.Client) -> None:
    """An id "%2F" decodes to a path ending in "/": the answer is the JSON 404, never a
    redirect without a body (found by the long read-parameter fuzz run)."""
    for target in ("/v1/invoices/%2F", "/v1/usage/", "/v1/customers/"):
        r = client.get(target, follow_redirects=False)
        assert r.status_code == 404, (target, r.status_code, r.text[:200])
        assert "no such path" in r.json()["error"], (target, r.text[:200])
