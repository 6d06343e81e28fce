"""Hostile OTLP (HTTP protobuf and JSON, gRPC) and Prometheus remote-write requests against a
running gateway.

Oracle: never a 5xx, gRPC ``INTERNAL`` or ``UNKNOWN``; a valid request right after succeeds (no
wedge); every value stored is one the contract allows (finite, |v| < 1e21, ≤ 18 places); and
for OTLP delta sums no point disappears silently — each is stored or counted in the partial
success's ``rejected_data_points`` — and a plainly valid point is stored with its exact value.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import time
import uuid
from collections import Counter
from decimal import Decimal
from typing import Any

import cramjam
import grpc
import httpx
import pytest
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from receivers import prompb
from tests.gatewayproc import INGEST_KEY, GatewayProcess
from tests.reliability.fuzzing import (
    Tally,
    fresh_customer,
    fuzz_settings,
    gateway_alive,
    probe,
    raw_records,
)
from tests.reliability.oracle import NS, Verdict, judge_number_text, plain_text

GRPC_METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
AUTH = (("authorization", f"Bearer {INGEST_KEY}"),)
BAD_GRPC = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
U64 = 2**64 - 1
I64 = 2**63 - 1
STALE_NAN = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000002))[0]


@pytest.fixture(scope="module")
def probe_customer(admin: httpx.Client) -> str:
    return fresh_customer(admin, "probe")[0]


@pytest.fixture(scope="module")
def grpc_channel(fuzz_gateway: GatewayProcess) -> Any:
    with grpc.insecure_channel(fuzz_gateway.otlp_grpc) as ch:
        yield ch


# --- OTLP requests --------------------------------------------------------------------------


def any_value(v: Any) -> dict[str, Any]:
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    if isinstance(v, float):
        if math.isnan(v):
            return {"doubleValue": "NaN"}
        return {"doubleValue": v if math.isfinite(v) else ("Infinity" if v > 0 else "-Infinity")}
    if isinstance(v, bytes):
        return {"bytesValue": base64.b64encode(v).decode()}
    if isinstance(v, list):
        return {"arrayValue": {"values": [any_value(x) for x in v]}}
    if isinstance(v, dict):
        return {
            "kvlistValue": {"values": [{"key": k, "value": any_value(x)} for k, x in v.items()]}
        }
    return {"stringValue": v}


def export_request(metrics: list[dict[str, Any]], service: Any = "fuzz") -> Any:
    doc = {
        "resourceMetrics": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": any_value(service)}]},
                "scopeMetrics": [{"scope": {"name": "fuzz"}, "metrics": metrics}],
            }
        ]
    }
    return json_format.ParseDict(doc, ExportMetricsServiceRequest())


def delta_sum(points: list[dict[str, Any]], name: str = "fuzz.requests") -> dict[str, Any]:
    return {
        "name": name,
        "sum": {"aggregationTemporality": 1, "isMonotonic": True, "dataPoints": points},
    }


def plain_point(customer: str, value: int, t_ns: int) -> dict[str, Any]:
    return {
        "timeUnixNano": str(t_ns),
        "startTimeUnixNano": str(t_ns - NS),
        "asInt": str(value),
        "attributes": [{"key": "tenant", "value": {"stringValue": customer}}],
    }


ATTR_VALUES = st.one_of(
    st.text(max_size=12),
    st.integers(-(2**63), I64),
    st.booleans(),
    st.sampled_from([0.5, math.nan, math.inf, -0.0, 1e308]),
    st.binary(max_size=9),
    st.lists(st.integers(0, 9), max_size=3),
    st.just({"k": "v"}),
    st.sampled_from(["\x00", "\ufeff", "a" * 5000]),
)
DOUBLES = st.one_of(
    st.sampled_from(
        [math.nan, math.inf, -math.inf, 1e300, 1e21, 9.99e20, -1.0, -0.0, 0.1, 5e-324, 1e-300]
    ),
    st.floats(allow_nan=False, allow_infinity=False),
)
INTS = st.one_of(
    st.integers(0, 10**6),
    st.sampled_from([0, 1, I64, -(2**63), -1, 10**18, 10**21 // 1000]),
    st.integers(-(2**63), I64),
)


@st.composite
def otlp_points(draw: st.DrawFn, customer: str, alias: str, t_ns: int) -> dict[str, Any]:
    """One data point: hostile value, time, start time and attributes; ``t_ns`` is its own
    (unique) plausible time, used unless an extreme one is drawn."""
    p: dict[str, Any] = {}
    value_kind = draw(st.sampled_from(["int", "int", "double", "none"]))
    if value_kind == "int":
        p["asInt"] = str(draw(INTS))
    elif value_kind == "double":
        d = draw(DOUBLES)
        p["asDouble"] = d if math.isfinite(d) else str(d).replace("inf", "Infinity")
        if math.isnan(d):
            p["asDouble"] = "NaN"
    time_ns = draw(
        st.one_of(
            st.just(t_ns),
            st.just(t_ns),
            st.sampled_from([0, 1, U64, 2**63, t_ns + 3600 * NS, t_ns - 40 * 86400 * NS]),
        )
    )
    p["timeUnixNano"] = str(time_ns)
    start = draw(st.sampled_from(["absent", "absent", "before", "equal", "after", "zero", "max"]))
    if start != "absent":
        p["startTimeUnixNano"] = str(
            {"before": time_ns - NS, "equal": time_ns, "after": time_ns + NS, "zero": 0}.get(
                start, U64
            )
            % (U64 + 1)
        )
    attrs = []
    for _ in range(draw(st.integers(0, 3))):
        attrs.append({"key": draw(st.text(max_size=10)), "value": any_value(draw(ATTR_VALUES))})
    tenant: Any = draw(st.sampled_from([customer] * 5 + [alias, "nobody", 7, True]))
    attrs.insert(draw(st.integers(0, len(attrs))), {"key": "tenant", "value": any_value(tenant)})
    p["attributes"] = attrs
    return p


def _plainly_valid(p: dict[str, Any], customer: str, alias: str, now_ns: int) -> bool:
    """A point SPEC says must be stored: an integer amount 0..1e18, stamped in the last day,
    no start or a start before its time, tenant the customer (a string), small attributes."""
    if "asInt" not in p or not 0 <= int(p["asInt"]) <= 10**18:
        return False
    t = int(p["timeUnixNano"])
    if not now_ns - 86400 * NS <= t <= now_ns:
        return False
    if "startTimeUnixNano" in p and not 0 < int(p["startTimeUnixNano"]) < t:
        return False
    tenants = [a for a in p["attributes"] if a["key"] == "tenant"]
    if tenants[0]["value"] not in ({"stringValue": customer}, {"stringValue": alias}):
        return False
    # text with control characters (a NUL) may be refused: SPEC leaves that to the gateway
    texts = [a["key"] for a in p["attributes"]]
    texts += [v for a in p["attributes"] for v in a["value"].values() if isinstance(v, str)]
    return all(plain_text(t) for t in texts) and all(
        len(json.dumps(a)) < 200 for a in p["attributes"]
    )


def _is_nan_point(p: dict[str, Any]) -> bool:
    return "asInt" not in p and p.get("asDouble") in ("NaN", None)


def send_otlp(
    gw: GatewayProcess, channel: Any, transport: str, body: bytes, tally: Tally
) -> tuple[str, bytes]:
    """One export over ``transport``; returns (status, response bytes) and checks the status."""
    if transport == "grpc":
        call = channel.unary_unary(GRPC_METHOD)
        try:
            raw = call(body, metadata=AUTH, timeout=30)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
        else:
            tally.add("otlp-grpc", "OK")
            return "OK", raw
        tally.add("otlp-grpc", code.name)
        assert code not in BAD_GRPC, f"gRPC {code.name}: {details}"
        gateway_alive(gw)
        return code.name, b""
    ctype = "application/json" if transport == "http-json" else "application/x-protobuf"
    try:
        r = httpx.post(
            f"{gw.otlp_http}/v1/metrics",
            content=body,
            headers={"content-type": ctype, "authorization": f"Bearer {INGEST_KEY}"},
            timeout=30,
        )
    except httpx.TransportError as exc:
        raise AssertionError(f"connection failed: {exc!r}") from None
    tally.add(f"otlp-{transport}", r.status_code)
    assert r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    return str(r.status_code), r.content


def encode(req: Any, transport: str) -> bytes:
    if transport == "http-json":
        return json_format.MessageToJson(req).encode()
    return bytes(req.SerializeToString())


def parse_response(transport: str, raw: bytes) -> Any:
    if transport == "http-json":
        return json_format.Parse(raw, ExportMetricsServiceResponse())
    return ExportMetricsServiceResponse.FromString(raw)


def otlp_probe(gw: GatewayProcess, channel: Any, transport: str, tally: Tally) -> None:
    """No wedge: a plain valid point is accepted in full right after."""
    cust = f"probe-{uuid.uuid4().hex[:8]}"  # unknown customer: rejected, but answered 200
    t = time.time_ns() - 2 * NS
    req = export_request([delta_sum([plain_point("acme", 1, t), plain_point(cust, 1, t)])])
    status, raw = send_otlp(gw, channel, transport, encode(req, transport), tally)
    assert status in ("OK", "200"), f"wedged: a valid export answered {status}"
    assert parse_response(transport, raw).partial_success.rejected_data_points == 1


def assert_allowed_values(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        j = judge_number_text(row["recordValue"], negative_ok=True)
        assert j.verdict is Verdict.VALID, f"stored a forbidden value: {row}"


TRANSPORTS = st.sampled_from(["http-pb", "http-json", "grpc"])


@fuzz_settings(60)
@given(data=st.data())
def test_otlp_points_are_stored_or_counted_rejected(
    data: st.DataObject,
    fuzz_gateway: GatewayProcess,
    admin: httpx.Client,
    grpc_channel: Any,
    probe_customer: str,
    tally: Tally,
) -> None:
    customer, alias = fresh_customer(admin)
    now_ns = time.time_ns()
    n = data.draw(st.integers(1, 8), label="n")
    points = [
        data.draw(otlp_points(customer, alias, now_ns - (i + 2) * NS), label=f"point {i}")
        for i in range(n)
    ]
    transport = data.draw(TRANSPORTS, label="transport")
    req = export_request([delta_sum(points)], data.draw(ATTR_VALUES, label="service"))
    status, raw = send_otlp(fuzz_gateway, grpc_channel, transport, encode(req, transport), tally)
    rows = raw_records(admin, customer)
    assert_allowed_values(rows)
    if status in ("OK", "200"):
        rejected = parse_response(transport, raw).partial_success.rejected_data_points
        counted = [p for p in points if not _is_nan_point(p)]
        # (stream, time) duplicates inside one export count once
        keys = Counter(
            json.dumps([p["attributes"], p["timeUnixNano"], p.get("startTimeUnixNano")])
            for p in counted
        )
        distinct = len(keys)
        # a point with no value (or NaN) may be skipped or rejected; any other is stored or
        # rejected, and a repeated (stream, time) may count once
        assert distinct <= len(rows) + rejected <= len(points), (
            f"{len(points)} points ({distinct} distinct with a value): {len(rows)} stored + "
            f"{rejected} rejected — some point was dropped without a word"
        )
        stored = Counter(Decimal(r["recordValue"]) for r in rows)
        for p in points:
            if (
                _plainly_valid(p, customer, alias, now_ns)
                and keys[
                    json.dumps([p["attributes"], p["timeUnixNano"], p.get("startTimeUnixNano")])
                ]
                == 1
            ):
                v = Decimal(p["asInt"])
                assert stored[v] > 0, f"valid point {p} not stored (stored: {dict(stored)})"
                stored[v] -= 1
    else:
        assert rows == [] or status == "OK", f"refused ({status}) yet stored {rows}"
    gateway_alive(fuzz_gateway)
    otlp_probe(fuzz_gateway, grpc_channel, transport, tally)
    probe(fuzz_gateway, admin, probe_customer)


@st.composite
def mutated(draw: st.DrawFn, body: bytes) -> bytes:
    """``body`` with bytes flipped, cut, inserted or repeated."""
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "repeat"]))
        if not body:
            body = draw(st.binary(max_size=16))
            continue
        # a position as a fraction of the length: the same draw means the same place even
        # when the body's length varies between runs (its timestamps are taken from the clock)
        pos = draw(st.integers(0, 999_999)) * len(body) // 1_000_000
        if how == "flip":
            body = body[:pos] + bytes([body[pos] ^ draw(st.integers(1, 255))]) + body[pos + 1 :]
        elif how == "truncate":
            body = body[:pos]
        elif how == "insert":
            body = body[:pos] + draw(st.binary(min_size=1, max_size=12)) + body[pos:]
        elif how == "delete":
            body = body[:pos] + body[pos + draw(st.integers(1, 8)) :]
        else:
            body = body + body[pos:]
    return body


@fuzz_settings(100)
@given(data=st.data())
def test_mutated_otlp_requests_never_fail_the_server(
    data: st.DataObject,
    fuzz_gateway: GatewayProcess,
    admin: httpx.Client,
    grpc_channel: Any,
    probe_customer: str,
    tally: Tally,
) -> None:
    customer, alias = fresh_customer(admin)
    now_ns = time.time_ns()
    points = [
        data.draw(otlp_points(customer, alias, now_ns - (i + 2) * NS), label=f"point {i}")
        for i in range(data.draw(st.integers(1, 4), label="n"))
    ]
    metric = data.draw(
        st.sampled_from(
            [
                delta_sum(points),
                {"name": "fuzz.level", "gauge": {"dataPoints": points}},
                {
                    "name": "fuzz.requests",
                    "sum": {"aggregationTemporality": 2, "isMonotonic": True, "dataPoints": points},
                },
            ]
        ),
        label="metric",
    )
    transport = data.draw(TRANSPORTS, label="transport")
    body = data.draw(mutated(encode(export_request([metric]), transport)), label="body")
    send_otlp(fuzz_gateway, grpc_channel, transport, body, tally)
    assert_allowed_values(raw_records(admin, customer))
    gateway_alive(fuzz_gateway)
    otlp_probe(fuzz_gateway, grpc_channel, transport, tally)
    probe(fuzz_gateway, admin, probe_customer)


# --- remote write ---------------------------------------------------------------------------

RW_HEADERS = {
    "Content-Type": "application/x-protobuf",
    "Content-Encoding": "snappy",
    "X-Prometheus-Remote-Write-Version": "0.1.0",
    "Authorization": f"Bearer {INGEST_KEY}",
}
RW2 = "io.prometheus.write.v2.Request"
RW_VALUES = st.one_of(
    st.sampled_from([1e300, 1e21, 9.99e20, -1.0, 0.0, -0.0, 0.1, 5e-324, 1e-300, 2.0**63]),
    st.sampled_from([1e20, math.nan, math.inf, -math.inf, STALE_NAN]),
    st.floats(),
    st.integers(0, 10**6).map(float),
)
RW_TIMES = st.sampled_from(["now", "now", "now", I64, -(2**63), 0, "future", "old", 2**53])


def write_request(series: list[tuple[dict[str, str], list[tuple[float, int]]]]) -> bytes:
    req = prompb.WriteRequest()
    for labels, samples in series:
        ts = req.timeseries.add()
        for k, v in labels.items():
            ts.labels.add(name=k, value=v)
        for value, t_ms in samples:
            ts.samples.add(value=value, timestamp=t_ms)
    return bytes(req.SerializeToString())


@st.composite
def rw_series(draw: st.DrawFn, customer: str) -> tuple[dict[str, str], list[tuple[float, int]]]:
    now_ms = time.time_ns() // 1_000_000
    labels = {
        "__name__": draw(st.sampled_from(["fuzz_bytes_total", "fuzz_level", "other"])),
        "tenant": draw(st.sampled_from([customer, customer, "nobody", ""])),
    }
    for _ in range(draw(st.integers(0, 3))):
        labels[draw(st.text(min_size=1, max_size=10))] = draw(st.text(max_size=20))
    samples = []
    t_last = now_ms - 60_000
    for _ in range(draw(st.integers(1, 6))):
        t_last += draw(st.integers(-2000, 5000))
        when = draw(RW_TIMES)
        t = {"now": t_last, "future": now_ms + 3_600_000, "old": now_ms - 40 * 86_400_000}.get(
            when, when
        )
        samples.append((draw(RW_VALUES), int(t)))  # type: ignore[call-overload]
    return labels, samples


def send_rw(gw: GatewayProcess, body: bytes, tally: Tally, headers: dict[str, str]) -> int:
    try:
        r = httpx.post(f"{gw.url}/api/v1/write", content=body, headers=headers, timeout=30)
    except httpx.TransportError as exc:
        raise AssertionError(f"connection failed: {exc!r}") from None
    tally.add("remote-write", r.status_code)
    assert r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    return r.status_code


def rw_probe(gw: GatewayProcess, tally: Tally) -> None:
    labels = {"__name__": "fuzz_bytes_total", "tenant": "acme", "probe": uuid.uuid4().hex}
    body = cramjam.snappy.compress_raw(write_request([(labels, [(1.0, int(time.time() * 1000))])]))
    status = send_rw(gw, bytes(body), tally, RW_HEADERS)
    assert 200 <= status < 300, f"wedged: a valid remote write answered {status}"


@fuzz_settings(80)
@given(data=st.data())
def test_remote_write_stores_only_allowed_values(
    data: st.DataObject,
    fuzz_gateway: GatewayProcess,
    admin: httpx.Client,
    probe_customer: str,
    tally: Tally,
) -> None:
    customer, _ = fresh_customer(admin)
    series = [
        data.draw(rw_series(customer), label="series") for _ in range(data.draw(st.integers(1, 3)))
    ]
    raw = write_request(series)
    how = data.draw(st.sampled_from(["plain"] * 3 + ["mutate-proto", "mutate-snappy", "headers"]))
    headers = dict(RW_HEADERS)
    if how == "mutate-proto":
        raw = data.draw(mutated(raw), label="protobuf")
    body = bytes(cramjam.snappy.compress_raw(raw))
    if how == "mutate-snappy":
        body = data.draw(mutated(body), label="snappy")
    if how == "headers":
        headers.update(
            data.draw(
                st.sampled_from(
                    [
                        {"Content-Encoding": "gzip"},
                        {"Content-Type": f"application/x-protobuf;proto={RW2}"},
                        {"X-Prometheus-Remote-Write-Version": "2.0.0"},
                        {"Content-Type": "application/json"},
                        {"Content-Encoding": "identity"},
                    ]
                ),
                label="headers",
            )
        )
    send_rw(fuzz_gateway, body, tally, headers)
    assert_allowed_values(raw_records(admin, customer))
    gateway_alive(fuzz_gateway)
    rw_probe(fuzz_gateway, tally)
    probe(fuzz_gateway, admin, probe_customer)


@pytest.mark.parametrize(
    ("value", "t_ms"),
    [(1.0, I64), (1.0, -(2**63)), (1e300, None), (1e21, None), (9.99e20, None)],
)
@pytest.mark.parametrize("name", ["fuzz_bytes_total", "fuzz_level"])
def test_remote_write_extremes_from_the_issue(
    value: float,
    t_ms: int | None,
    name: str,
    fuzz_gateway: GatewayProcess,
    admin: httpx.Client,
    tally: Tally,
) -> None:
    customer, _ = fresh_customer(admin)
    now_ms = time.time_ns() // 1_000_000
    samples = [(5.0, now_ms - 3000), (value, t_ms if t_ms is not None else now_ms - 2000)]
    if t_ms is None and name == "fuzz_bytes_total":
        samples.append((value * 2, now_ms - 1000))  # a counter step of the same size
    body = bytes(
        cramjam.snappy.compress_raw(
            write_request([({"__name__": name, "tenant": customer}, samples)])
        )
    )
    send_rw(fuzz_gateway, body, tally, RW_HEADERS)
    assert_allowed_values(raw_records(admin, customer))
    rw_probe(fuzz_gateway, tally)
