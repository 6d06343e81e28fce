"""Query, catalog, rejected and operations endpoints of SPEC §5 against a running gateway."""

from __future__ import annotations

import time
from datetime import timedelta
from decimal import Decimal

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gatewayproc import READ_KEY, GatewayProcess
from tests.helpers import now_iso, record
from tests.scrape import metrics_computed_since

DAY = "2026-11-01T00:00:00Z"


def test_raw_records_paginate_with_a_cursor(client: httpx.Client, customer: str) -> None:
    client.post("/v1/usage", json=[record(customer, str(i)) for i in range(25)])
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {
            "customerId": customer,
            "window": "raw",
            "limit": "10",
            "from": "2020-01-01T00:00:00Z",
        }
        if cursor:
            params["cursor"] = cursor
        body = client.get("/v1/usage", params=params).json()
        seen += [d["recordValue"] for d in body["data"]]
        pages += 1
        cursor = body["cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert sorted(seen, key=int) == [str(i) for i in range(25)]


def test_windows_include_empty_ones_in_order(client: httpx.Client, customer: str) -> None:
    client.post("/v1/usage", json=[record(customer, "3")])
    body = client.get(
        "/v1/usage",
        params={
            "customerId": customer,
            "dimensionId": "data-processed",
            "window": "hour",
            "from": now_iso(-timedelta(hours=3)),
            "to": now_iso(timedelta(minutes=1)),
        },
    ).json()
    values = [w["value"] for w in body["data"]]
    assert len(values) in (4, 5)
    assert values[-1] == "3" or values[-2] == "3"
    assert values.count("0") == len(values) - 1
    starts = [w["start"] for w in body["data"]]
    assert starts == sorted(starts)


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"window": "week"}, 400),
        ({"from": "yesterday"}, 400),
        ({"tz": "Mars/Olympus"}, 400),
        ({"customerId": "nobody"}, 404),
        ({"cursor": "%%%"}, 400),
        ({"limit": "0"}, 400),
        ({"from": "2026-05-02T00:00:00Z", "to": "2026-05-01T00:00:00Z"}, 400),
    ],
)
def test_bad_query_parameters(client: httpx.Client, params: dict[str, str], status: int) -> None:
    r = client.get("/v1/usage", params=params)
    assert r.status_code == status
    assert r.json()["error"]


def test_usage_summary_has_quantity_amount_and_total(client: httpx.Client, customer: str) -> None:
    client.post("/v1/usage", json=[record(customer, "0.8"), record(customer, "1.2")])
    body = client.get(f"/v1/customers/{customer}/usage-summary").json()
    assert body["customerId"] == customer
    assert body["currency"] == "USD"
    [line] = body["dimensions"]
    assert line == {
        "dimensionId": "data-processed",
        "unit": "gigabyte",
        "quantity": "2",
        "amount": "0.16",
    }
    assert body["total"] == "0.16"
    assert client.get("/v1/customers/nobody/usage-summary").status_code == 404


def test_catalog_crud_and_validation(client: httpx.Client) -> None:
    r = client.post(
        "/v1/dimensions",
        json={
            "id": "gpu-hours",
            "name": "GPU Hours",
            "unit": "hour",
            "aggregation": "sum",
            "price": "2.5",
        },
    )
    assert r.status_code == 201
    assert client.post("/v1/dimensions", json={"id": "gpu-hours", "name": "x"}).status_code == 409
    r = client.put(
        "/v1/dimensions/gpu-hours", json={"name": "GPU Hours", "unit": "hour", "aggregation": "max"}
    )
    assert r.status_code == 200
    assert client.get("/v1/dimensions/gpu-hours").json()["aggregation"] == "max"
    r = client.post(
        "/v1/dimensions", json={"id": "bad", "name": "B", "aggregation": "median", "colour": "red"}
    )
    assert r.status_code == 422
    assert any("colour" in e for e in r.json()["errors"])
    r = client.post(
        "/v1/offerings",
        json={
            "id": "gpu",
            "name": "GPU",
            "charges": [{"dimension": "gpu-hours", "model": "per_unit", "unit_price": "2.5"}],
        },
    )
    assert r.status_code == 201
    # a dimension an offering charges for cannot be deleted
    assert client.delete("/v1/dimensions/gpu-hours").status_code == 409
    r = client.post("/v1/customers", json={"id": "c-gpu", "name": "G", "offering": "nope"})
    assert r.status_code == 422
    r = client.post(
        "/v1/customers", json={"id": "c-clash", "name": "C", "aliases": ["dumm-ai-prod"]}
    )
    assert r.status_code == 409
    assert client.delete("/v1/offerings/gpu").status_code == 204
    assert client.delete("/v1/dimensions/gpu-hours").status_code == 204
    assert client.get("/v1/dimensions/gpu-hours").status_code == 404


def test_read_key_reads_but_cannot_write(gateway: GatewayProcess) -> None:
    with gateway.client(READ_KEY) as c:
        assert c.get("/v1/dimensions").status_code == 200
        assert c.get("/v1/rejected").status_code == 200
        r = c.post("/v1/dimensions", json={"id": "x1", "name": "X"})
        assert r.status_code == 403
        assert "admin" in r.json()["error"]
    assert httpx.get(f"{gateway.url}/v1/dimensions").status_code == 401


def test_operations_endpoints_are_open(
    gateway: GatewayProcess, client: httpx.Client, customer: str
) -> None:
    client.post("/v1/usage", json=[record(customer, "2.5")])
    committed = time.time()
    assert httpx.get(f"{gateway.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{gateway.url}/readyz").json()["status"] == "ready"
    doc = httpx.get(f"{gateway.url}/openapi.json").json()
    assert "/v1/usage" in doc["paths"]
    assert "/usage" in doc["paths"]
    text = metrics_computed_since(client, committed)  # the period gauges are refreshed apart
    for name in (
        "meter_gateway_records_received_total",
        "meter_gateway_records_accepted_total",
        "meter_gateway_records_duplicate_total",
        "meter_gateway_records_rejected_total",
        "meter_gateway_commit_duration_seconds_bucket",
        "meter_gateway_batch_duration_seconds_bucket",
        "meter_gateway_queue_records",
    ):
        assert name in text, name

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): Decimal(str(s.value))
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    pair = (("customer", customer), ("dimension", "data-processed"))
    money = tuple(sorted((*pair, ("currency", "USD"))))
    assert samples["meter_gateway_period_usage", pair] == Decimal("2.5")
    assert samples["meter_gateway_period_billable_quantity", pair] == Decimal("2.5")
    # $0.08/GB billed, $0.02/GB cost: the profit-margin dashboard's inputs
    assert samples["meter_gateway_period_revenue", money] == Decimal("0.2")
    assert samples["meter_gateway_period_cost", money] == Decimal("0.05")
