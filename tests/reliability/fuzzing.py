"""What the fuzz tests share: the gateway config, example budgets, the status tally and reads.

Budgets: ``METER_FUZZ_PROFILE=ci`` (the default) runs each fuzz test with its CI example count;
``METER_FUZZ_PROFILE=long`` runs ``METER_FUZZ_EXAMPLES`` examples per test (default 10,000).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TypeVar

import httpx
from hypothesis import HealthCheck, Phase, settings

from tests.gatewayproc import BASE_CONFIG, GatewayProcess
from tests.reliability.oracle import NS, deep_recursion, parse_rfc3339

PROFILE = os.environ.get("METER_FUZZ_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"METER_FUZZ_PROFILE={PROFILE!r}: expected ci or long")
LONG_EXAMPLES = int(os.environ.get("METER_FUZZ_EXAMPLES", "10000"))
# METER_FUZZ_SHRINK=0 reports the first failing input as found (faster, not minimal)
SHRINK = os.environ.get("METER_FUZZ_SHRINK", "1") != "0"
FROM = "2020-01-01T00:00:00Z"

F = TypeVar("F", bound=Callable[..., Any])


def fuzz_settings(ci_examples: int) -> Callable[[F], F]:
    """Hypothesis settings of one fuzz test: ``ci_examples`` in CI, the long budget otherwise.
    No deadline (every example is a round trip to a real process) and no example database
    (nothing written into the tree); failures print the shrunk input and a reproduce blob."""
    return settings(  # type: ignore[return-value]
        max_examples=ci_examples if PROFILE == "ci" else LONG_EXAMPLES,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
        phases=[p for p in Phase if SHRINK or p not in (Phase.shrink, Phase.explain)],
    )


def fuzz_config() -> dict[str, Any]:
    """The standard test catalog plus a level dimension, a meter and one mapping rule per
    receiver, all keyed on the ``tenant`` attribute."""
    cfg = dict(BASE_CONFIG)
    cfg["dimensions"] = [
        *BASE_CONFIG["dimensions"],
        {"id": "level", "name": "Level", "unit": "gigabyte", "aggregation": "time_weighted_avg"},
    ]
    cfg["meters"] = [{"id": "fuzz-meter", "customer": "acme", "dimension": "data-processed"}]
    cfg["rules"] = [
        {
            "match": {"source": "otlp", "metric": "fuzz.requests"},
            "dimension": "data-processed",
            "customer_attribute": "tenant",
        },
        {
            "match": {"source": "otlp", "metric": "fuzz.level"},
            "dimension": "level",
            "customer_attribute": "tenant",
        },
        {
            "match": {"source": "vector", "metric": "fuzz_requests"},
            "dimension": "data-processed",
            "customer_attribute": "tenant",
        },
        {
            "match": {"source": "remote_write", "metric": "fuzz_bytes_total"},
            "dimension": "data-processed",
            "customer_attribute": "tenant",
        },
        {
            "match": {"source": "remote_write", "metric": "fuzz_level"},
            "dimension": "level",
            "customer_attribute": "tenant",
        },
    ]
    return cfg


class Tally:
    """Fuzz answers by receiver and status (HTTP code or gRPC code name)."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def add(self, receiver: str, status: int | str) -> None:
        self.counts[(receiver, str(status))] += 1

    def lines(self) -> list[str]:
        by_receiver: dict[str, Counter[str]] = {}
        for (receiver, status), n in self.counts.items():
            by_receiver.setdefault(receiver, Counter())[status] += n
        out = []
        for receiver in sorted(by_receiver):
            c = by_receiver[receiver]
            parts = ", ".join(f"{s}: {n}" for s, n in sorted(c.items()))
            out.append(f"{receiver:<22} {sum(c.values()):>7}  {parts}")
        return out

    def as_json(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (receiver, status), n in sorted(self.counts.items()):
            out.setdefault(receiver, {})[status] = n
        return out


def fresh_customer(client: httpx.Client, prefix: str = "fz") -> tuple[str, str]:
    """A new customer (and its alias), so that an example's stored records are its own."""
    cid = f"{prefix}-{uuid.uuid4().hex[:12]}"
    alias = f"{cid}-alias"
    r = client.post(
        "/v1/customers",
        json={"id": cid, "name": cid, "offering": "pay-as-you-go", "aliases": [alias]},
    )
    assert r.status_code == 201, r.text
    return cid, alias


def to_iso(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // NS)) + f".{ns % NS:09d}Z"


def raw_records(client: httpx.Client, customer: str) -> list[dict[str, Any]]:
    """Every stored record of ``customer`` (all pages of ``window=raw``)."""
    out: list[dict[str, Any]] = []
    cursor = None
    to = to_iso(time.time_ns() + 3600 * NS)
    for _ in range(1000):
        params = {"customerId": customer, "window": "raw", "from": FROM, "to": to}
        params["limit"] = "10000"
        if cursor:
            params["cursor"] = cursor
        r = client.get("/v1/usage", params=params)
        assert r.status_code == 200, f"raw page: {r.status_code} {r.text[:500]}"
        with deep_recursion():
            body = json.loads(r.content)
        out += body["data"]
        cursor = body.get("cursor")
        if not cursor:
            return out
    raise AssertionError("raw pages never ended")


def assert_windows_match_raw(
    client: httpx.Client, customer: str, rows: list[dict[str, Any]], dimension: str
) -> None:
    """The month windows of a ``sum`` dimension add up to its raw records. Windows are measured
    as of now (SPEC §9): a record stamped after the query (within the future tolerance) is not
    in them yet, one stamped during the query may or may not be."""
    before = time.time_ns()
    got = window_total(client, customer, dimension)
    after = time.time_ns()
    certain = uncertain = Decimal(0)
    for row in rows:
        if row["dimensionId"] != dimension:
            continue
        ts = parse_rfc3339(row["timestamp"]).ns
        assert ts is not None, row
        if ts < before:
            certain += Decimal(row["recordValue"])
        elif ts <= after:
            uncertain += Decimal(row["recordValue"])
    assert certain <= got <= certain + uncertain, (
        f"windows add up to {got}, raw records to {certain} (+{uncertain} stamped during the query)"
    )


def window_total(client: httpx.Client, customer: str, dimension: str) -> Decimal:
    """The sum of the month windows' values of a ``sum`` dimension, over the raw range."""
    to = to_iso(time.time_ns() + 3600 * NS)
    r = client.get(
        "/v1/usage",
        params={
            "customerId": customer,
            "dimensionId": dimension,
            "window": "month",
            "from": FROM,
            "to": to,
        },
    )
    assert r.status_code == 200, f"windows: {r.status_code} {r.text[:500]}"
    return sum((Decimal(w["value"]) for w in r.json()["data"] if w["value"]), Decimal(0))


def probe(gw: GatewayProcess, client: httpx.Client, customer: str) -> None:
    """No wedge: a known-valid record with a fresh id is accepted right after."""
    rid = f"probe-{uuid.uuid4().hex}"
    rec = {
        "id": rid,
        "timestamp": to_iso(time.time_ns() - 5 * NS),
        "customerId": customer,
        "dimensionId": "data-processed",
        "recordValue": "1",
    }
    try:
        r = client.post("/v1/usage", json=[rec])
    except httpx.TransportError as exc:
        raise AssertionError(f"gateway unreachable after the request: {exc!r}") from None
    wedged = f"wedged: a valid record after this request answered {r.status_code} {r.text[:300]}"
    assert r.status_code == 200, wedged
    assert r.json()["accepted"] == 1, wedged


def json_error(r: httpx.Response) -> None:
    """SPEC §10: an error answer is a JSON object with an ``error``."""
    try:
        body = r.json()
    except ValueError:
        raise AssertionError(f"{r.status_code} body is not JSON: {r.text[:200]!r}") from None
    assert isinstance(body, dict), f"{r.status_code} body is not an object: {r.text[:200]}"
    assert isinstance(body.get("error"), str), f"{r.status_code} body has no error: {r.text[:200]}"


def gateway_alive(gw: GatewayProcess) -> None:
    assert gw.proc is not None
    assert gw.proc.poll() is None, f"gateway exited:\n{gw.log()[-3000:]}"
