"""POST /v1/usage against a running gateway: framings, encodings, envelopes, bad input."""

from __future__ import annotations

import gzip
import zlib
from datetime import timedelta
from decimal import Decimal

import cramjam
import httpx
import orjson
import pytest
import zstandard

from tests.gatewayproc import GatewayProcess
from tests.helpers import next_id, now_iso, record, total


def test_ten_tenths_count_once_and_sum_to_exactly_one(client: httpx.Client, customer: str) -> None:
    batch = [record(customer, "0.1") for _ in range(10)]
    r = client.post("/v1/usage", json=batch)
    assert r.json() == {"accepted": 10, "duplicates": 0, "rejected": 0, "errors": []}
    r = client.post("/v1/usage", json=batch)
    assert r.json() == {"accepted": 0, "duplicates": 10, "rejected": 0, "errors": []}
    assert total(client, customer) == Decimal(1)
    assert str(total(client, customer)) == "1"


def test_paigo_path_single_record_with_metadata(client: httpx.Client, customer: str) -> None:
    rec = record(customer, 0.8, metadata={"job": "etl", "region": "us-east-1"})
    r = client.post("/usage", json=rec)
    assert r.status_code == 200
    assert r.json()["accepted"] == 1
    raw = client.get("/v1/usage", params={"customerId": customer, "window": "raw"}).json()
    assert raw["data"][0]["recordValue"] == "0.8"
    assert raw["data"][0]["metadata"] == {"job": "etl", "region": "us-east-1"}
    assert raw["data"][0]["id"] == rec["id"]


def test_ndjson_as_vector_frames_it_no_trailing_newline(
    client: httpx.Client, customer: str
) -> None:
    lines = [orjson.dumps(record(customer, "2.5")) for _ in range(3)]
    body = b"\n".join(lines)
    r = client.post("/v1/usage", content=body, headers={"Content-Type": "application/x-ndjson"})
    assert r.json()["accepted"] == 3
    assert total(client, customer) == Decimal("7.5")


def test_text_codec_and_missing_content_type_are_sniffed(
    client: httpx.Client, customer: str
) -> None:
    body = b"\n".join(orjson.dumps(record(customer, "1")) for _ in range(2)) + b"\n"
    r = client.post("/v1/usage", content=body, headers={"Content-Type": "text/plain"})
    assert r.json()["accepted"] == 2
    r = client.post(
        "/v1/usage", content=orjson.dumps([record(customer, "1")]), headers={"Content-Type": ""}
    )
    assert r.json()["accepted"] == 1
    assert total(client, customer) == Decimal(3)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "zstd", "snappy"])
def test_compressed_bodies(client: httpx.Client, customer: str, encoding: str) -> None:
    raw = orjson.dumps([record(customer, "0.25") for _ in range(4)])
    body = {
        "gzip": gzip.compress,
        "deflate": zlib.compress,
        "zstd": zstandard.ZstdCompressor().compress,
        "snappy": lambda b: bytes(cramjam.snappy.compress_raw(b)),
    }[encoding](raw)
    r = client.post(
        "/v1/usage",
        content=body,
        headers={"Content-Type": "application/json", "Content-Encoding": encoding},
    )
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 4
    assert total(client, customer) == Decimal(1)


def test_vector_log_envelope_and_logstash_timestamp(client: httpx.Client, customer: str) -> None:
    vector = {
        **record(customer, "1.5"),
        "host": "web-1",
        "message": "GET /api",
        "source_type": "http_server",
    }
    logstash = record(customer, "2")
    logstash["@timestamp"] = logstash.pop("timestamp")
    logstash.update({"@version": "1", "host": {"hostname": "web-1"}})
    r = client.post("/v1/usage", json=[vector, logstash])
    assert r.json()["accepted"] == 2, r.text
    assert total(client, customer) == Decimal("3.5")


def test_aliases_resolve_to_the_customer(client: httpx.Client, customer: str) -> None:
    r = client.post("/v1/usage", json=[record(f"{customer}-alias", "4")])
    assert r.json()["accepted"] == 1
    assert total(client, customer) == Decimal(4)


def test_partial_acceptance_keeps_good_records_and_rejects_bad_ones(
    client: httpx.Client, customer: str
) -> None:
    batch = [
        record(customer, "1"),
        record("nobody-at-all", "1"),
        record(customer, "NaN"),
        record(customer, "1e999999"),
        record(customer, "-3"),
        {**record(customer, "1"), "timestamp": now_iso(-timedelta(days=40))},
        {**record(customer, "1"), "timestamp": now_iso(timedelta(hours=1))},
        {**record(customer, "1"), "dimensionId": "no-such-dimension"},
        {**record(customer, "1"), "timestamp": "yesterday"},
        "not an object",
        record(customer, "0.0000000000000000001"),
        record(customer, "2"),
    ]
    r = client.post("/v1/usage", json=batch)
    assert r.status_code == 200
    body = r.json()
    assert (body["accepted"], body["rejected"]) == (2, 10)
    by_index = {e["index"]: e for e in body["errors"]}
    assert by_index[1]["reason"] == "unknown_customer"
    assert by_index[1]["field"] == "customerId"
    assert "nobody-at-all" in by_index[1]["error"]
    assert by_index[2]["reason"] == "invalid_value"
    assert by_index[3]["reason"] == "invalid_value"
    assert by_index[4]["reason"] == "negative_value"
    assert by_index[5]["reason"] == "too_late"
    assert by_index[6]["reason"] == "in_future"
    assert by_index[7]["reason"] == "unknown_dimension"
    assert by_index[8]["reason"] == "invalid_timestamp"
    assert by_index[9]["reason"] == "malformed"
    assert "18 decimal places" in by_index[10]["error"]
    assert total(client, customer) == Decimal(3)
    rejected = client.get("/v1/rejected", params={"reason": "unknown_customer"}).json()["data"]
    assert any("nobody-at-all" in (row["record"] or "") for row in rejected)


def test_atomic_batch_is_all_or_nothing(client: httpx.Client, customer: str) -> None:
    batch = [record(customer, "1"), record(customer, "oops")]
    r = client.post("/v1/usage", params={"atomic": "true"}, json=batch)
    assert r.status_code == 422
    assert r.json()["errors"][0]["index"] == 1
    assert total(client, customer) == Decimal(0)
    r = client.post("/v1/usage", params={"atomic": "true"}, json=batch[:1])
    assert r.json()["accepted"] == 1


def test_a_lone_invalid_record_is_a_422_and_kept(client: httpx.Client) -> None:
    r = client.post("/v1/usage", json=record("ghost-customer", "1"))
    assert r.status_code == 422
    assert r.json()["errors"][0]["reason"] == "unknown_customer"


def test_exact_decimals_beyond_double_precision(client: httpx.Client, customer: str) -> None:
    # 17 significant digits as a JSON number: a double would turn this into 0.1
    body = (
        b'[{"id":"exact-%s","timestamp":"%s","customerId":"%s",'
        b'"dimensionId":"data-processed","recordValue":0.10000000000000001}]'
        % (str(next_id()).encode(), now_iso().encode(), customer.encode())
    )
    r = client.post("/v1/usage", content=body, headers={"Content-Type": "application/json"})
    assert r.json()["accepted"] == 1
    assert total(client, customer) == Decimal("0.10000000000000001")


def test_body_over_the_limit_is_413(gateway: GatewayProcess, client: httpx.Client) -> None:
    r = client.post(
        "/v1/usage",
        content=b"[" + b" " * (11 * 1024 * 1024) + b"]",
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 413
    assert "limit" in r.json()["error"]


def test_decompression_bomb_is_413(client: httpx.Client) -> None:
    bomb = gzip.compress(b"[" + b" " * (200 * 1024 * 1024) + b"]")
    assert len(bomb) < 1024 * 1024
    r = client.post(
        "/v1/usage",
        content=bomb,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert r.status_code == 413


def test_batch_over_the_record_limit_is_413(client: httpx.Client) -> None:
    body = b"[" + b",".join([b"{}"] * 100_001) + b"]"
    r = client.post("/v1/usage", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert "100000" in r.json()["error"]


@pytest.mark.parametrize(
    ("body", "headers", "status", "needle"),
    [
        (b'[{"a": 1}', {}, 400, "not valid JSON"),
        (b'{"customerId": ', {}, 400, "not valid JSON"),
        (b"\xff\xfe\x00garbage", {}, 400, "JSON"),
        # Nested 100,000 deep and one bracket short: not JSON at all. (A well-formed array
        # whose one element is too deep fails only that element: tests/reliability.)
        pytest.param(b"[" * 100_000 + b"]" * 99_999, {}, 400, "JSON", id="deep-unbalanced"),
        (b"42", {}, 400, "expected a JSON object"),
        (gzip.compress(b"[{}]")[:-6], {"Content-Encoding": "gzip"}, 400, "truncated"),
        (b"not gzip at all", {"Content-Encoding": "gzip"}, 400, "gzip"),
        (b"\x00\x01\x02", {"Content-Encoding": "snappy"}, 400, "snappy"),
        (b"\x28\xb5\x2f\xfd garbage", {"Content-Encoding": "zstd"}, 400, "zstd"),
        (b"[]", {"Content-Encoding": "br"}, 415, "Content-Encoding"),
    ],
)
def test_malformed_truncated_and_hostile_bodies(
    client: httpx.Client, body: bytes, headers: dict[str, str], status: int, needle: str
) -> None:
    r = client.post(
        "/v1/usage", content=body, headers={"Content-Type": "application/json", **headers}
    )
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_bad_ndjson_lines_fail_alone(client: httpx.Client, customer: str) -> None:
    body = b"\n".join(
        [
            orjson.dumps(record(customer, "1")),
            b"{broken",
            b"[1,2]",
            orjson.dumps(record(customer, "1")),
        ]
    )
    r = client.post("/v1/usage", content=body, headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 200
    assert (r.json()["accepted"], r.json()["rejected"]) == (2, 2)
    assert [e["index"] for e in r.json()["errors"]] == [1, 2]


def test_hostile_fields_are_rejected_not_crashed_on(client: httpx.Client, customer: str) -> None:
    batch = [
        {**record(customer, "1"), "id": "x" * 10_000},
        {**record(customer, "1"), "metadata": {"k": "v" * 100_000}},
        {**record(customer, "1"), "metadata": "not-an-object"},
        {**record(customer, "1"), "customerId": {"$ne": None}},
        {**record(customer, "1"), "recordValue": True},
        {**record(customer, "1"), "recordValue": [1]},
        {**record(customer, "1"), "timestamp": 1714564800},
        {**record(customer, "1"), "timestamp": "9999-99-99T99:99:99Z"},
        {**record(customer, "1"), "recordValue": "1" * 5000},
        {**record(customer, "1"), "customerId": "'; DROP TABLE records; --"},
    ]
    r = client.post("/v1/usage", json=batch)
    assert r.status_code == 200
    assert r.json()["rejected"] == len(batch)
    assert all(e["error"] for e in r.json()["errors"])


def test_vector_healthcheck_head_is_200(client: httpx.Client) -> None:
    assert client.head("/v1/usage").status_code == 200


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong-key-000000000000"}, 401),
        ({"Authorization": "Bearer test-read-key-0123456789"}, 403),
        ({"Authorization": "Basic !!!notbase64"}, 401),
    ],
)
def test_ingest_auth(gateway: GatewayProcess, headers: dict[str, str], status: int) -> None:
    r = httpx.post(f"{gateway.url}/v1/usage", json=[], headers=headers)
    assert r.status_code == status
    assert r.json()["error"]


def test_basic_auth_with_the_key_as_password_as_logstash_sends_it(
    gateway: GatewayProcess, customer: str
) -> None:
    r = httpx.post(
        f"{gateway.url}/v1/usage",
        json=[record(customer, "1")],
        auth=("logstash", "test-ingest-key-0123456789"),
    )
    assert r.status_code == 200
    assert r.json()["accepted"] == 1


def test_a_one_line_ndjson_batch_with_a_bad_record_is_still_2xx(client: httpx.Client) -> None:
    # Vector drops a batch on any 4xx: a batch of one is still a batch.
    body = orjson.dumps(record("ghost-customer", "1"))
    r = client.post("/v1/usage", content=body, headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 200
    assert r.json()["rejected"] == 1


def test_hostile_metadata_is_rejected_alone_and_exact_numbers_survive(
    client: httpx.Client, customer: str
) -> None:
    """Metadata a JSON encoder cannot write back (lone surrogate escapes, integers past 64
    bits) is refused per record with a clear error, and never fails the commit of the other
    records in the group; long-precision numbers in metadata are kept exactly."""
    good = record(customer, "1", metadata={"price": "x"})
    precise = record(customer, "2")
    lone = record(customer, "4")
    huge = record(customer, "8")
    body = (
        orjson.dumps([good, precise, lone, huge])
        .replace(b'"price":"x"', b'"price":0.100000000000000000000000000001')
        .replace(
            f'"id":"{lone["id"]}"'.encode(),
            f'"id":"{lone["id"]}","metadata":{{"n":"\\ud800"}}'.encode(),
        )
        .replace(
            f'"id":"{huge["id"]}"'.encode(),
            f'"id":"{huge["id"]}","metadata":{{"n":123456789012345678901234567890}}'.encode(),
        )
    )
    r = client.post("/v1/usage", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["accepted"], out["rejected"]) == (3, 1), out
    (error,) = out["errors"]
    assert error["index"] == 2
    assert error["field"] == "metadata"
    assert "surrogate" in error["error"]
    assert total(client, customer) == Decimal(11)
    raw = client.get("/v1/usage", params={"customerId": customer, "window": "raw"}).json()
    metas = {d["id"]: d.get("metadata") for d in raw["data"]}
    assert metas[good["id"]] == {"price": "0.100000000000000000000000000001"}
    assert metas[huge["id"]] == {"n": "123456789012345678901234567890"}


@pytest.mark.parametrize("field", ["customerId", "dimensionId", "id", "timestamp"])
def test_lone_surrogates_in_any_field_get_a_clear_error(
    client: httpx.Client, customer: str, field: str
) -> None:
    bad = record(customer, "1")
    bad[field] = "x-SURROGATE"
    body = orjson.dumps([record(customer, "2"), bad]).replace(b"x-SURROGATE", b"x\\udc00")
    r = client.post("/v1/usage", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["accepted"], out["rejected"]) == (1, 1), out
    assert out["errors"][0]["field"] == field
    assert total(client, customer) == Decimal(2)
    kept = client.get("/v1/rejected").json()["data"]
    assert any("udc00" in (k.get("record") or "") for k in kept)
