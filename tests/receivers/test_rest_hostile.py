"""Issue 13's hostile bodies against a running gateway (SQLite, or PostgreSQL with
METER_TEST_STORE=postgres): each is answered 200 with that record rejected and a reason (or 400
for an unreadable body, never 5xx), a valid record beside it is stored exactly, the stored
records stay readable, and a valid request afterwards succeeds (no wedge)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import cramjam
import httpx
import orjson
import pytest

from receivers import prompb
from tests.gatewayproc import BASE_CONFIG, INGEST_KEY, GatewayProcess
from tests.helpers import next_id, now_iso, record

REMOTE_WRITE_HEADERS = {
    "Content-Type": "application/x-protobuf",
    "Content-Encoding": "snappy",
    "X-Prometheus-Remote-Write-Version": "0.1.0",
    "Authorization": f"Bearer {INGEST_KEY}",
}


def _config() -> dict[str, Any]:
    cfg = dict(BASE_CONFIG)
    cfg["dimensions"] = [
        *BASE_CONFIG["dimensions"],
        {"id": "level", "name": "Level", "aggregation": "time_weighted_avg"},
    ]
    cfg["rules"] = [
        {"match": {"source": "vector", "metric": "requests"}, "dimension": "data-processed"},
        {
            "match": {"source": "remote_write", "metric": "app_bytes_processed_total"},
            "dimension": "data-processed",
        },
        {"match": {"source": "remote_write", "metric": "app_level"}, "dimension": "level"},
    ]
    return cfg


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(Path(tmp_path_factory.mktemp("hostile")), _config()).start()
    yield gw
    gw.stop()


def raw(client: httpx.Client, customer: str, dimension: str = "data-processed") -> list[Any]:
    r = client.get(
        "/v1/usage",
        params={
            "customerId": customer,
            "dimensionId": dimension,
            "window": "raw",
            "from": "2020-01-01T00:00:00Z",
            "to": now_iso(timedelta(minutes=10)),
        },
    )
    assert r.status_code == 200, r.text
    return list(r.json()["data"])


def still_ingests(client: httpx.Client, customer: str) -> None:
    """A valid request after a hostile one is accepted and committed (nothing wedged)."""
    good = record(customer, "0.5")
    r = client.post("/v1/usage", json=good)
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 1
    assert any(d["id"] == good["id"] for d in raw(client, customer))
    assert client.get("/readyz").status_code == 200


def post_beside_a_good_record(
    client: httpx.Client, customer: str, bad: bytes, ndjson: bool = False
) -> dict[str, Any]:
    """POST [good, bad] and check the good one is stored exactly; the answer's JSON."""
    # No run of 16 digits or dots in the body (record()'s ids have one): the decoder's fast
    # path, so depth up to orjson's 1024 levels is judged per record (the exact path below).
    good = {**record(customer, "12.5", metadata={"k": "v"}), "id": _id()}
    if ndjson:
        body = orjson.dumps(good) + b"\n" + bad
        headers = {"Content-Type": "application/x-ndjson"}
    else:
        body = b"[" + orjson.dumps(good) + b"," + bad + b"]"
        headers = {"Content-Type": "application/json"}
    r = client.post("/v1/usage", content=body, headers=headers)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["accepted"], out["rejected"]) == (1, 1), out
    (error,) = out["errors"]
    assert error["index"] == 1
    assert error["error"]
    stored = [d for d in raw(client, customer) if d["id"] == good["id"]]
    assert [(d["recordValue"], d["metadata"]) for d in stored] == [
        ("12.5", {"k": "v"}),
    ]
    still_ingests(client, customer)
    return dict(error)


def fields(customer: str, value: bytes = b'"1"', **extra: bytes) -> bytes:
    """A record as raw JSON, so any bytes can stand in a field."""
    parts = {
        "id": orjson.dumps(_id()),
        "timestamp": orjson.dumps(now_iso()),
        "customerId": orjson.dumps(customer),
        "dimensionId": b'"data-processed"',
        "recordValue": value,
        **extra,
    }
    return b"{" + b",".join(b'"%s":%s' % (k.encode(), v) for k, v in parts.items()) + b"}"


def _id() -> str:
    return f"hostile-{next_id()}-{time.time_ns() % 10**12}"


def nested(depth: int) -> bytes:
    return b'{"n":' * (depth - 1) + b'{"leaf":1}' + b"}" * (depth - 1)


# --- item 2, 3, 4: metadata too deep to write or read back ------------------------------------


@pytest.mark.parametrize("depth", [33, 252, 253, 254, 255, 1000])
def test_deep_metadata_is_rejected_alone(client: httpx.Client, customer: str, depth: int) -> None:
    error = post_beside_a_good_record(client, customer, fields(customer, metadata=nested(depth)))
    assert (error["field"], error["reason"]) == ("metadata", "too_large")
    assert "32 levels" in error["error"]


def test_deep_metadata_on_the_exact_path_is_rejected_alone(
    client: httpx.Client, customer: str
) -> None:
    # A 17-digit number sends the body through the standard library's parser (exact decimals),
    # whose recursion stops before ~1000 levels: the too-deep record then fails alone.
    for depth in (300, 1000):
        exact = fields(customer, value=b"0.10000000000000001")  # a fresh id each time
        deep = fields(customer, metadata=nested(depth))
        r = client.post(
            "/v1/usage",
            content=b"[%s,%s]" % (exact, deep),
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 200, r.text
        assert (r.json()["accepted"], r.json()["rejected"]) == (1, 1)
        still_ingests(client, customer)


def test_metadata_at_the_depth_limit_is_stored_and_read_back(
    client: httpx.Client, customer: str
) -> None:
    rec = record(customer, "1", metadata=orjson.loads(nested(32)))
    assert client.post("/v1/usage", json=[rec]).json()["accepted"] == 1
    (stored,) = raw(client, customer)
    assert stored["metadata"] == orjson.loads(nested(32))


# --- item 4: bodies that answered 500 ----------------------------------------------------------


def test_a_body_nested_a_thousand_deep_beside_a_good_record(
    client: httpx.Client, customer: str
) -> None:
    error = post_beside_a_good_record(client, customer, b"[" * 1000 + b"]" * 1000)
    assert error["reason"] == "malformed"


@pytest.mark.parametrize("depth", [1000, 5000])
def test_a_lone_body_nested_deep_is_rejected(
    client: httpx.Client, customer: str, depth: int
) -> None:
    for body in (b"[" * depth + b"]" * depth, nested(depth)):
        r = client.post("/v1/usage", content=body, headers={"Content-Type": "application/json"})
        if r.status_code == 200:  # an array of one item that is not a record
            assert (r.json()["accepted"], r.json()["rejected"]) == (0, 1), r.text
        else:
            assert 400 <= r.status_code < 500, r.text
            out = r.json()  # 400 {"error"} for the body, 422 {"errors"} for a lone record
            assert out.get("error") or out["errors"][0]["error"]
        still_ingests(client, customer)


@pytest.mark.parametrize("ndjson", [False, True], ids=["array", "ndjson"])
def test_a_number_no_decimal_can_hold(client: httpx.Client, customer: str, ndjson: bool) -> None:
    bad = fields(customer, value=b"1e99999999999999999999")
    error = post_beside_a_good_record(client, customer, bad, ndjson=ndjson)
    assert (error["field"], error["reason"]) == ("recordValue", "invalid_value")
    assert "1e99999999999999999999" in error["error"]


def test_a_vector_metric_tag_with_a_lone_surrogate(client: httpx.Client, customer: str) -> None:
    event = orjson.dumps(
        {
            "name": "requests",
            "kind": "incremental",
            "counter": {"value": 2},
            "timestamp": now_iso(),
            "tags": {"tenant": customer, "region": "SURROGATE"},
        }
    ).replace(b'"SURROGATE"', b'"\\ud800"')
    error = post_beside_a_good_record(client, customer, event)
    assert (error["field"], error["reason"]) == ("tags.region", "malformed")


# --- item 7: values and timestamps the contract forbids ---------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        b'"\\u0661\\u0662"',  # Arabic-Indic digits
        b'"\\uff11\\uff12"',  # fullwidth digits
        b'"1_000"',
        b'"1_0.5"',
        b"1e-400",
        b'"1e-400"',
        b'".5"',
        b'"5."',
        b'"+5"',
        b'" 5"',
        b"1e21",
        b"100000000000000000000000",
        b"0.0000000000000000001",
    ],
    ids=lambda v: v.decode(),
)
def test_forbidden_values_are_rejected_not_altered(
    client: httpx.Client, customer: str, value: bytes
) -> None:
    error = post_beside_a_good_record(client, customer, fields(customer, value=value))
    assert (error["field"], error["reason"]) == ("recordValue", "invalid_value")
    assert "expected" in error["error"]


def _iso_week(t: datetime) -> str:
    y, w, d = t.isocalendar()
    return f"{y}-W{w:02d}-{d}T{t:%H:%M:%S}Z"


@pytest.mark.parametrize(
    "spell",
    [
        _iso_week,  # 2026-W47-1T16:29:12Z
        lambda t: f"{t:%Y%m%dT%H%M%S}Z",  # 20261129T120000Z
        lambda t: f"{t:%Y-%m-%dT%H}Z",  # 2026-11-29T16Z
        lambda t: f"{t:%Y-%m-%dT%H:%M:%S}",  # no offset
        lambda t: f"{t:%Y-%m-%dT%H:%M:%S}.1234567891Z",  # past nanoseconds
    ],
    ids=["week", "basic", "reduced", "no-offset", "picoseconds"],
)
def test_iso8601_timestamps_outside_rfc3339_are_rejected(
    client: httpx.Client, customer: str, spell: Any
) -> None:
    # Spelled from a minute ago: the old parser accepted these as valid recent timestamps.
    text = spell(datetime.now(UTC) - timedelta(minutes=1))
    bad = fields(customer, timestamp=orjson.dumps(text))
    error = post_beside_a_good_record(client, customer, bad)
    assert (error["field"], error["reason"]) == ("timestamp", "invalid_timestamp")
    assert text in error["error"]


# --- item 8: ids with U+0000 ---------------------------------------------------------------------


@pytest.mark.parametrize("field", ["id", "customerId", "dimensionId"])
def test_nul_in_an_id_is_rejected(client: httpx.Client, customer: str, field: str) -> None:
    extra = {field: orjson.dumps(f"{customer}\x00A")}
    error = post_beside_a_good_record(client, customer, fields(customer, **extra))
    assert (error["field"], error["reason"]) == (field, "invalid_value")
    assert "U+0000" in error["error"]


def test_nul_in_metadata_is_rejected(client: httpx.Client, customer: str) -> None:
    bad = fields(customer, metadata=orjson.dumps({"k": "a\x00b"}))
    error = post_beside_a_good_record(client, customer, bad)
    assert error["field"] == "metadata.k"
    assert "U+0000" in error["error"]


def test_distinct_ids_stay_distinct_and_exact(client: httpx.Client, customer: str) -> None:
    ids = ["nul", "nul A", "nul\tA", "ünï-cødé ✓ 😀", "x" * 512]
    batch = [{**record(customer, "1"), "id": i} for i in ids]
    r = client.post("/v1/usage", json=batch)
    out = r.json()
    # a tab is a control character: rejected like NUL, never stored altered
    assert (out["accepted"], out["rejected"]) == (4, 1), out
    assert out["errors"][0]["index"] == 2
    assert sorted(d["id"] for d in raw(client, customer)) == sorted(ids[:2] + ids[3:])
    again = client.post("/v1/usage", json=batch[:2]).json()
    assert (again["accepted"], again["duplicates"]) == (0, 2)


# --- item 6: remote write, the same bounds ----------------------------------------------------


def _write(series: list[tuple[dict[str, str], list[tuple[float, int]]]]) -> bytes:
    req = prompb.WriteRequest()
    for labels, samples in series:
        ts = req.timeseries.add()
        for k, v in labels.items():
            ts.labels.add(name=k, value=v)
        for value, t_ms in samples:
            ts.samples.add(value=value, timestamp=t_ms)
    return bytes(cramjam.snappy.compress_raw(req.SerializeToString()))


def _remote_write(gateway: GatewayProcess, body: bytes) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/api/v1/write", content=body, headers=REMOTE_WRITE_HEADERS, timeout=30
    )


@pytest.mark.parametrize(
    ("value", "t_offset_ms"),
    [
        (1e300, 0),
        (1e21, 0),
        (-1e21, 0),
        (1e-20, 0),
        (1.0, 2**63 - 1),  # the offset is replaced by the absolute timestamp below
        (1.0, -(2**63)),
    ],
    ids=["1e300", "1e21", "-1e21", "1e-20", "t=2^63-1ms", "t=-2^63ms"],
)
def test_remote_write_gauge_samples_out_of_bounds(
    gateway: GatewayProcess, client: httpx.Client, customer: str, value: float, t_offset_ms: int
) -> None:
    now_ms = int(time.time() * 1000) - 60_000
    t_bad = t_offset_ms if abs(t_offset_ms) > 2**62 else now_ms + 1
    labels = {"__name__": "app_level", "tenant": customer}
    r = _remote_write(gateway, _write([(labels, [(2.5, now_ms), (value, t_bad)])]))
    assert r.status_code == 400, r.text
    assert "1 invalid samples" in r.text
    assert [d["recordValue"] for d in raw(client, customer, "level")] == ["2.5"]
    still_ingests(client, customer)


@pytest.mark.parametrize("t_ms", [2**63 - 1, -(2**63)], ids=["2^63-1ms", "-2^63ms"])
def test_remote_write_counter_sample_at_the_edge_of_time(
    gateway: GatewayProcess, client: httpx.Client, customer: str, t_ms: int
) -> None:
    labels = {"__name__": "app_bytes_processed_total", "tenant": customer}
    now_ms = int(time.time() * 1000) - 60_000
    r = _remote_write(gateway, _write([(labels, [(1.0, now_ms), (5.0, t_ms)])]))
    assert r.status_code < 500, r.text
    still_ingests(client, customer)


def test_remote_write_counter_steps_past_the_bound_are_rejected(
    gateway: GatewayProcess, client: httpx.Client, customer: str
) -> None:
    labels = {"__name__": "app_bytes_processed_total", "tenant": customer}
    t = int(time.time() * 1000) - 60_000
    samples = [(1.0, t), (3.0, t + 1000), (1e300, t + 2000), (2e300, t + 3000)]
    r = _remote_write(gateway, _write([(labels, samples)]))
    assert r.status_code == 400, r.text
    assert "1e21" in r.text
    # 1 → 3 counts 2; the steps of 1e300 are rejected, never stored
    assert sorted(Decimal(d["recordValue"]) for d in raw(client, customer)) == [Decimal(2)]
    still_ingests(client, customer)
