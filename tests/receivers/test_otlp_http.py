"""The OTLP/HTTP receiver against a running gateway: ``POST /v1/metrics`` with httpx."""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.rpc import status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceResponse,
)

from tests.exporters.otlp_app import gateway_config
from tests.gatewayproc import INGEST_KEY, READ_KEY, GatewayProcess
from tests.helpers import total
from tests.receivers.test_otlp import point, request, request_json, sum_metric

NS = 1_000_000_000
PROTOBUF = "application/x-protobuf"
JSON = "application/json"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    config = gateway_config(ingest={"max_body_bytes": 256 * 1024})
    gw = GatewayProcess(Path(tmp_path_factory.mktemp("otlp-http")), config).start()
    yield gw
    assert gw.stop() == 0, gw.log()


@pytest.fixture
def otlp(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=gateway.otlp_http,
        headers={"authorization": f"Bearer {INGEST_KEY}"},
        timeout=30,
    ) as c:
        yield c


def post(otlp: httpx.Client, body: bytes, content_type: str, **headers: str) -> httpx.Response:
    return otlp.post("/v1/metrics", content=body, headers={"content-type": content_type, **headers})


def protobuf_body(
    customer: str, value: int = 5, temporality: int = 1, t: int | None = None
) -> bytes:
    t = t or time.time_ns()
    req = request(sum_metric([point(value, t, t - NS, tenant=customer)], temporality=temporality))
    return bytes(req.SerializeToString())


def json_body(customer: str, value: int = 5, temporality: int = 1, t: int | None = None) -> bytes:
    t = t or time.time_ns()
    doc = request_json(
        sum_metric([point(value, t, t - NS, tenant=customer)], temporality=temporality)
    )
    return json.dumps(doc).encode()


@pytest.mark.parametrize("temporality", [1, 2])
@pytest.mark.parametrize("content_type", [PROTOBUF, JSON])
def test_same_export_sent_twice_counts_once(
    otlp: httpx.Client, client: httpx.Client, customer: str, content_type: str, temporality: int
) -> None:
    make = protobuf_body if content_type == PROTOBUF else json_body
    body = make(customer, 5, temporality)
    for _ in range(2):
        r = post(otlp, body, content_type)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == content_type  # answered in the request's type
    assert total(client, customer) == 5


def test_protobuf_response_is_an_export_response(otlp: httpx.Client, customer: str) -> None:
    r = post(otlp, protobuf_body(customer), PROTOBUF)
    assert not ExportMetricsServiceResponse.FromString(r.content).HasField("partial_success")


def test_wire_formats_json_example(otlp: httpx.Client, client: httpx.Client, customer: str) -> None:
    # The OTLP/JSON example of WIRE_FORMATS.md, moved to now: a first cumulative point with
    # start < time is a true start, so all 42 count.
    now = time.time_ns()
    body = (
        '{"resourceMetrics":[{"resource":{"attributes":[{"key":"service.name","value":'
        '{"stringValue":"api"}}]},"scopeMetrics":[{"scope":{"name":"meter"},"metrics":'
        '[{"name":"app.data.processed","unit":"1","sum":{"aggregationTemporality":2,'
        '"isMonotonic":true,"dataPoints":[{"asInt":"42","startTimeUnixNano":"START",'
        '"timeUnixNano":"TIME","attributes":[{"key":"tenant","value":{"stringValue":"WHO"}}]}]}}]}]}]}'
    )
    body = body.replace("START", str(now - 60 * NS)).replace("TIME", str(now))
    body = body.replace("WHO", customer)
    r = post(otlp, body.encode(), "application/json; charset=utf-8")
    assert r.status_code == 200, r.text
    assert r.json() == {}
    assert total(client, customer) == 42


@pytest.mark.parametrize("content_type", [PROTOBUF, JSON])
def test_gzip_bodies(
    otlp: httpx.Client, client: httpx.Client, customer: str, content_type: str
) -> None:
    body = (protobuf_body if content_type == PROTOBUF else json_body)(customer, 3)
    r = post(otlp, gzip.compress(body), content_type, **{"content-encoding": "gzip"})
    assert r.status_code == 200, r.text
    assert total(client, customer) == 3


def test_partial_success_in_json(otlp: httpx.Client, client: httpx.Client, customer: str) -> None:
    t = time.time_ns()
    doc = request_json(
        sum_metric([point(1, t, t - NS, tenant=customer), point(1, t, t - NS, tenant="nobody")])
    )
    r = post(otlp, json.dumps(doc).encode(), JSON)
    assert r.status_code == 200
    partial = r.json()["partialSuccess"]
    assert partial["rejectedDataPoints"] == "1"  # int64 as a string, as OTLP/JSON has it
    assert "unknown customer 'nobody'" in partial["errorMessage"]
    assert total(client, customer) == 1


def test_partial_success_in_protobuf(otlp: httpx.Client, customer: str) -> None:
    t = time.time_ns()
    req = request(sum_metric([point(1, t, t - NS, tenant=customer)], name="app.unknown"))
    r = post(otlp, req.SerializeToString(), PROTOBUF)
    response = ExportMetricsServiceResponse.FromString(r.content)
    assert response.partial_success.rejected_data_points == 1
    assert "no mapping rule" in response.partial_success.error_message


def test_empty_requests_succeed(otlp: httpx.Client) -> None:
    assert post(otlp, b"", PROTOBUF).status_code == 200
    assert post(otlp, b"{}", JSON).status_code == 200


def test_body_over_the_limit_is_413(otlp: httpx.Client) -> None:
    r = post(otlp, b"\x00" * (256 * 1024 + 1), PROTOBUF)
    assert r.status_code == 413
    status = status_pb2.Status.FromString(r.content)
    assert "exceeds the limit" in status.message


def test_gzip_bomb_is_413(otlp: httpx.Client) -> None:
    bomb = gzip.compress(b"\x00" * (200 * 1024 * 1024))  # 200 MB from ~200 kB
    r = post(otlp, bomb, PROTOBUF, **{"content-encoding": "gzip"})
    assert r.status_code == 413, r.text


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
def test_other_content_types_are_415(otlp: httpx.Client, content_type: str) -> None:
    r = post(otlp, b"hello", content_type)
    assert r.status_code == 415
    assert "application/x-protobuf or application/json" in r.json()["message"]


@pytest.mark.parametrize(
    ("body", "content_type"),
    [(b"\xff\xff\xff\xff", PROTOBUF), (b"\x0a" * 3000, PROTOBUF), (b"{oops", JSON)],
)
def test_malformed_bodies_are_400_with_a_status(
    otlp: httpx.Client, body: bytes, content_type: str
) -> None:
    r = post(otlp, body, content_type)
    assert r.status_code == 400
    if content_type == PROTOBUF:
        status = status_pb2.Status.FromString(r.content)
        assert (status.code, "not a valid OTLP" in status.message) == (3, True)
    else:
        assert r.json()["code"] == 3
        assert "not valid JSON" in r.json()["message"]


def test_bad_gzip_is_400(otlp: httpx.Client) -> None:
    r = post(otlp, b"not gzip at all", PROTOBUF, **{"content-encoding": "gzip"})
    assert r.status_code == 400


@pytest.mark.parametrize(
    ("key", "status"), [(None, 401), ("not-a-key-0123456789", 401), (READ_KEY, 403)]
)
def test_auth(gateway: GatewayProcess, key: str | None, status: int) -> None:
    headers = {"content-type": JSON}
    if key:
        headers["authorization"] = f"Bearer {key}"
    r = httpx.post(f"{gateway.otlp_http}/v1/metrics", content=b"{}", headers=headers)
    assert r.status_code == status
    assert r.json()["code"] == (16 if status == 401 else 7)
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer")


def test_only_post_v1_metrics(otlp: httpx.Client) -> None:
    assert otlp.get("/v1/metrics").status_code == 405
    assert (
        otlp.post("/v1/traces", content=b"", headers={"content-type": PROTOBUF}).status_code == 404
    )


def test_a_full_queue_is_429_with_retry_after(tmp_path: Path) -> None:
    config = gateway_config(ingest={"max_queue_records": 1, "retry_after": "3s"})
    gw = GatewayProcess(tmp_path, config).start()
    try:
        t = time.time_ns()
        results: list[Any] = []

        def send(i: int) -> None:
            points = [point(1, t, t - NS, tenant="acme", batch=str(i), n=n) for n in range(200)]
            r = httpx.post(
                f"{gw.otlp_http}/v1/metrics",
                content=request(sum_metric(points)).SerializeToString(),
                headers={"content-type": PROTOBUF, "authorization": f"Bearer {INGEST_KEY}"},
                timeout=30,
            )
            results.append(r)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(24)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        refused = [r for r in results if r.status_code != 200]
        assert refused, "no export was refused; the queue never filled"
        for r in refused:
            assert r.status_code == 429
            assert r.headers["retry-after"] == "3"
            assert status_pb2.Status.FromString(r.content).code == 8
        accepted = sum(1 for r in results if r.status_code == 200)
        with gw.client() as c:
            assert total(c, "acme") == Decimal(200 * accepted)
    finally:
        assert gw.stop() == 0
