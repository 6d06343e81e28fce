"""Hostile remote-write 1.0 requests (snappy + protobuf) against a running gateway.

Whatever comes in, the answer is never a 5xx: a body refused whole is a 4xx, bad samples are a
400 naming them while the valid samples of the same request are stored exactly once, and a
valid request afterwards is accepted. The bytes are also mutated by hypothesis, before and
after snappy, and every mutated request is sent twice: the retry adds nothing.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import cramjam
import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from tests.gatewayproc import GatewayProcess
from tests.helpers import next_id, total
from tests.receivers.test_otlp_codec import varint
from tests.receivers.test_otlp_hostile import MUTATIONS, mutate
from tests.receivers.test_remote_write import HEADERS, _config, snappy, write_request

COUNTER = "app_bytes_processed_total"
GAUGE = "app_storage_bytes"  # a level, scale 1e-9
I64_MAX, I64_MIN = 2**63 - 1, -(2**63)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    g = GatewayProcess(Path(tmp_path_factory.mktemp("rw-hostile")), _config()).start()
    yield g
    assert g.stop() == 0, g.log()


def post(gw: GatewayProcess, body: bytes, **headers: str) -> httpx.Response:
    r = httpx.post(
        f"{gw.url}/api/v1/write", content=body, headers={**HEADERS, **headers}, timeout=30
    )
    assert r.status_code < 500, (r.status_code, r.text[:300])
    return r


def new_customer(gw: GatewayProcess) -> str:
    cid = f"rwh-{next_id()}-{time.time_ns()}"
    with gw.client() as c:
        r = c.post("/v1/customers", json={"id": cid, "name": cid, "offering": "pay-as-you-go"})
        assert r.status_code == 201, r.text
    return cid


def stored(gw: GatewayProcess, customer: str, dimension: str = "data-processed") -> Decimal:
    with gw.client() as c:
        return total(c, customer, dimension)


def raw_values(gw: GatewayProcess, customer: str, dimension: str) -> list[str]:
    with gw.client() as c:
        r = c.get(
            "/v1/usage",
            params={
                "customerId": customer,
                "dimensionId": dimension,
                "window": "raw",
                "from": "2020-01-01T00:00:00Z",
                "to": "2100-01-01T00:00:00Z",
            },
        )
    assert r.status_code == 200, r.text
    return [d["recordValue"] for d in r.json()["data"]]


def still_works(gw: GatewayProcess) -> None:
    customer = new_customer(gw)
    t = int(time.time() * 1000) - 60_000
    series = {"__name__": COUNTER, "tenant": customer}
    r = post(gw, snappy(write_request([(series, [(1.0, t), (4.0, t + 1000)])])))
    assert r.status_code == 204, r.text
    assert stored(gw, customer) == 3


# --- hostile samples beside valid ones -------------------------------------------------------


def _hostile_samples() -> dict[str, tuple[str, list[tuple[float, int]]]]:
    """(metric, samples after the valid ones) per case; ``None`` times mean "now"."""
    return {
        "timestamp 2^63-1 ms": (COUNTER, [(20.0, I64_MAX)]),
        "timestamp -2^63 ms": (COUNTER, [(20.0, I64_MIN)]),
        "timestamp 0": (COUNTER, [(20.0, 0)]),
        "gauge timestamp 2^63-1 ms": (GAUGE, [(5e9, I64_MAX)]),
        "gauge timestamp -2^63 ms": (GAUGE, [(5e9, I64_MIN)]),
        "+Inf": (COUNTER, [(float("inf"), -1)]),
        "gauge -Inf": (GAUGE, [(float("-inf"), -1)]),
        "gauge 1e300": (GAUGE, [(1e300, -1)]),
        "gauge 1e30 (1e21 after scale)": (GAUGE, [(1e30, -1)]),
        "counter step 1e300": (COUNTER, [(1e300, -1)]),
        "counter 1e21": (COUNTER, [(1e21, -1)]),
    }


@pytest.mark.parametrize("case", list(_hostile_samples()))
def test_hostile_samples_beside_valid_ones(gw: GatewayProcess, case: str) -> None:
    customer = new_customer(gw)
    t = int(time.time() * 1000) - 120_000
    metric, bad = _hostile_samples()[case]
    bad = [(v, t + 5000 if at == -1 else at) for v, at in bad]
    labels = {"__name__": metric, "tenant": customer}
    valid = {"__name__": COUNTER, "tenant": customer, "good": "yes"}
    # The counter's first sample is a baseline, the second an increase of 2; the hostile
    # samples follow the valid ones of their series.
    body = write_request(
        [
            (valid, [(10.0, t), (12.0, t + 1000)]),
            (labels, [(1.0, t + 2000) if metric == COUNTER else (3e9, t + 2000), *bad]),
        ]
    )
    for _ in range(2):  # a retry stores nothing more
        r = post(gw, snappy(body))
        assert r.status_code in (204, 400), r.text
        if r.status_code == 400:
            assert "invalid samples (the valid ones were stored)" in r.text, r.text
        assert stored(gw, customer) == 2  # the hostile counter step never counts
        if metric == GAUGE:
            levels = raw_values(gw, customer, "storage-level")
            assert levels[:1] == ["3"], levels  # 3e9 bytes, scaled
            assert all(abs(Decimal(v)) < Decimal(10) ** 21 for v in levels), levels
    still_works(gw)


def _field(number: int, payload: bytes) -> bytes:
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


def test_invalid_utf8_in_a_label_is_a_400(gw: GatewayProcess) -> None:
    t = int(time.time() * 1000) - 60_000
    sample = b"\x09" + struct.pack("<d", 1.0) + b"\x10" + varint(t)
    labels = _field(1, _field(1, b"__name__") + _field(2, COUNTER.encode()))
    labels += _field(1, _field(1, b"tenant") + _field(2, b"ac\xffme"))
    body = _field(1, labels + _field(2, sample))
    r = post(gw, snappy(body))
    assert r.status_code == 400, r.text
    still_works(gw)


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (bytes(range(256)) * 4, {}, 400),
        (snappy(bytes(range(256)) * 4), {}, 400),
        (snappy(b"\x0a" * 100), {}, 400),
        (snappy(b""), {}, 204),  # an empty WriteRequest
        (b"", {}, 400),
        (snappy(b"x"), {"Content-Type": "application/json"}, 415),
        (snappy(b"x"), {"Content-Encoding": "zstd"}, 415),
        (bytes(cramjam.snappy.compress(b"\x0a\x00")), {}, 400),  # framed, not block
    ],
    ids=["garbage", "snappy garbage", "truncated", "empty", "no body", "json", "zstd", "framed"],
)
def test_hostile_bodies_are_4xx(
    gw: GatewayProcess, body: bytes, headers: dict[str, str], status: int
) -> None:
    r = post(gw, body, **headers)
    assert r.status_code == status, r.text
    still_works(gw)


# --- generated mutations ---------------------------------------------------------------------


def _request(customer: str, t: int) -> bytes:
    return write_request(
        [
            ({"__name__": COUNTER, "tenant": customer}, [(10.0, t), (12.5, t + 1000)]),
            ({"__name__": GAUGE, "tenant": customer}, [(2e9, t)]),
        ],
        [(COUNTER.removesuffix("_total"), 1)],
    )


@pytest.mark.parametrize("where", ["protobuf", "snappy"])
def test_mutated_requests_never_fail_and_count_once(gw: GatewayProcess, where: str) -> None:
    customer = new_customer(gw)
    t0 = int(time.time() * 1000) - 3_600_000
    step = iter(range(10**6))

    @settings(
        max_examples=30,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(MUTATIONS)
    def run(mutations: list[tuple[str, int, Any]]) -> None:
        raw = _request(customer, t0 + next(step) * 10_000)
        body = (
            snappy(mutate(raw, mutations))
            if where == "protobuf"
            else mutate(snappy(raw), mutations)
        )
        before = stored(gw, customer)
        first = post(gw, body)
        after = stored(gw, customer)
        second = post(gw, body)
        assert stored(gw, customer) == after, (first.text, second.text)
        # (the status may differ: a counter step refused the first time moved the state, so
        # the retry finds no step to refuse)
        if first.status_code != 204 and "invalid samples" not in first.text:
            assert after == before, first.text  # refused whole: nothing stored

    run()
    still_works(gw)
