"""Hostile input to both OTLP receivers of a running gateway: gRPC and HTTP, protobuf and JSON,
gzip. Whatever comes in, the answer is never a 5xx or ``INTERNAL``: a request refused whole is
a 4xx (``INVALID_ARGUMENT``), a bad point is a partial success with its reason, the valid points
of the same request are stored exactly once, and a valid request afterwards succeeds.

Issue 13 item 1 is here too: a point without start time whose first attribute encodes to nine
bytes, after a point of the same metric with one (it answered 500, or vanished unreported).
"""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from tests.exporters.otlp_app import gateway_config
from tests.gatewayproc import INGEST_KEY, GatewayProcess
from tests.helpers import next_id, total
from tests.receivers.test_otlp import request_json, sum_metric

NS = 1_000_000_000
METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
AUTH = (("authorization", f"Bearer {INGEST_KEY}"),)
PROTOBUF, JSON = "application/x-protobuf", "application/json"
MAX_BODY = 256 * 1024
MAX_DECOMPRESSED = 4 * 1024 * 1024
# Answers that may refuse a request whole; everything else a hostile request gets must be OK.
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    # max_body_bytes is also the gRPC receiver's largest message
    config = gateway_config(
        ingest={"max_body_bytes": MAX_BODY, "max_decompressed_bytes": MAX_DECOMPRESSED}
    )
    gw = GatewayProcess(Path(tmp_path_factory.mktemp("otlp-hostile")), config).start()
    yield gw
    assert gw.stop() == 0, gw.log()


@pytest.fixture(scope="module")
def channel(gateway: GatewayProcess) -> Iterator[Any]:
    with grpc.insecure_channel(gateway.otlp_grpc) as ch:
        yield ch


@pytest.fixture(scope="module")
def otlp(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=gateway.otlp_http, headers={"authorization": f"Bearer {INGEST_KEY}"}, timeout=30
    ) as c:
        yield c


class Answer:
    """One export's outcome over either protocol: ok with its partial success, or refused."""

    def __init__(self, ok: bool, rejected: int = 0, message: str = "", status: Any = None):
        self.ok, self.rejected, self.message, self.status = ok, rejected, message, status

    def __repr__(self) -> str:
        return f"Answer(ok={self.ok}, rejected={self.rejected}, {self.message!r}, {self.status})"


Send = Callable[..., Answer]


def send_grpc(channel: Any, body: bytes, compression: Any = None) -> Answer:
    call = channel.unary_unary(METHOD)
    try:
        raw = call(body, metadata=AUTH, timeout=30, compression=compression)
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
    else:
        ps = ExportMetricsServiceResponse.FromString(raw).partial_success
        return Answer(True, ps.rejected_data_points, ps.error_message)
    assert code in REFUSALS, (code, details)
    assert details  # says why
    return Answer(False, status=code, message=details)


def send_http(
    otlp: httpx.Client, body: bytes, content_type: str = PROTOBUF, **headers: str
) -> Answer:
    r = otlp.post("/v1/metrics", content=body, headers={"content-type": content_type, **headers})
    assert r.status_code < 500, (r.status_code, r.content[:300])
    if r.status_code != 200:
        assert 400 <= r.status_code < 500
        assert r.content  # a google.rpc.Status saying why
        return Answer(False, status=r.status_code, message=r.text[:300])
    response = ExportMetricsServiceResponse()
    if content_type == JSON:
        json_format.Parse(r.text, response)
    else:
        response.ParseFromString(r.content)
    ps = response.partial_success
    return Answer(True, ps.rejected_data_points, ps.error_message)


@pytest.fixture(params=["grpc", "http", "http-json", "http-gzip"])
def send(request: pytest.FixtureRequest, channel: Any, otlp: httpx.Client) -> Send:
    """Sends an ``ExportMetricsServiceRequest`` given as a JSON document."""
    kind = request.param

    def go(doc: dict[str, Any]) -> Answer:
        if kind == "http-json":
            return send_http(otlp, json.dumps(doc).encode(), JSON)
        body = bytes(json_format.ParseDict(doc, ExportMetricsServiceRequest()).SerializeToString())
        if kind == "grpc":
            return send_grpc(channel, body)
        if kind == "http-gzip":
            return send_http(otlp, gzip.compress(body), PROTOBUF, **{"content-encoding": "gzip"})
        return send_http(otlp, body)

    return go


def new_customer(gateway: GatewayProcess) -> str:
    cid = f"hostile-{next_id()}-{time.time_ns()}"
    with gateway.client() as c:
        r = c.post("/v1/customers", json={"id": cid, "name": cid, "offering": "pay-as-you-go"})
        assert r.status_code == 201, r.text
    return cid


def stored(gateway: GatewayProcess, customer: str) -> Decimal:
    with gateway.client() as c:
        return total(c, customer)


def kv(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return {"key": key, "value": value}
    if isinstance(value, bool):
        return {"key": key, "value": {"boolValue": value}}
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}
    return {"key": key, "value": {"stringValue": value}}


def num(
    value: int | float | str, t: int | None, start: int | None = None, *attributes: Any
) -> dict[str, Any]:
    p: dict[str, Any] = {"attributes": list(attributes)}
    if t is not None:
        p["timeUnixNano"] = str(t)
    if start is not None:
        p["startTimeUnixNano"] = str(start)
    if isinstance(value, int):
        p["asInt"] = str(value)
    else:
        p["asDouble"] = value
    return p


def export(*points: dict[str, Any], temporality: int = 1) -> dict[str, Any]:
    return request_json(sum_metric(list(points), temporality=temporality))


def still_works(send: Send, gateway: GatewayProcess) -> None:
    """A valid request after a hostile one is stored."""
    customer = new_customer(gateway)
    t = time.time_ns()
    answer = send(export(num(11, t, t - NS, kv("tenant", customer))))
    assert answer.ok, answer
    assert answer.rejected == 0, answer
    assert stored(gateway, customer) == 11


# --- issue 13 item 1 -------------------------------------------------------------------------


@pytest.mark.parametrize("first", [kv("a", 1), kv("x", True), kv("k", "")], ids=str)
def test_a_point_without_start_time_after_a_known_series_is_stored(
    send: Send, gateway: GatewayProcess, first: dict[str, Any]
) -> None:
    customer = new_customer(gateway)
    tenant = kv("tenant", customer)
    t = time.time_ns() - 10 * NS
    assert send(export(num(5, t, t - NS, tenant))).ok
    # The first attribute encodes to 9 bytes: the rest of the point looked like a known series.
    answer = send(export(num(1000, t + NS, None, first, tenant)))
    assert answer.ok, answer
    assert answer.rejected == 0, answer
    assert stored(gateway, customer) == 1005
    # Beside a point of the known series, in one export: both are stored.
    answer = send(
        export(num(7, t + 2 * NS, t + NS, tenant), num(2000, t + 2 * NS, None, first, tenant))
    )
    assert answer.ok, answer
    assert answer.rejected == 0, answer
    assert stored(gateway, customer) == 3012
    # And sent again, nothing more.
    assert send(
        export(num(7, t + 2 * NS, t + NS, tenant), num(2000, t + 2 * NS, None, first, tenant))
    ).ok
    assert stored(gateway, customer) == 3012


# --- hostile points beside a valid one ----------------------------------------------------------


def nested_kvlist(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"stringValue": "bottom"}
    for _ in range(depth):
        value = {"kvlistValue": {"values": [{"key": "k", "value": value}]}}
    return value


U64_MAX = 2**64 - 1


def _hostile_points(tenant: dict[str, Any], t: int) -> dict[str, list[dict[str, Any]]]:
    return {
        "time 0": [num(3, 0, None, tenant)],
        "no time": [num(3, None, None, tenant)],
        "time 2^64-1": [num(3, U64_MAX, t - NS, tenant)],
        "start 2^64-1": [num(3, t, U64_MAX, tenant)],
        "start and time 2^64-1": [num(3, U64_MAX, U64_MAX, tenant)],
        "NaN": [num("NaN", t, t - NS, tenant)],
        "Infinity": [num("Infinity", t, t - NS, tenant)],
        "-Infinity": [num("-Infinity", t, t - NS, tenant)],
        "1e300": [num(1e300, t, t - NS, tenant)],
        "int64 min": [num(-(2**63), t, t - NS, tenant)],
        "no value": [{"timeUnixNano": str(t), "attributes": [tenant]}],
        "5000 attributes": [num(3, t, t - NS, tenant, *(kv(f"a{i}", i) for i in range(5000)))],
        "kvlist 25 deep": [num(3, t, t - NS, tenant, kv("deep", nested_kvlist(25)))],
        "long attribute": [num(3, t, t - NS, tenant, kv("long", "x" * 100_000))],
        "no value, flags 1": [{"timeUnixNano": str(t), "flags": 1, "attributes": [tenant]}],
        "NaN no start": [num("NaN", t, None, tenant)],
    }


HOSTILE = list(_hostile_points(kv("tenant", "x"), 1))


@pytest.mark.parametrize("temporality", [1, 2])
@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_points_beside_a_valid_one(
    send: Send, gateway: GatewayProcess, case: str, temporality: int
) -> None:
    customer = new_customer(gateway)
    tenant = kv("tenant", customer)
    t = time.time_ns() - 30 * NS
    bad = _hostile_points(tenant, t)[case]
    # (cumulative: a true start, so the whole value is the first delta)
    valid = num(5, t - NS, t - 2 * NS, kv("tenant", customer), kv("good", True))
    body = export(valid, *bad, temporality=temporality)
    for _ in range(2):  # sent twice: stored once
        answer = send(body)
        if not answer.ok:  # refused whole (the body is too large): nothing is stored
            assert case in ("5000 attributes", "long attribute"), answer
            assert stored(gateway, customer) == 0
            break
        assert answer.rejected <= len(bad), answer
        if answer.rejected:
            assert answer.message, answer
        assert stored(gateway, customer) - 5 in (0, 3), answer  # the bad point: 3 or nothing
    still_works(send, gateway)


# --- hostile bodies ----------------------------------------------------------------------------


def _valid_body() -> bytes:
    t = time.time_ns()
    doc = export(num(5, t, t - NS, kv("tenant", "acme")))
    return bytes(json_format.ParseDict(doc, ExportMetricsServiceRequest()).SerializeToString())


def _deep_protobuf(depth: int) -> bytes:
    """A request whose one attribute nests kvlists ``depth`` deep, built from the bytes up
    (the protobuf library itself refuses to build it)."""

    def field(number: int, payload: bytes) -> bytes:
        return _varint(number << 3 | 2) + _varint(len(payload)) + payload

    value = field(1, b"bottom")  # AnyValue.string_value
    for _ in range(depth):
        kvpair = field(1, b"k") + field(2, value)  # KeyValue
        value = field(6, field(1, kvpair))  # AnyValue.kvlist_value.values
    point = b"\x19" + time.time_ns().to_bytes(8, "little") + b"\x31" + (5).to_bytes(8, "little")
    point += field(7, field(1, b"deep") + field(2, value))
    metric = field(1, b"app.data.processed") + field(7, field(1, point) + b"\x10\x01")
    return field(1, field(2, field(2, metric)))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _bad_utf8() -> bytes:
    body = _valid_body()
    return body.replace(b"acme", b"ac\xff\xfe")


BODIES: dict[str, Callable[[], bytes]] = {
    "garbage": lambda: bytes(range(256)) * 3,
    "truncated": lambda: _valid_body()[:-7],
    "one byte": lambda: b"\x0a",
    "length past the end": lambda: b"\x0a\xff\xff\xff\x0f\x00",
    "invalid UTF-8 in a string": _bad_utf8,
    "kvlist 1000 deep": lambda: _deep_protobuf(1000),
    "kvlist 99 deep": lambda: _deep_protobuf(99),
    "group tags": lambda: b"\x0b\x0c" * 50,
    "zeros": lambda: bytes(4096),
}


@pytest.mark.parametrize("case", list(BODIES))
def test_hostile_protobuf_bodies(
    case: str, gateway: GatewayProcess, channel: Any, otlp: httpx.Client
) -> None:
    body = BODIES[case]()
    for answer in (
        send_grpc(channel, body),
        send_http(otlp, body),
        send_http(otlp, gzip.compress(body), **{"content-encoding": "gzip"}),
    ):
        if answer.ok:  # valid protobuf after all: whatever was in it was judged point by point
            assert case in ("kvlist 99 deep", "zeros", "group tags"), answer
    still_works(lambda doc: send_grpc(channel, _to_bytes(doc)), gateway)
    still_works(lambda doc: send_http(otlp, _to_bytes(doc)), gateway)


def _to_bytes(doc: dict[str, Any]) -> bytes:
    return bytes(json_format.ParseDict(doc, ExportMetricsServiceRequest()).SerializeToString())


def _deep_json(depth: int) -> bytes:
    """A request whose one attribute nests kvlists ``depth`` deep (written out as text: the
    json module cannot encode it)."""
    t = time.time_ns()
    doc = export(num(5, t, t - NS, kv("tenant", "acme"), kv("deep", {"stringValue": "DEEP"})))
    head, tail = json.dumps(doc).split('{"stringValue": "DEEP"}')
    nest = '{"kvlistValue": {"values": [{"key": "k", "value": '
    return (head + nest * depth + '{"stringValue": "bottom"}' + "}]}}" * depth + tail).encode()


JSON_BODIES: dict[str, Callable[[], bytes]] = {
    "not JSON": lambda: b"{resourceMetrics",
    "an array": lambda: b"[1, 2]",
    "a string": lambda: b'"x"',
    "wrong types": lambda: b'{"resourceMetrics": [{"scopeMetrics": 5}]}',
    "time as a word": lambda: (
        b'{"resourceMetrics":[{"scopeMetrics":[{"metrics":[{"name":"m",'
        b'"sum":{"dataPoints":[{"timeUnixNano":"soon","asInt":"1"}]}}]}]}]}'
    ),
    "asInt past int64": lambda: (
        b'{"resourceMetrics":[{"scopeMetrics":[{"metrics":[{"name":"m",'
        b'"sum":{"dataPoints":[{"timeUnixNano":"1","asInt":"99999999999999999999999"}]}}]}]}]}'
    ),
    "lone surrogate": lambda: _deep_json(1).replace(b'"bottom"', b'"\\ud800"'),
    "invalid UTF-8": lambda: _deep_json(1).replace(b"bottom", b"bo\xfftom"),
    "kvlist 1000 deep": lambda: _deep_json(1000),
    "nested 5000 deep": lambda: b"[" * 5000 + b"]" * 5000,
    "bad hex exemplar id": lambda: (
        b'{"resourceMetrics":[{"scopeMetrics":[{"metrics":[{"name":'
        b'"m","gauge":{"dataPoints":[{"exemplars":[{"spanId":"zz"}]}]}}]}]}]}'
    ),
}


@pytest.mark.parametrize("case", list(JSON_BODIES))
def test_hostile_json_bodies(case: str, gateway: GatewayProcess, otlp: httpx.Client) -> None:
    body = JSON_BODIES[case]()
    for answer in (
        send_http(otlp, body, JSON),
        send_http(otlp, gzip.compress(body), JSON, **{"content-encoding": "gzip"}),
    ):
        assert not answer.ok, answer
    still_works(lambda doc: send_http(otlp, json.dumps(doc).encode(), JSON), gateway)


@pytest.mark.parametrize(
    ("content_type", "headers", "body", "status"),
    [
        ("text/plain", {}, b"x", 415),
        ("", {}, b"x", 415),
        ("application/x-protobuf", {"content-encoding": "gzip"}, b"not gzip", 400),
        ("application/x-protobuf", {"content-encoding": "br"}, b"x", 415),
        ("application/json", {"content-encoding": "gzip"}, gzip.compress(b"{")[:-3], 400),
        ("application/x-protobuf", {}, b"\x00" * (MAX_BODY + 1), 413),
        (
            "application/x-protobuf",
            {"content-encoding": "gzip"},
            gzip.compress(bytes(2 * MAX_DECOMPRESSED)),
            413,
        ),
    ],
    ids=["text", "none", "bad gzip", "brotli", "cut gzip", "oversized", "gzip bomb"],
)
def test_wrong_content_types_encodings_and_sizes_are_4xx(
    gateway: GatewayProcess,
    otlp: httpx.Client,
    content_type: str,
    headers: dict[str, str],
    body: bytes,
    status: int,
) -> None:
    r = otlp.post("/v1/metrics", content=body, headers={"content-type": content_type, **headers})
    assert r.status_code == status, (r.status_code, r.text[:200])
    still_works(lambda doc: send_http(otlp, _to_bytes(doc)), gateway)


def test_oversized_grpc_messages_are_refused(gateway: GatewayProcess, channel: Any) -> None:
    answer = send_grpc(channel, b"\x0a" + _varint(MAX_BODY + 10) + bytes(MAX_BODY + 10))
    assert answer.status == grpc.StatusCode.RESOURCE_EXHAUSTED, answer
    answer = send_grpc(channel, bytes(range(256)) * 4, grpc.Compression.Gzip)
    assert answer.status == grpc.StatusCode.INVALID_ARGUMENT, answer
    still_works(lambda doc: send_grpc(channel, _to_bytes(doc)), gateway)


# --- generated mutations -----------------------------------------------------------------------


def _request_bytes(customer: str, t: int) -> bytes:
    doc = request_json(
        sum_metric([num(5, t, t - NS, kv("tenant", customer), kv("a", 1))]),
        sum_metric(
            [num(2.5, t, t - 60 * NS, kv("tenant", customer), kv("x", True))],
            name="app.data.processed",
            temporality=2,
        ),
        {
            "name": "app.seats",
            "gauge": {"dataPoints": [num(4, t, None, kv("tenant", customer))]},
        },
    )
    return _to_bytes(doc)


MUTATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.integers(0, 10_000), st.integers(0, 255)),
        st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=9)),
        st.tuples(st.just("delete"), st.integers(0, 10_000), st.integers(1, 16)),
        st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    ),
    min_size=1,
    max_size=4,
)


def mutate(raw: bytes, mutations: list[tuple[str, int, Any]]) -> bytes:
    b = bytearray(raw)
    for kind, where, arg in mutations:
        at = where % (len(b) + 1)
        if kind == "set" and b:
            b[at % len(b)] = arg
        elif kind == "insert":
            b[at:at] = arg
        elif kind == "delete":
            del b[at : at + arg]
        elif kind == "truncate":
            del b[at:]
    return bytes(b)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_mutated_requests_never_fail_and_count_once(
    protocol: str, gateway: GatewayProcess, channel: Any, otlp: httpx.Client
) -> None:
    customer = new_customer(gateway)
    t0 = time.time_ns() - 60 * NS

    def send_bytes(body: bytes) -> Answer:
        return send_grpc(channel, body) if protocol == "grpc" else send_http(otlp, body)

    step = iter(range(10**6))

    @settings(
        max_examples=30,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(MUTATIONS)
    def run(mutations: list[tuple[str, int, Any]]) -> None:
        body = mutate(_request_bytes(customer, t0 + next(step) * NS), mutations)
        before = stored(gateway, customer)
        first = send_bytes(body)
        after = stored(gateway, customer)
        second = send_bytes(body)  # a retry: whatever the first stored, nothing more
        assert stored(gateway, customer) == after, (first, second)
        assert first.ok == second.ok
        if not first.ok:
            assert after == before

    run()
    still_works(lambda doc: send_bytes(_to_bytes(doc)), gateway)
