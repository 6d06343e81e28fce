"""Remote write 1.0 receiver: exact bodies against a real gateway process, hostile input
(bad snappy, bad or truncated protobuf, huge label sets, NaN/Inf, stale markers, oversized
bodies), and a real Prometheus remote-writing what it scrapes from a real app."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import cramjam
import httpx
import pytest

from receivers import prompb
from tests.gatewayproc import BASE_CONFIG, INGEST_KEY, GatewayProcess, free_port
from tests.helpers import total
from tests.promapp import PromApp
from tests.promserver import PrometheusServer

STALE = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000002))[0]
HEADERS = {
    "Content-Type": "application/x-protobuf",
    "Content-Encoding": "snappy",
    "X-Prometheus-Remote-Write-Version": "0.1.0",
    "User-Agent": "Prometheus/2.42.0",
    "Authorization": f"Bearer {INGEST_KEY}",
}
Series = tuple[dict[str, str], list[tuple[float, int]]]


def _config() -> dict[str, Any]:
    cfg = dict(BASE_CONFIG)
    cfg["dimensions"] = [
        *BASE_CONFIG["dimensions"],
        {"id": "storage-level", "name": "Storage", "aggregation": "time_weighted_avg"},
    ]
    cfg["rules"] = [
        {
            "match": {"source": "remote_write", "metric": "app_bytes_processed_total"},
            "dimension": "data-processed",
            "customer_attribute": "tenant",
        },
        {
            "match": {"source": "remote_write", "metric": "app_storage_bytes"},
            "dimension": "storage-level",
            "customer_attribute": "tenant",
            "scale": "1e-9",
        },
    ]
    cfg["ingest"] = {"max_body_bytes": 1_000_000, "max_decompressed_bytes": 4_000_000}
    return cfg


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    g = GatewayProcess(Path(tmp_path_factory.mktemp("rw")), _config()).start()
    yield g
    g.stop()


def write_request(series: list[Series], metadata: list[tuple[str, int]] = ()) -> bytes:  # type: ignore[assignment]
    req = prompb.WriteRequest()
    for labels, samples in series:
        ts = req.timeseries.add()
        for k, v in labels.items():
            ts.labels.add(name=k, value=v)
        for value, t_ms in samples:
            ts.samples.add(value=value, timestamp=t_ms)
    for name, kind in metadata:
        req.metadata.add(type=kind, metric_family_name=name)
    return bytes(req.SerializeToString())


def snappy(raw: bytes) -> bytes:
    return bytes(cramjam.snappy.compress_raw(raw))


def post(gw: GatewayProcess, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{gw.url}/api/v1/write", content=body, headers={**HEADERS, **headers}, timeout=30
    )


def now_ms() -> int:
    return int(time.time() * 1000)


def _customer(gw: GatewayProcess, cid: str) -> str:
    with gw.client() as c:
        r = c.post("/v1/customers", json={"id": cid, "name": cid, "offering": "pay-as-you-go"})
        assert r.status_code == 201, r.text
    return cid


def test_healthcheck_get_answers_200(gw: GatewayProcess) -> None:
    assert httpx.get(f"{gw.url}/api/v1/write", timeout=10).status_code == 200


def test_counters_become_exact_increases_once(gw: GatewayProcess) -> None:
    cust = _customer(gw, "rw-counter")
    t = now_ms() - 60_000
    name = {"__name__": "app_bytes_processed_total", "tenant": cust, "job": "app"}
    first = snappy(write_request([(name, [(1000.0, t), (1010.5, t + 1000)])]))
    assert post(gw, first).status_code == 204
    again = post(gw, first)  # a retried request adds nothing
    assert again.status_code == 204
    # A reset (app restart): 3 is counted whole; out-of-order and repeated points add nothing.
    later = snappy(write_request([(name, [(1020.5, t + 2000), (3.0, t + 3000), (5.0, t + 4000)])]))
    assert post(gw, later).status_code == 204
    assert post(gw, later).status_code == 204
    with gw.client() as c:
        assert total(c, cust) == Decimal("25.5")  # 10.5 + 10 + 3 + 2


def test_metadata_says_counter_without_a_suffix(gw: GatewayProcess) -> None:
    cust = _customer(gw, "rw-meta")
    t = now_ms() - 60_000
    s = {"__name__": "app_bytes_processed_total", "tenant": cust}
    body = write_request([(s, [(1.0, t), (4.0, t + 1000)])], [("app_bytes_processed", 1)])
    assert post(gw, snappy(body)).status_code == 204
    with gw.client() as c:
        assert total(c, cust) == Decimal(3)


def test_gauges_are_levels_and_a_stale_marker_ends_them(gw: GatewayProcess) -> None:
    cust = _customer(gw, "rw-gauge")
    t = now_ms() - 60_000
    s = {"__name__": "app_storage_bytes", "tenant": cust}
    body = write_request([(s, [(5e9, t), (7e9, t + 1000), (STALE, t + 2000)])])
    assert post(gw, snappy(body)).status_code == 204
    with gw.client() as c:
        r = c.get(
            "/v1/usage",
            params={
                "customerId": cust,
                "dimensionId": "storage-level",
                "window": "raw",
                "from": "2020-01-01T00:00:00Z",
                "to": "2100-01-01T00:00:00Z",
            },
        )
        assert r.status_code == 200, r.text
        assert [d["recordValue"] for d in r.json()["data"]] == ["5", "7", "0"]


def test_nan_is_skipped_and_unmapped_series_are_ignored(gw: GatewayProcess) -> None:
    t = now_ms() - 60_000
    body = write_request(
        [
            ({"__name__": "up", "job": "app"}, [(1.0, t)]),  # no rule: skipped, not rejected
            ({"__name__": "app_storage_bytes", "tenant": "acme"}, [(float("nan"), t)]),
        ]
    )
    assert post(gw, snappy(body)).status_code == 204
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    assert 'meter_gateway_remote_write_samples_skipped_total{reason="unmapped"}' in text
    assert 'meter_gateway_remote_write_samples_skipped_total{reason="nan"}' in text


@pytest.mark.parametrize(
    "content_type",
    [
        "application/x-protobuf;proto=io.prometheus.write.v2.Request",
        "application/json",
        "text/plain",
    ],
)
def test_other_content_types_are_415(gw: GatewayProcess, content_type: str) -> None:
    body = snappy(write_request([]))
    assert post(gw, body, **{"Content-Type": content_type}).status_code == 415


def test_other_encodings_are_415_and_v1_proto_parameter_is_fine(gw: GatewayProcess) -> None:
    body = snappy(write_request([]))
    assert post(gw, body, **{"Content-Encoding": "gzip"}).status_code == 415
    ct = "application/x-protobuf;proto=prometheus.WriteRequest"
    assert post(gw, body, **{"Content-Type": ct}).status_code == 204


def test_without_a_key_401(gw: GatewayProcess) -> None:
    r = httpx.post(
        f"{gw.url}/api/v1/write",
        content=snappy(write_request([])),
        headers={k: v for k, v in HEADERS.items() if k != "Authorization"},
    )
    assert r.status_code == 401


_VALID = write_request(
    [({"__name__": "app_bytes_processed_total", "tenant": "acme"}, [(1.0, 1_700_000_000_000)])]
)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"not snappy at all \xff\xfe", 400),  # bad snappy
        (snappy(_VALID)[:-3], 400),  # truncated snappy
        (snappy(b"\x0a\xff\xff\xff\xff\x0f garbage"), 400),  # bad protobuf
        (snappy(_VALID[:-2]), 400),  # truncated protobuf
        (snappy(b"\x0b\x00"), 400),  # a group start: invalid wire type here
        (b"\xff\xff\xff\xff\x07" + b"\x00" * 16, 413),  # claims 2 GB decompressed
        (b"\x00" * 1_000_001, 413),  # over max_body_bytes
    ],
)
def test_hostile_bodies(gw: GatewayProcess, body: bytes, status: int) -> None:
    r = post(gw, body)
    assert r.status_code == status, r.text


def test_invalid_samples_400_but_valid_ones_stored(gw: GatewayProcess) -> None:
    cust = _customer(gw, "rw-mixed")
    t = now_ms() - 60_000
    good = {"__name__": "app_bytes_processed_total", "tenant": cust}
    huge = {"__name__": "app_bytes_processed_total", "tenant": cust}
    huge.update({f"l{i}": "x" for i in range(200)})
    body = write_request(
        [
            (good, [(10.0, t), (12.0, t + 1000), (float("inf"), t + 2000)]),
            (huge, [(1.0, t)]),
            ({"__name__": "app_bytes_processed_total", "tenant": "x" * 5000}, [(1.0, t)]),
            ({"tenant": cust}, [(1.0, t)]),  # no __name__
            ({"__name__": "app_storage_bytes", "tenant": "nobody-known"}, [(1.0, t)]),
            ({"__name__": "app_storage_bytes", "tenant": cust}, [(float("-inf"), t)]),
        ]
    )
    r = post(gw, snappy(body))
    assert r.status_code == 400, r.text
    assert "6 invalid samples" in r.text, r.text
    with gw.client() as c:
        assert total(c, cust) == Decimal(2)
        reasons = [x["reason"] for x in c.get("/v1/rejected").json()["data"]]
    assert {"too_large", "missing_field", "invalid_value", "unknown_customer"} <= set(reasons)


def test_many_series_in_one_request(gw: GatewayProcess) -> None:
    cust = _customer(gw, "rw-many")
    t = now_ms() - 60_000
    series = [
        ({"__name__": "app_bytes_processed_total", "tenant": cust, "pod": f"p{i}"}, [(0.0, t)])
        for i in range(2000)
    ]
    assert post(gw, snappy(write_request(series))).status_code == 204
    series = [(labels, [(1.5, t + 1000)]) for labels, _ in series]
    assert post(gw, snappy(write_request(series))).status_code == 204
    with gw.client() as c:
        assert total(c, cust) == Decimal(3000)


def test_errors_are_json_with_the_refused_samples(gw: GatewayProcess) -> None:
    cust = _customer(gw, "rw-json")
    t = now_ms() - 60_000
    good = {"__name__": "app_bytes_processed_total", "tenant": cust}
    body = write_request([(good, [(1.0, t), (float("inf"), t + 1000), (3.0, t + 2000)])])
    r = post(gw, snappy(body))
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["error"] == "1 invalid samples (the valid ones were stored)"
    assert doc["rejected"] == 1
    (line,) = doc["errors"]
    assert line.startswith("sample 1: value: ")
    assert line.endswith("(invalid_value)")
    with gw.client() as c:
        assert total(c, cust) == Decimal(2)
    for bad, status in [
        (b"not snappy at all \xff\xfe", 400),
        (b"\x00" * 1_000_001, 413),
    ]:
        r = post(gw, bad)
        assert (r.status_code, r.headers["content-type"]) == (status, "application/json")
        assert r.json()["error"]
    r = post(gw, snappy(write_request([])), **{"Content-Type": "application/json"})
    assert r.status_code == 415
    assert "unsupported Content-Type" in r.json()["error"]


@pytest.mark.parametrize(
    ("offset_ms", "reason"), [(3_600_000, "in_future"), (-36 * 86_400_000, "too_late")]
)
def test_a_counter_sample_out_of_the_time_window_is_refused_and_does_not_become_the_baseline(
    gw: GatewayProcess, offset_ms: int, reason: str
) -> None:
    cust = _customer(gw, f"rw-window-{reason}")
    t = now_ms()
    s = {"__name__": "app_bytes_processed_total", "tenant": cust}
    r = post(gw, snappy(write_request([(s, [(1000.0, t + offset_ms)])])))
    assert r.status_code == 400, r.text
    (line,) = r.json()["errors"]
    assert line.startswith("sample 0: timestamp: ")
    assert line.endswith(f"({reason})")
    # Later samples count: the refused one did not become the series' state.
    r = post(gw, snappy(write_request([(s, [(10.0, t - 2000), (14.5, t - 1000)])])))
    assert r.status_code == 204, r.text
    with gw.client() as c:
        assert total(c, cust) == Decimal("4.5")
        rejected = c.get("/v1/rejected", params={"reason": reason}).json()["data"]
    assert any(cust in (x["record"] or "") for x in rejected)


def test_a_known_series_follows_a_catalog_change(gw: GatewayProcess) -> None:
    """A series whose mapping is cached (its customer through an alias) maps again once the
    alias moves to another customer: the cache holds per catalog snapshot."""
    first, second = "rw-alias-a", "rw-alias-b"
    with gw.client() as c:
        body = {"id": first, "name": "A", "offering": "pay-as-you-go", "aliases": ["rw-shared"]}
        assert c.post("/v1/customers", json=body).status_code == 201
    _customer(gw, second)
    t = now_ms() - 60_000
    s = {"__name__": "app_bytes_processed_total", "tenant": "rw-shared", "pod": "p"}
    # baseline, then a step the validator maps (and the receiver learns), then a known one
    for k, v in enumerate((100.0, 105.0, 106.0)):
        assert post(gw, snappy(write_request([(s, [(v, t + k * 1000)])]))).status_code == 204
    with gw.client() as c:
        assert total(c, first) == Decimal(6)
        no_alias = {"name": "A", "offering": "pay-as-you-go", "aliases": []}
        assert c.put(f"/v1/customers/{first}", json=no_alias).status_code == 200
        moved = {"name": "B", "offering": "pay-as-you-go", "aliases": ["rw-shared"]}
        assert c.put(f"/v1/customers/{second}", json=moved).status_code == 200
    assert post(gw, snappy(write_request([(s, [(108.0, t + 3000)])]))).status_code == 204
    with gw.client() as c:
        assert total(c, first) == Decimal(6)
        assert total(c, second) == Decimal(2)


# --- reading the wire without messages (prompb.scan) ------------------------------------------


def _as_messages(raw: bytes) -> list[tuple[bytes, list[tuple[float, int]]]]:
    req = prompb.WriteRequest.FromString(raw)
    out = []
    for ts in req.timeseries:
        labels = b"".join(prompb.TimeSeries(labels=[lb]).SerializeToString() for lb in ts.labels)
        out.append((labels, [(s.value, s.timestamp) for s in ts.samples]))
    return out


_SCAN_CASES = [
    [({"__name__": "a_total", "t": "x"}, [(1.5, 1_700_000_000_000)])],
    [({"__name__": "a_total", "t": "x"}, [(0.0, 1_700_000_000_000)])],  # value 0: not on the wire
    [({"__name__": "a_total"}, [(2.0, 0)])],  # timestamp 0: not on the wire
    [({"__name__": "a_total"}, [(2.0, -5)])],  # a negative timestamp: ten varint bytes
    [({"__name__": "a_total"}, [(2.0, 2**63 - 1)])],
    [({"__name__": "a", "v": "\x10\x12" * 40}, [(3.0, 17), (4.0, 18)])],  # tag bytes in labels
    [({"__name__": "b", "k": "é" * 100}, [(5.0, 1_700_000_000_001)])],
    [({"__name__": "c", "t": str(i)}, [(float(i), 1_700_000_000_000 + i)]) for i in range(300)],
    [({"__name__": "d"}, [])],
]


@pytest.mark.parametrize("series", _SCAN_CASES)
def test_scan_reads_what_the_messages_hold_with_and_without_known_labels(
    series: list[Series],
) -> None:
    raw = write_request(series)
    want = _as_messages(raw)
    n = sum(len(samples) for _, samples in want)
    for known in (set(), {labels for labels, _ in want}):  # known: read from its end
        scan = prompb.scan(raw, known)
        assert scan is not None
        scanned, samples = scan
        assert [(s[0], prompb.samples_of(s)) for s in scanned] == want
        assert samples == n
        # a series of one sample is one tuple, without a list
        assert [s[3] is None for s in scanned] == [len(m) == 1 for _, m in want]


@pytest.mark.parametrize(
    "raw",
    [
        write_request([({"__name__": "a"}, [(1.0, 5)])], [("a", 1)]),  # metadata
        b"\x0a\x05\x0a\x03\x0a\x01",  # truncated
        b"\x1a\x00",  # another field first
        b"\x0a\x02\x2a\x00",  # a field of TimeSeries it does not read
    ],
)
def test_scan_leaves_anything_unusual_to_the_messages(raw: bytes) -> None:
    assert prompb.scan(raw) is None


# --- a real Prometheus remote-writing to the gateway -------------------------------------------


def test_real_prometheus_remote_write_gives_the_exact_increase(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path, _config()).start()
    app = PromApp(free_port()).start()
    remote = {
        "url": f"{gw.url}/api/v1/write",
        "authorization": {"credentials": INGEST_KEY},
        "queue_config": {"batch_send_deadline": "1s", "min_backoff": "100ms"},
        "metadata_config": {"send_interval": "1s"},
    }
    try:
        app.inc("acme", 5)
        with PrometheusServer(
            scrape_targets=[app.target], scrape_interval="1s", remote_write=[remote]
        ) as prom:
            prom.wait_for_targets()
            sel = 'app_bytes_processed_total{tenant="acme"}'
            for amount, running in ((100, "105"), (0.5, "105.5"), (20, "125.5")):
                app.inc("acme", amount)  # each step scraped before the next is made
                prom.wait_for(partial(prom.query, f"{sel} == {running}"), what=f"{running} scraped")
            app.set("acme", 3e9)
            (series,) = prom.query(f"{sel}[10m]")
            first = Decimal(series["values"][0][1])  # the baseline the gateway also saw first
            with gw.client() as c:
                prom.wait_for(
                    lambda: total(c, "acme") == Decimal("125.5") - first,
                    what=f"usage {Decimal('125.5') - first} ({total(c, 'acme')})",
                )
                assert total(c, "acme") == Decimal("125.5") - first
        text = httpx.get(f"{gw.url}/metrics", timeout=10).text
        assert 'meter_gateway_requests_total{code="204",receiver="remote_write"}' in text
    finally:
        app.stop()
        gw.stop()
