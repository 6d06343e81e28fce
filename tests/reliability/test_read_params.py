"""Every GET path with generated hostile parameters (SPEC §5, §9, §10).

Oracle: never a 5xx; every 4xx is a JSON object with an ``error``; a parameter the path does
not define answers 400; a 2xx of a JSON path is JSON. The paths and their parameters are those
of ``meter_gateway/api/app.py`` and ``meter_gateway/api/billing.py``.
"""

from __future__ import annotations

import base64
import time
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.gatewayproc import GatewayProcess
from tests.reliability.fuzzing import Tally, fuzz_settings, gateway_alive, json_error, probe
from tests.reliability.strategies import HOSTILE_TEXT, timestamps

# path template → the query parameters it defines
PATHS: dict[str, tuple[str, ...]] = {
    "/v1/usage": ("customerId", "dimensionId", "from", "to", "window", "tz", "limit", "cursor"),
    "/v1/customers/{id}/usage-summary": ("from", "to"),
    "/v1/rejected": ("limit", "cursor", "reason"),
    "/v1/dimensions": (),
    "/v1/dimensions/{id}": (),
    "/v1/offerings": (),
    "/v1/offerings/{id}": (),
    "/v1/customers": (),
    "/v1/customers/{id}": (),
    "/v1/meters": (),
    "/v1/meters/{id}": (),
    "/v1/customers/{id}/invoices": ("limit", "cursor"),
    "/v1/invoices/{id}": ("format",),
    "/v1/customers/{id}/wallet": ("after",),
    "/v1/customers/{id}/margin": ("from", "to"),
    "/v1/meters/{id}/state": (),
    "/metrics": (),
    "/healthz": (),
    "/readyz": (),
    "/openapi.json": (),
    "/api/v1/write": (),
}
NOT_JSON = ("/metrics", "/api/v1/write")


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


def _sendable(text: str) -> bool:
    """Text an HTTP client can put in a URL (UTF-8 encodable: no lone surrogates)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


SENDABLE = HOSTILE_TEXT.filter(_sendable)


NUMBERS = st.one_of(
    st.sampled_from(
        ["²", "①", "\u0661\u0662", "\uff11", "1_000", "+5", "-1", "0", "1.5", "1e3", "NaN", "inf"]
    ),
    st.integers(-(10**30), 10**30).map(str),
    st.just("9" * 26),
)
CURSORS = st.one_of(
    st.sampled_from(
        [
            _b64("1:2"),
            _b64("9" * 26 + ":1"),
            _b64("1:" + "9" * 26),
            _b64("-1:-1"),
            _b64("a:b"),
            _b64("1:2:3"),
            _b64("\x00:\x00"),
            _b64(f"{2**63}:{2**63}"),
            _b64("²:①"),
            "not base64!",
            "====",
            "9" * 26,
        ]
    ),
    st.binary(max_size=40).map(lambda b: base64.urlsafe_b64encode(b).decode()),
)
TIMES = st.one_of(
    timestamps(time.time_ns()).filter(lambda v: isinstance(v, str) and _sendable(v)),
    st.sampled_from(
        [
            "1969-12-31T23:59:59Z",
            "9999-01-01T00:00:01Z",
            "0001-01-01T00:00:00Z",
            "10000-01-01T00:00:00Z",
            "-0001-01-01T00:00:00Z",
            "2026-01-01T00:00:00+99:99",
            "1" * 1000,
        ]
    ),
).filter(lambda v: isinstance(v, str))
ZONES = st.one_of(
    st.sampled_from(
        [
            "UTC",
            "Europe/Paris",
            "America/St_Johns",
            "Asia/Kathmandu",
            "../../etc/passwd",
            "/etc/localtime",
            "Europe/../UTC",
            "x" * 1000,
            "a/" * 300,
            "Etc/GMT+14",
            "posixrules",
            "\x00",
            ".",
        ]
    ),
    SENDABLE,
)


def values_for(name: str) -> st.SearchStrategy[str]:
    specific = {
        "limit": NUMBERS,
        "after": NUMBERS,
        "cursor": st.one_of(CURSORS, NUMBERS),
        "from": TIMES,
        "to": TIMES,
        "tz": ZONES,
        "window": st.sampled_from(["raw", "hour", "day", "month", "week", "RAW", ""]),
        "format": st.sampled_from(["json", "csv", "html", "pdf", "JSON", "", "../json"]),
        "customerId": st.sampled_from(["acme", "dumm-ai-prod", "nobody", ""]),
        "dimensionId": st.sampled_from(["data-processed", "storage", "nope", ""]),
    }.get(name)
    return st.one_of(specific, SENDABLE) if specific is not None else SENDABLE


@pytest.fixture(scope="module")
def known_ids(fuzz_gateway: GatewayProcess, admin: httpx.Client) -> list[str]:
    """Ids that exist, so that a path's parameters are read past the 404: a draft invoice,
    a wallet with an entry, the catalog's entries."""
    r = admin.post("/v1/customers/acme/invoices", json={})
    assert r.status_code == 201, r.text
    r2 = admin.post("/v1/customers/acme/wallet/top-ups", json={"amount": "10"})
    assert r2.status_code in (200, 201), r2.text
    return [r.json()["id"], "acme", "dumm-ai-prod", "data-processed", "pay-as-you-go", "fuzz-meter"]


@st.composite
def requests_(draw: st.DrawFn, known: list[str]) -> tuple[str, str, list[tuple[str, str]], bool]:
    template = draw(st.sampled_from(sorted(PATHS)))
    defined = PATHS[template]
    path = template
    if "{id}" in template:
        ident = draw(st.one_of(st.sampled_from(known), SENDABLE.filter(bool)))
        path = template.replace("{id}", quote(ident, safe=""))
    params: list[tuple[str, str]] = []
    for name in defined:
        if draw(st.booleans()):
            params.append((name, draw(values_for(name))))
            if draw(st.integers(0, 9)) == 0:
                params.append((name, draw(values_for(name))))  # repeated
    unknown = draw(st.integers(0, 7)) == 0
    if unknown:
        name = draw(st.sampled_from(["foo", "LIMIT", "customer_id", "from ", "", "page"]))
        params.append((name, draw(SENDABLE)))
    return template, path, params, unknown


@fuzz_settings(250)
@given(data=st.data())
def test_every_get_parameter_answers_without_a_5xx(
    data: st.DataObject,
    fuzz_gateway: GatewayProcess,
    admin: httpx.Client,
    known_ids: list[str],
    tally: Tally,
) -> None:
    template, path, params, unknown = data.draw(requests_(known_ids), label="request")
    try:
        r = admin.get(path, params=params)
    except httpx.TransportError as exc:
        raise AssertionError(f"connection failed: {exc!r}") from None
    tally.add("read-params", r.status_code)
    assert r.status_code < 500, f"GET {r.request.url} → {r.status_code}: {r.text[:500]}"
    if r.status_code >= 400:
        json_error(r)
    elif template not in NOT_JSON and dict(params).get("format") not in ("csv", "html"):
        r.json()
    # SPEC §10, for the API's paths (/v1); the operations endpoints (/metrics, health checks,
    # the remote-write healthcheck) are probed by tools that may add parameters of their own
    if unknown and template.startswith("/v1/") and r.status_code != 404:
        assert r.status_code == 400, f"GET {r.request.url}: undefined parameter → {r.status_code}"
    gateway_alive(fuzz_gateway)


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/v1/usage", {"limit": "²"}),
        ("/v1/usage", {"limit": "①"}),
        ("/v1/rejected", {"limit": "²"}),
        ("/v1/customers/acme/invoices", {"limit": "②"}),
        ("/v1/customers/acme/wallet", {"after": "²"}),
        ("/v1/usage", {"cursor": _b64("9" * 26 + ":1"), "window": "raw"}),
        ("/v1/rejected", {"cursor": "9" * 26}),
        ("/v1/usage", {"tz": "x" * 1000, "window": "day"}),
        ("/v1/usage", {"from": "0001-01-01T00:00:00Z"}),
        ("/v1/customers/acme/margin", {"to": "9999-12-31T23:59:59Z"}),
    ],
)
def test_read_parameters_named_in_issue_13(
    path: str, params: dict[str, str], admin: httpx.Client, known_ids: list[str], tally: Tally
) -> None:
    r = admin.get(path, params=params)
    tally.add("read-params", r.status_code)
    assert r.status_code == 400, f"{r.status_code}: {r.text[:300]}"
    json_error(r)


def test_reads_leave_ingest_working(
    fuzz_gateway: GatewayProcess, admin: httpx.Client, known_ids: list[str]
) -> None:
    probe(fuzz_gateway, admin, "acme")
