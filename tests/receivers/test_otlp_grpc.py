"""The OTLP/gRPC receiver against a running gateway, with raw protobuf over a grpcio channel."""

from __future__ import annotations

import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceResponse,
)

from tests.exporters.otlp_app import gateway_config
from tests.gatewayproc import INGEST_KEY, READ_KEY, GatewayProcess
from tests.helpers import total
from tests.receivers.test_otlp import point, request, sum_metric

METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
AUTH = (("authorization", f"Bearer {INGEST_KEY}"),)
NS = 1_000_000_000


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(Path(tmp_path_factory.mktemp("otlp-grpc")), gateway_config()).start()
    yield gw
    assert gw.stop() == 0, gw.log()


def export(
    target: str,
    body: bytes,
    metadata: tuple[tuple[str, str], ...] = AUTH,
    compression: Any = None,
    credentials: Any = None,
) -> Any:
    """One raw Export call; returns the parsed response or raises grpc.RpcError."""
    channel = (
        grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    )
    with channel:
        call = channel.unary_unary(METHOD)
        raw = call(body, metadata=metadata, timeout=30, compression=compression)
    return ExportMetricsServiceResponse.FromString(raw)


def now_ns() -> int:
    return time.time_ns()


@pytest.mark.parametrize("temporality", [1, 2])
def test_same_export_sent_twice_counts_once(
    gateway: GatewayProcess, client: httpx.Client, customer: str, temporality: int
) -> None:
    t = now_ns()
    body = request(
        sum_metric(
            [
                point(5, t, t - 60 * NS, tenant=customer),
                point(2.5, t, t - 60 * NS, tenant=customer, x="1"),
            ],
            temporality=temporality,
        )
    ).SerializeToString()
    for _ in range(2):
        response = export(gateway.otlp_grpc, body)
        assert not response.HasField("partial_success")
    assert total(client, customer) == Decimal("7.5")


def test_gzip_compressed_calls(
    gateway: GatewayProcess, client: httpx.Client, customer: str
) -> None:
    t = now_ns()
    body = request(sum_metric([point(3, t, t - NS, tenant=customer)])).SerializeToString()
    export(gateway.otlp_grpc, body, compression=grpc.Compression.Gzip)
    assert total(client, customer) == 3


def test_partial_success_names_the_rejected_points(
    gateway: GatewayProcess, client: httpx.Client, customer: str
) -> None:
    t = now_ns()
    body = request(
        sum_metric([point(1, t, t - NS, tenant=customer), point(1, t, t - NS, tenant="nobody")]),
        sum_metric([point(1, t, t - NS, tenant=customer)], name="app.not.billed"),
    ).SerializeToString()
    response = export(gateway.otlp_grpc, body)
    assert response.partial_success.rejected_data_points == 2
    message = response.partial_success.error_message
    assert "2 of 3 data points rejected" in message
    assert "unknown customer 'nobody'" in message
    assert "no mapping rule matches otlp metric 'app.not.billed'" in message
    assert total(client, customer) == 1
    rejected = client.get("/v1/rejected", params={"reason": "unmapped"}).json()["data"]
    assert any("app.not.billed" in r["error"] for r in rejected)


def test_malformed_protobuf_is_invalid_argument_and_the_server_lives_on(
    gateway: GatewayProcess, client: httpx.Client, customer: str
) -> None:
    for junk in (b"\xff\xff\xff\xff", b"\x0a\x05abc", b"\x0a" * 5000):
        with pytest.raises(grpc.RpcError) as exc:
            export(gateway.otlp_grpc, junk)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid OTLP ExportMetricsServiceRequest" in exc.value.details()
    t = now_ns()
    export(
        gateway.otlp_grpc,
        request(sum_metric([point(1, t, t - NS, tenant=customer)])).SerializeToString(),
    )
    assert total(client, customer) == 1


def test_unknown_fields_are_ignored(
    gateway: GatewayProcess, client: httpx.Client, customer: str
) -> None:
    t = now_ns()
    body = request(sum_metric([point(4, t, t - NS, tenant=customer)])).SerializeToString()
    # field 99 (varint 1) and field 100 (bytes "future") at the top level
    body += b"\x98\x06\x01" + b"\xa2\x06\x06future"
    response = export(gateway.otlp_grpc, body)
    assert not response.HasField("partial_success")
    assert total(client, customer) == 4


def test_huge_attribute_sets_are_rejected_points_not_crashes(
    gateway: GatewayProcess, client: httpx.Client, customer: str
) -> None:
    t = now_ns()
    many = {f"k{i}": "v" for i in range(10_000)}
    body = request(
        sum_metric(
            [
                point(1, t, t - NS, tenant=customer, **many),
                point(1, t, t - NS, tenant=customer, blob="x" * 1_000_000),
                point(2, t, t - NS, tenant=customer),
            ]
        )
    ).SerializeToString()
    response = export(gateway.otlp_grpc, body)
    assert response.partial_success.rejected_data_points == 2
    assert "10001 attributes; at most 128" in response.partial_success.error_message
    assert total(client, customer) == 2


def test_nan_and_no_recorded_value_points_add_nothing(
    gateway: GatewayProcess, client: httpx.Client, customer: str
) -> None:
    t = now_ns()
    req = request(
        sum_metric(
            [
                point(0.5, t, t - NS, tenant=customer),  # made NaN below
                point(7, t, t - NS, tenant=customer, k="flagged"),
                point(1, t, t - NS, tenant=customer, k="counted"),
            ]
        )
    )
    points = req.resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points
    points[0].as_double = float("nan")
    points[1].flags = 1  # DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK
    response = export(gateway.otlp_grpc, req.SerializeToString())
    assert not response.HasField("partial_success")
    assert total(client, customer) == 1


def test_empty_request_succeeds(gateway: GatewayProcess) -> None:
    assert not export(gateway.otlp_grpc, b"").HasField("partial_success")


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer not-a-key-0123456789"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", f"Bearer {READ_KEY}"),), grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_auth(gateway: GatewayProcess, metadata: tuple[tuple[str, str], ...], code: Any) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        export(gateway.otlp_grpc, b"", metadata)
    assert exc.value.code() == code


def test_too_many_points_is_invalid_argument(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path, gateway_config(ingest={"max_batch_records": 10})).start()
    try:
        t = now_ns()
        points = [point(1, t, t - NS, tenant="acme", n=i) for i in range(11)]
        with pytest.raises(grpc.RpcError) as exc:
            export(gw.otlp_grpc, request(sum_metric(points)).SerializeToString())
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "11 data points; at most 10" in exc.value.details()
    finally:
        assert gw.stop() == 0


def test_a_full_queue_is_resource_exhausted_with_retry_info(tmp_path: Path) -> None:
    config = gateway_config(ingest={"max_queue_records": 1, "retry_after": "2s"})
    gw = GatewayProcess(tmp_path, config).start()
    try:
        t = now_ns()
        outcomes: list[Any] = []

        def send(i: int) -> None:
            points = [point(1, t, t - NS, tenant="acme", batch=str(i), n=n) for n in range(200)]
            try:
                export(gw.otlp_grpc, request(sum_metric(points)).SerializeToString())
                outcomes.append("ok")
            except grpc.RpcError as exc:
                outcomes.append(exc)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(24)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        refused = [o for o in outcomes if o != "ok"]
        assert refused, "no export was refused; the queue never filled"
        for exc in refused:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            trailers = dict(exc.trailing_metadata())
            retry = error_details_pb2.RetryInfo.FromString(trailers["google.rpc.retryinfo-bin"])
            assert retry.retry_delay.seconds == 2
            status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
            assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert status.details[0].Is(error_details_pb2.RetryInfo.DESCRIPTOR)
        with gw.client() as c:  # exactly the accepted exports were stored
            assert total(c, "acme") == 200 * outcomes.count("ok")
    finally:
        assert gw.stop() == 0


def make_cert(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls_on_both_otlp_listeners(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    tls = {"cert_file": str(cert), "key_file": str(key)}
    config = gateway_config(server={"otlp_grpc": dict(tls), "otlp_http": dict(tls)})
    gw = GatewayProcess(tmp_path, config).start()
    try:
        t = now_ns()
        body = request(sum_metric([point(2, t, t - NS, tenant="acme")])).SerializeToString()
        creds = grpc.ssl_channel_credentials(cert.read_bytes())
        export(gw.otlp_grpc, body, credentials=creds)
        url = gw.otlp_http.replace("http://", "https://") + "/v1/metrics"
        body2 = request(sum_metric([point(3, t + 1, t, tenant="acme")])).SerializeToString()
        r = httpx.post(
            url,
            content=body2,
            headers={"content-type": "application/x-protobuf", "authorization": AUTH[0][1]},
            verify=ssl.create_default_context(cafile=str(cert)),
        )
        assert r.status_code == 200, r.text
        with pytest.raises(grpc.RpcError):  # plaintext to a TLS port
            export(gw.otlp_grpc, body)
        with gw.client() as c:
            assert total(c, "acme") == 5
    finally:
        assert gw.stop() == 0


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_sigterm_drains_exports_in_flight(tmp_path: Path, protocol: str) -> None:
    """SIGTERM while exports stream in: every answered export is stored, the process exits 0,
    and re-sending the unanswered ones after a restart makes the total exact (natural keys)."""
    gw = GatewayProcess(tmp_path, gateway_config()).start()
    t = now_ns()
    bodies = [
        request(
            sum_metric([point(1, t, t - NS, tenant="acme", export=str(i), n=n) for n in range(50)])
        ).SerializeToString()
        for i in range(200)
    ]
    answered: list[int] = []
    lock = threading.Lock()
    streaming = threading.Event()  # some answered, most still to send: time to stop
    counter = iter(range(len(bodies)))
    http = httpx.Client(timeout=30)  # one client: each new one loads the CA bundle

    def send_one(i: int) -> bool:
        try:
            if protocol == "grpc":
                export(gw.otlp_grpc, bodies[i])
                return True
            r = http.post(
                f"{gw.otlp_http}/v1/metrics",
                content=bodies[i],
                headers={"content-type": "application/x-protobuf", "authorization": AUTH[0][1]},
            )
            return r.status_code == 200
        except (grpc.RpcError, httpx.TransportError):
            return False

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            if send_one(i):
                with lock:
                    answered.append(i)
                    if len(answered) >= 20:
                        streaming.set()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for th in threads:
        th.start()
    assert streaming.wait(60), gw.log()
    assert gw.stop() == 0, gw.log()
    for th in threads:
        th.join()
    assert answered  # (and, on any machine this runs on, some were still in flight)
    gw.start()
    try:
        with gw.client() as c:
            assert total(c, "acme") >= 50 * len(answered)  # answered means stored
        retries = sorted(set(range(len(bodies))) - set(answered))  # what clients would retry
        retries += answered[:10]  # and retries of answered ones count once
        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(send_one, retries))
        with gw.client() as c:
            assert total(c, "acme") == 50 * len(bodies)
    finally:
        http.close()
        assert gw.stop() == 0


def test_a_taken_grpc_port_is_a_clear_start_up_error(tmp_path: Path) -> None:
    """Not a traceback: the gateway says which listener could not bind and exits 1."""
    import socket
    import subprocess
    import sys

    import yaml

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "c.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "server": {
                        "http": {"listen": "127.0.0.1:0"},
                        "otlp_http": {"listen": "127.0.0.1:0"},
                        "otlp_grpc": {"listen": f"127.0.0.1:{port}"},
                    },
                    "store": {"url": f"sqlite:///{tmp_path / 'g.db'}"},
                }
            )
        )
        done = subprocess.run(
            [sys.executable, "-m", "meter_gateway", "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert f"OTLP/gRPC could not listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
