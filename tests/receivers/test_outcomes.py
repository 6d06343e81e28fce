"""One mapping of ingest outcomes to answers (``meter_gateway.pipeline.outcomes``), shown through
every transport: each refusal of the ingestor (overload, a failed commit, draining) answered by
REST, remote write (Vector and Prometheus), OTLP/HTTP and OTLP/gRPC, with its status, its retry
hint and the ``code`` label it leaves in ``/metrics``, which is the HTTP status on every
transport (SPEC §4, §10).

The receivers run in-process on one gateway (store per METER_TEST_STORE): REST and remote write
on its HTTP app over real HTTP, OTLP/HTTP on its own app, OTLP/gRPC on a real grpc server; the
ingestor's ``enqueue`` is made to raise the outcome, so the whole path above it is the real one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cramjam
import grpc
import httpx
import pytest
import uvicorn
from google.rpc import error_details_pb2, status_pb2
from prometheus_client.parser import text_string_to_metric_families

from meter_gateway.clock import FixedClock
from meter_gateway.pipeline import outcomes
from meter_gateway.pipeline.admission import Overloaded, Reservation, TooLarge
from meter_gateway.pipeline.cumulative import StreamsBusy
from meter_gateway.pipeline.ingest import CommitFailed, ShuttingDown
from meter_gateway.service import Gateway
from receivers import prompb
from receivers.otlp_grpc import SERVICE, GrpcSettings, OtlpGrpcServer
from receivers.otlp_http import HttpSettings
from receivers.otlp_http import create_app as create_otlp_app
from tests.billing.appserver import serve
from tests.exporters.otlp_app import gateway_config
from tests.gatewayproc import INGEST_KEY, free_port
from tests.helpers import record
from tests.receivers.test_otlp import point, request, sum_metric

NS = 1_000_000_000
RETRY_S = 2  # ingest.retry_after of the gateway under test
BEARER = f"Bearer {INGEST_KEY}"


# --- the table ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "no_429", "http", "grpc_name", "retry", "retry_info"),
    [
        (Overloaded(1.0), False, 429, "RESOURCE_EXHAUSTED", RETRY_S, True),
        (Overloaded(5.0), False, 429, "RESOURCE_EXHAUSTED", 5, True),  # it asks for longer
        (Overloaded(1.0), True, 503, "UNAVAILABLE", RETRY_S, False),
        (CommitFailed("disk full"), False, 503, "UNAVAILABLE", RETRY_S, False),
        (ShuttingDown("draining"), False, 503, "UNAVAILABLE", RETRY_S, False),
        (StreamsBusy("held"), False, 503, "UNAVAILABLE", RETRY_S, False),
        (TooLarge("too large"), False, 413, "INVALID_ARGUMENT", None, False),
    ],
    ids=[
        "overloaded",
        "overloaded-longer",
        "overloaded-no-429",
        "commit",
        "draining",
        "busy",
        "413",
    ],
)
def test_the_table(
    exc: Exception,
    no_429: bool,
    http: int,
    grpc_name: str,
    retry: int | None,
    retry_info: bool,
) -> None:
    a = outcomes.answer(exc, RETRY_S, no_429=no_429)
    assert (a.http, a.grpc, a.retry_info, a.code) == (http, grpc_name, retry_info, str(http))
    assert a.headers() == (None if retry is None else {"Retry-After": str(retry)})
    assert a.rpc_code == grpc.StatusCode[grpc_name].value[0]
    if http != 413:  # 400, 413 and 415 are all INVALID_ARGUMENT, counted 400 over gRPC
        assert outcomes.grpc_code_label(grpc_name) == str(http)


def test_every_grpc_code_the_gateway_sends_has_its_http_status() -> None:
    for name, status in outcomes.GRPC_HTTP.items():
        assert grpc.StatusCode[name].value[0] == outcomes.RPC_CODE[name]
        assert outcomes.HTTP_RPC_CODE[status] == outcomes.RPC_CODE[name]
    assert outcomes.grpc_code_label("DATA_LOSS") == "500"  # never sent; still a number


def test_anything_else_is_not_an_outcome() -> None:
    with pytest.raises(TypeError):
        outcomes.answer(ValueError("a bug"), RETRY_S)


# --- through every transport --------------------------------------------------------------


@dataclass
class Edge:
    gw: Gateway
    api: httpx.Client  # the gateway's HTTP app (REST, remote write, /metrics), admin key
    otlp_http: httpx.Client  # the OTLP/HTTP app
    grpc_target: str

    def requests(self, receiver: str, code: str) -> float:
        """``meter_gateway_requests_total{receiver, code}`` as ``/metrics`` shows it."""
        text = self.api.get("/metrics").text
        for family in text_string_to_metric_families(text):
            if family.name == "meter_gateway_requests":
                for s in family.samples:
                    if s.name.endswith("_total") and s.labels == {
                        "receiver": receiver,
                        "code": code,
                    }:
                        return float(s.value)
        return 0.0

    def codes(self) -> set[str]:
        text = self.api.get("/metrics").text
        return {
            s.labels["code"]
            for family in text_string_to_metric_families(text)
            if family.name == "meter_gateway_requests"
            for s in family.samples
            if s.name.endswith("_total")
        }


def _config() -> dict[str, Any]:
    config = gateway_config(ingest={"retry_after": f"{RETRY_S}s"})
    config["rules"] = [
        *config["rules"],
        {
            "match": {"source": "remote_write", "metric": "app_seats"},
            "dimension": "seats",
            "customer_attribute": "tenant",
        },
    ]
    return config


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    tmp = Path(tmp_path_factory.mktemp("outcomes"))
    with serve(tmp, _config(), FixedClock(time.time_ns())) as (gw, api):
        limits = gw.config.ingest
        retry = limits.retry_after.total_seconds()
        server = OtlpGrpcServer(
            gw.otlp, gw.keys, gw.telemetry, GrpcSettings("127.0.0.1:0", 4 * 1024 * 1024, retry)
        )
        port = server.start()
        app = create_otlp_app(
            gw.otlp,
            gw.keys,
            gw.telemetry,
            HttpSettings(limits.max_body_bytes, limits.max_decompressed_bytes, retry),
        )
        http_port = free_port()
        http_server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=http_port, log_level="warning")
        )
        thread = threading.Thread(target=http_server.run, daemon=True)
        thread.start()
        while not http_server.started:
            time.sleep(0.01)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as otlp_http:
                yield Edge(gw, api, otlp_http, f"127.0.0.1:{port}")
        finally:
            http_server.should_exit = True
            thread.join()
            server.stop(0)


def refuse(monkeypatch: pytest.MonkeyPatch, gw: Gateway, exc: Exception) -> None:
    """Make the ingestor refuse every batch with ``exc`` (as it would, from ``enqueue``)."""

    def enqueue(
        batch: Any, done: Callable[[Any], None], reservation: Reservation | None = None
    ) -> None:
        if reservation is not None:
            reservation.release()
        raise exc

    monkeypatch.setattr(gw.ingestor, "enqueue", enqueue)


#: The refusals of the ingestor, and what every transport answers to each: HTTP status (429
#: only where the sender retries it), gRPC status, whether gRPC carries RetryInfo.
REFUSALS: list[tuple[str, Callable[[], Exception], int, str, bool]] = [
    ("overloaded", lambda: Overloaded(1.0), 429, "RESOURCE_EXHAUSTED", True),
    (
        "commit-failed",
        lambda: CommitFailed("the store failed: disk full"),
        503,
        "UNAVAILABLE",
        False,
    ),
    ("shutting-down", lambda: ShuttingDown("the gateway is draining"), 503, "UNAVAILABLE", False),
]
IDS = [r[0] for r in REFUSALS]


def _rest(edge: Edge) -> httpx.Response:
    return edge.api.post("/v1/usage", json=[record("acme")], headers={"Authorization": BEARER})


def _remote_write(edge: Edge, user_agent: str) -> httpx.Response:
    req = prompb.WriteRequest()
    ts = req.timeseries.add()
    for k, v in {"__name__": "app_seats", "tenant": "acme"}.items():
        ts.labels.add(name=k, value=v)
    ts.samples.add(value=3.0, timestamp=time.time_ns() // 1_000_000)
    body = bytes(cramjam.snappy.compress_raw(req.SerializeToString()))
    headers = {
        "Content-Type": "application/x-protobuf",
        "Content-Encoding": "snappy",
        "X-Prometheus-Remote-Write-Version": "0.1.0",
        "User-Agent": user_agent,
        "Authorization": BEARER,
    }
    return edge.api.post("/api/v1/write", content=body, headers=headers)


def _otlp_body() -> bytes:
    t = time.time_ns()
    return bytes(
        request(
            sum_metric([point(1, t, t - NS, tenant="acme", n=time.time_ns())])
        ).SerializeToString()
    )


def _export_grpc(edge: Edge) -> grpc.RpcError | None:
    with grpc.insecure_channel(edge.grpc_target) as channel:
        call = channel.unary_unary(f"/{SERVICE}/Export")
        try:
            call(_otlp_body(), metadata=(("authorization", BEARER),), timeout=30)
        except grpc.RpcError as exc:
            return exc
    return None


def _counted(edge: Edge, receiver: str, code: str, send: Callable[[], Any]) -> Any:
    """``send()``, checking it counted once under ``{receiver, code}``."""
    before = edge.requests(receiver, code)
    out = send()
    assert edge.requests(receiver, code) == before + 1
    return out


@pytest.mark.parametrize(("name", "make", "http", "grpc_name", "retry_info"), REFUSALS, ids=IDS)
def test_rest(
    edge: Edge,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    make: Callable[[], Exception],
    http: int,
    grpc_name: str,
    retry_info: bool,
) -> None:
    refuse(monkeypatch, edge.gw, make())
    r = _counted(edge, "rest", str(http), lambda: _rest(edge))
    assert r.status_code == http
    assert r.headers["Retry-After"] == str(RETRY_S)
    assert r.json()["error"]


@pytest.mark.parametrize(("name", "make", "http", "grpc_name", "retry_info"), REFUSALS, ids=IDS)
@pytest.mark.parametrize("user_agent", ["Vector/0.40.0", "Prometheus/2.42.0"])
def test_remote_write(
    edge: Edge,
    monkeypatch: pytest.MonkeyPatch,
    user_agent: str,
    name: str,
    make: Callable[[], Exception],
    http: int,
    grpc_name: str,
    retry_info: bool,
) -> None:
    # Prometheus retries every 5xx but drops the data on a 429: only Vector gets 429s.
    expected = http if user_agent.startswith("Vector/") else 503
    refuse(monkeypatch, edge.gw, make())
    r = _counted(edge, "remote_write", str(expected), lambda: _remote_write(edge, user_agent))
    assert r.status_code == expected
    assert r.headers["Retry-After"] == str(RETRY_S)
    assert r.json()["error"]


@pytest.mark.parametrize(("name", "make", "http", "grpc_name", "retry_info"), REFUSALS, ids=IDS)
def test_otlp_http(
    edge: Edge,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    make: Callable[[], Exception],
    http: int,
    grpc_name: str,
    retry_info: bool,
) -> None:
    refuse(monkeypatch, edge.gw, make())
    headers = {"Content-Type": "application/x-protobuf", "Authorization": BEARER}

    def send() -> Any:
        return edge.otlp_http.post("/v1/metrics", content=_otlp_body(), headers=headers)

    r = _counted(edge, "otlp", str(http), send)
    assert r.status_code == http
    assert r.headers["Retry-After"] == str(RETRY_S)
    assert status_pb2.Status.FromString(r.content).code == grpc.StatusCode[grpc_name].value[0]


@pytest.mark.parametrize(("name", "make", "http", "grpc_name", "retry_info"), REFUSALS, ids=IDS)
def test_otlp_grpc(
    edge: Edge,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    make: Callable[[], Exception],
    http: int,
    grpc_name: str,
    retry_info: bool,
) -> None:
    refuse(monkeypatch, edge.gw, make())
    exc = _counted(edge, "otlp", str(http), lambda: _export_grpc(edge))
    assert exc is not None
    assert exc.code() == grpc.StatusCode[grpc_name]
    trailers = dict(exc.trailing_metadata() or ())
    if retry_info:
        retry = error_details_pb2.RetryInfo.FromString(trailers["google.rpc.retryinfo-bin"])
        assert retry.retry_delay.seconds == RETRY_S
        status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
        assert status.code == grpc.StatusCode[grpc_name].value[0]
        assert status.details[0].Is(error_details_pb2.RetryInfo.DESCRIPTOR)
    else:
        assert "google.rpc.retryinfo-bin" not in trailers


def test_rest_body_larger_than_the_budget_is_413(
    edge: Edge, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = edge.gw.ingestor.budget
    assert budget is not None

    def reserve(nbytes: int, wire_bytes: int | None = None) -> Reservation:
        raise TooLarge("the body needs more than the whole ingest memory budget")

    monkeypatch.setattr(budget, "reserve", reserve)
    r = _counted(edge, "rest", "413", lambda: _rest(edge))
    assert r.status_code == 413
    assert "Retry-After" not in r.headers  # it can never be admitted: no retry


def test_success_counts_as_200_over_grpc_and_http_and_every_code_is_a_status(
    edge: Edge,
) -> None:
    assert _counted(edge, "otlp", "200", lambda: _export_grpc(edge)) is None
    headers = {"Content-Type": "application/x-protobuf", "Authorization": BEARER}

    def send() -> Any:
        return edge.otlp_http.post("/v1/metrics", content=_otlp_body(), headers=headers)

    assert _counted(edge, "otlp", "200", send).status_code == 200
    with grpc.insecure_channel(edge.grpc_target) as channel:  # no key: UNAUTHENTICATED is 401
        call = channel.unary_unary(f"/{SERVICE}/Export")
        before = edge.requests("otlp", "401")
        with pytest.raises(grpc.RpcError) as err:
            call(_otlp_body(), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert edge.requests("otlp", "401") == before + 1
    codes = edge.codes()
    assert codes
    assert all(c.isdigit() and 100 <= int(c) <= 599 for c in codes), codes
