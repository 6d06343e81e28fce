"""OTLP decoding and cumulative→delta conversion (receivers/otlp.py), in process.

Golden files: each ``tests/testdata/otlp/exports/<case>.json`` holds OTLP/JSON requests that
are exported in order through a real in-process gateway (SQLite store, ingestor, validator)
with a fixed clock; ``<case>.expected.yaml`` is what was committed (records, rejected points)
and what each export answered. Regenerate with ``REGEN_GOLDEN=1 pytest tests/receivers`` and
review the diff.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import weakref
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from meter_gateway.clock import FixedClock
from meter_gateway.config import parse_config
from meter_gateway.decimals import fmt
from meter_gateway.model import Batch, Source, dedup_key
from meter_gateway.pipeline.cumulative import decode_group, encode_state, entry_state
from meter_gateway.pipeline.timestamps import format_timestamp
from meter_gateway.service import Gateway
from receivers.otlp import (
    EXPIRY_INTERVAL_NS,
    EXPIRY_MARGIN_NS,
    OtlpError,
    decode_json,
    decode_protobuf,
    natural_dedup_key,
)
from tests.exporters.otlp_app import TESTDATA, gateway_config
from tests.pgdb import store_url

EXPORTS = TESTDATA / "exports"
CASES = sorted(p.stem for p in EXPORTS.glob("*.json"))
NOW = 1777637400000000000  # 2026-05-01T12:10:00Z; the golden points are stamped 12:00-12:05
T0 = 1777636800000000000
MIN = 60 * 10**9
REGEN = os.environ.get("REGEN_GOLDEN") == "1"


# --- building requests (also used by the gRPC and HTTP tests) -------------------------------


def attrs(**kv: Any) -> list[dict[str, Any]]:
    return [{"key": k, "value": {"stringValue": str(v)}} for k, v in kv.items()]


def point(
    value: int | float, time_ns: int, start_ns: int | None = None, **kv: Any
) -> dict[str, Any]:
    p: dict[str, Any] = {"timeUnixNano": str(time_ns), "attributes": attrs(**kv)}
    if start_ns is not None:
        p["startTimeUnixNano"] = str(start_ns)
    if isinstance(value, int):
        p["asInt"] = str(value)
    else:
        p["asDouble"] = value
    return p


def sum_metric(
    points: list[dict[str, Any]],
    name: str = "app.data.processed",
    temporality: int = 1,
    monotonic: bool = True,
) -> dict[str, Any]:
    return {
        "name": name,
        "sum": {
            "aggregationTemporality": temporality,
            "isMonotonic": monotonic,
            "dataPoints": points,
        },
    }


def request_json(*metrics: dict[str, Any], service: str = "test") -> dict[str, Any]:
    return {
        "resourceMetrics": [
            {
                "resource": {"attributes": attrs(**{"service.name": service})},
                "scopeMetrics": [{"scope": {"name": "test"}, "metrics": list(metrics)}],
            }
        ]
    }


def request(*metrics: dict[str, Any], service: str = "test") -> Any:
    return json_format.ParseDict(
        request_json(*metrics, service=service), ExportMetricsServiceRequest()
    )


# --- an in-process gateway -------------------------------------------------------------------


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[Gateway]:
    yield from _gateway(tmp_path)


def _gateway(tmp_path: Path) -> Iterator[Gateway]:
    config = gateway_config(store={"url": store_url(tmp_path, "g.db")})
    g = Gateway(parse_config(yaml.safe_dump(config)), clock=FixedClock(NOW))
    try:
        yield g
    finally:
        g.close()


def committed(g: Gateway) -> dict[str, Any]:
    records = g.store.records(None, None, 0, 2**62, None, 10_000)
    rejected = g.store.rejected(None, 10_000, None)
    return {
        "records": sorted(
            (
                {
                    "time": format_timestamp(r.timestamp_ns),
                    "customer": r.customer_id,
                    "dimension": r.dimension_id,
                    "value": fmt(r.value),
                    "metric": (r.metadata or {}).get("metric"),
                }
                for r in records
            ),
            key=lambda r: (r["time"], r["customer"], r["dimension"], r["metric"], r["value"]),
        ),
        "rejected": [
            {"reason": r.reason, "field": r.field, "error": r.error[:200]} for r in rejected
        ],
        "totals": _totals(records),
    }


def _totals(records: Any) -> dict[str, str]:
    out: dict[str, Decimal] = {}
    for r in records:
        key = f"{r.customer_id}/{r.dimension_id}"
        out[key] = out.get(key, Decimal(0)) + r.value
    return {k: fmt(v) for k, v in sorted(out.items())}


# --- golden exports --------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_golden_exports(tmp_path: Path, case: str) -> None:
    doc = json.loads((EXPORTS / f"{case}.json").read_text())
    for g in _gateway(tmp_path):
        answers = []
        for body in doc["requests"]:
            outcome = g.otlp.export(decode_json(json.dumps(body).encode()))
            answers.append(
                {
                    "points": outcome.points,
                    "accepted": outcome.accepted,
                    "duplicates": outcome.duplicates,
                    "rejected": outcome.rejected,
                    "error_message": outcome.error_message[:300],
                }
            )
        got = {"about": doc["about"], "answers": answers, **committed(g)}
    expected_path = EXPORTS / f"{case}.expected.yaml"
    if REGEN or not expected_path.exists():
        expected_path.write_text(
            yaml.safe_dump(got, sort_keys=False, width=100, allow_unicode=True)
        )
        if not REGEN:
            pytest.fail(f"wrote {expected_path.name}; review it and run again")
    assert got == yaml.safe_load(expected_path.read_text())


# --- decoding --------------------------------------------------------------------------------


def test_json_accepts_numbers_or_strings_hex_ids_and_unknown_fields() -> None:
    body = request_json(
        sum_metric(
            [
                {
                    "timeUnixNano": T0 + MIN,  # a number, not a string
                    "startTimeUnixNano": str(T0),
                    "asInt": 42,
                    "attributes": attrs(tenant="acme"),
                    "exemplars": [
                        {
                            "timeUnixNano": str(T0),
                            "asInt": "1",
                            "traceId": "5b8efff798038103d269b633813fc60c",
                            "spanId": "eee19b7ec3c1b174",
                        }
                    ],
                    "someFutureField": {"x": 1},
                }
            ]
        )
    )
    body["futureTopLevel"] = True
    req = decode_json(json.dumps(body).encode())
    p = req.resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points[0]
    assert (p.time_unix_nano, p.as_int) == (T0 + MIN, 42)
    assert p.exemplars[0].trace_id.hex() == "5b8efff798038103d269b633813fc60c"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"resourceMetrics": 7}', "not a valid OTLP/JSON"),
        (
            b'{"resourceMetrics": [{"scopeMetrics": [{"metrics": [{"sum": {"dataPoints": '
            b'[{"asInt": "x"}]}}]}]}]}',
            "not a valid OTLP/JSON",
        ),
    ],
)
def test_json_errors_say_what_is_wrong(body: bytes, message: str) -> None:
    with pytest.raises(OtlpError, match=message) as exc:
        decode_json(body)
    assert exc.value.status == 400


def test_empty_bodies_are_empty_requests() -> None:
    assert len(decode_json(b"").resource_metrics) == 0
    assert len(decode_protobuf(b"").resource_metrics) == 0


@pytest.mark.parametrize("body", [b"\xff\xff\xff\xff", b"\x0a\xff\x01abc", b"\x0a" * 3000])
def test_malformed_protobuf_is_a_clear_error(body: bytes) -> None:
    with pytest.raises(OtlpError, match="not a valid OTLP ExportMetricsServiceRequest"):
        decode_protobuf(body)


# --- the receiver ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["0123abcd:1:2", "f" * 32 + ":0:1777636860000000000", ""])
def test_fast_path_dedup_keys_are_the_validators(key: str) -> None:
    assert natural_dedup_key(key) == dedup_key("otlp", key)


def test_a_series_is_the_same_with_or_without_exemplars_and_value_types(gw: Gateway) -> None:
    """Series are looked up by their serialized attributes; exemplars, flags and the value's
    type sit elsewhere in a point and must not make a new series (a cumulative stream would
    otherwise restart and count its whole total again)."""
    first = point(10, T0 + MIN, T0, tenant="acme", region="eu")
    second = point(15.5, T0 + 2 * MIN, T0, region="eu", tenant="acme")  # other attribute order
    second["exemplars"] = [
        {"timeUnixNano": str(T0 + MIN), "asInt": "3", "spanId": "eee19b7ec3c1b174"}
    ]
    third = point(16, T0 + 3 * MIN, T0, tenant="acme", region="eu")
    third["flags"] = 2  # a reserved bit: not "no recorded value"
    for p in (first, second, third):
        body = json.dumps(request_json(sum_metric([p], temporality=2))).encode()
        gw.otlp.export(decode_json(body))
    assert committed(gw)["totals"] == {"acme/data-processed": "16"}


def test_retried_delta_export_counts_once(gw: Gateway) -> None:
    req = request(sum_metric([point(5, T0 + MIN, T0, tenant="acme")]))
    first, second = gw.otlp.export(req), gw.otlp.export(req)
    assert (first.accepted, first.duplicates) == (1, 0)
    assert (second.accepted, second.duplicates) == (0, 1)


def test_cumulative_points_are_deduplicated_by_their_series_state(tmp_path: Path) -> None:
    """A cumulative point's amount keys nothing in the dedup window: its series' state, which
    commits with it, makes a resent total add nothing, through the validator (a series' first
    amounts) and the fast path, interleaved with newer totals, after a restart."""

    def export(g: Gateway, value: int, minute: int) -> Any:
        return g.otlp.export(
            request(sum_metric([point(value, T0 + minute * MIN, T0, tenant="acme")], temporality=2))
        )

    for g in _gateway(tmp_path):
        for value, minute in [(10, 1), (10, 1), (12, 2), (10, 1), (12, 2), (15, 3)]:
            export(g, value, minute)
        assert committed(g)["totals"] == {"acme/data-processed": "15"}
        assert g.store.stats() == {"records": 3, "dedup_keys": 0}
    for g in _gateway(tmp_path):
        assert export(g, 15, 3).accepted == 0  # a retry of the last export
        assert export(g, 19, 4).accepted == 1
        assert committed(g)["totals"] == {"acme/data-processed": "19"}
        assert g.store.stats() == {"records": 4, "dedup_keys": 0}


def test_state_survives_a_restart(tmp_path: Path) -> None:
    def export(g: Gateway, value: int, minute: int) -> None:
        g.otlp.export(
            request(sum_metric([point(value, T0 + minute * MIN, T0, tenant="acme")], temporality=2))
        )

    for g in _gateway(tmp_path):
        export(g, 10, 1)
        export(g, 12, 2)
    for g in _gateway(tmp_path):  # a new process: the cache is empty, the store has the state
        export(g, 12, 2)  # a retry of the last export
        export(g, 20, 3)
        assert committed(g)["totals"] == {"acme/data-processed": "20"}


def test_int_and_double_totals_of_one_series_step_exactly(tmp_path: Path) -> None:
    """A series' totals kept as ints (asInt) and as Decimals (asDouble) step into each other
    exactly, in the cache and read back from the row by a new process."""

    def export(g: Gateway, value: int | float, minute: int) -> None:
        g.otlp.export(
            request(sum_metric([point(value, T0 + minute * MIN, T0, tenant="acme")], temporality=2))
        )

    steps = [(10, 1), (12.25, 2), (14, 3), (14.0, 4), (20.5, 5), (23, 6)]
    for g in _gateway(tmp_path):
        for value, minute in steps[:3]:
            export(g, value, minute)
        assert committed(g)["totals"] == {"acme/data-processed": "14"}
    for g in _gateway(tmp_path):  # its row read back: "14" an int, the rest as they were
        for value, minute in steps[3:]:
            export(g, value, minute)
        assert committed(g)["totals"] == {"acme/data-processed": "23"}
        values = [r["value"] for r in committed(g)["records"]]
        assert values == ["10", "2.25", "1.75", "6.5", "2.5"]


def test_a_series_steps_by_the_same_decimals_from_the_cache_or_from_its_row(
    tmp_path: Path,
) -> None:
    """Totals kept as ints or as Decimals give steps equal to the digit ("1E+3" stays "1E+3")
    whether the state was cached or read back from its row."""
    totals: list[int | float] = [4000.0, 5000.0, 6000, 7000.0, 7000.5, 9000]

    def steps(directory: Path, reload: bool) -> list[str]:
        for g in _gateway(directory):
            for minute, value in enumerate(totals, start=1):
                if reload:  # the state as another process would read it
                    g.otlp.streams.forget(k.rsplit("/", 1)[1] for k in g.store.state_scan("otlp/"))
                t = T0 + minute * MIN
                g.otlp.export(
                    request(sum_metric([point(value, t, T0, tenant="acme")], temporality=2))
                )
            records = g.store.records(None, None, 0, 2**62, None, 10_000)
        return [str(r.value) for r in sorted(records, key=lambda r: r.timestamp_ns)]

    cached = steps(tmp_path / "cached", reload=False)  # SQLite: "4E+3", "1E+3", "1000", ...
    want = ["4E3", "1E3", "1E3", "1E3", "0.5", "1999.5"]
    assert [Decimal(v) for v in cached] == [Decimal(v) for v in want]
    assert steps(tmp_path / "reloaded", reload=True) == cached


def test_state_kept_one_row_per_series_before_groups_is_continued(tmp_path: Path) -> None:
    """A gateway upgraded over state written one row per series (``otlp/<series>``) converts
    against it, and moves it into the metric's row in the commit that next touches it."""

    def export(g: Gateway, value: int, minute: int) -> None:
        g.otlp.export(
            request(sum_metric([point(value, T0 + minute * MIN, T0, tenant="acme")], temporality=2))
        )

    for g in _gateway(tmp_path):
        export(g, 10, 1)
        ((key, row),) = g.store.state_scan("otlp/").items()
        ((sid, e),) = decode_group(row).items()
        old = {f"otlp/{sid}": encode_state(entry_state(e)), key: None}
        g.store.commit([Batch(Source.OTLP, state=old)], NOW)
    for g in _gateway(tmp_path):
        export(g, 12, 2)
        assert committed(g)["totals"] == {"acme/data-processed": "12"}
        assert list(g.store.state_scan("otlp/")) == [key]
        # the metric's row holds the state the move committed (12), not the old row's (10)
        export(g, 15, 3)
        assert committed(g)["totals"] == {"acme/data-processed": "15"}


def test_series_silent_past_the_late_arrival_limit_are_forgotten(gw: Gateway) -> None:
    def export(value: int, minute: int, tenant: str) -> None:
        t = T0 + minute * MIN
        gw.otlp.export(request(sum_metric([point(value, t, T0, tenant=tenant)], temporality=2)))

    export(10, 1, "acme")
    export(5, 3, "dumm-ai")
    assert gw.otlp.expire_streams(T0 + 2 * MIN) == 1  # acme's last point is older
    assert len(gw.store.state_scan("otlp/")) == 1
    export(12, 4, "dumm-ai")  # still known: a step of 7
    export(12, 4, "acme")  # forgotten: a new series, its whole total counts
    assert committed(gw)["totals"] == {
        "acme/data-processed": "22",
        "dumm-ai/data-processed": "12",
    }


def test_the_hourly_expiry_keeps_state_an_hour_past_the_late_arrival_limit(gw: Gateway) -> None:
    """The state is what makes a resent total add nothing, so the hourly expiry keeps it
    ``EXPIRY_MARGIN_NS`` past the oldest total accepted (a replica's clock may lag)."""
    limit = int(gw.config.ingest.late_arrival_limit.total_seconds()) * 10**9
    forgotten = []
    expire = gw.otlp.expire_streams
    ran = threading.Event()

    def recording(before_ns: int, n: int = 10_000) -> int:
        forgotten.append(before_ns)
        try:
            return expire(before_ns, n)
        finally:
            ran.set()

    gw.otlp.expire_streams = recording  # type: ignore[method-assign]
    for minute, tenant in [(1, "acme"), (2, "dumm-ai")]:
        t = T0 + minute * MIN
        gw.otlp.export(request(sum_metric([point(10, t, T0, tenant=tenant)], temporality=2)))
    assert isinstance(gw.clock, FixedClock)
    half_hour = EXPIRY_INTERVAL_NS // 2
    gw.clock.set(T0 + MIN + limit + half_hour)  # acme's last point: half an hour past the limit
    gw.otlp.export(request())  # the first export an hour after the last expiry runs the next
    assert ran.wait(10)
    assert forgotten == [T0 + MIN + half_hour - EXPIRY_MARGIN_NS]
    (row,) = gw.store.state_scan("otlp/").values()
    assert len(decode_group(row)) == 2  # both series kept


def test_concurrent_exports_of_one_stream_never_share_a_baseline(gw: Gateway) -> None:
    """Many threads export successive totals of the same cumulative streams at once: each
    export converts against the state the previous commit left, so the sum is exact."""
    totals = list(range(1, 41))
    errors: list[BaseException] = []

    def export(i: int) -> None:
        try:
            gw.otlp.export(
                request(
                    sum_metric(
                        [
                            point(totals[i], T0 + (i + 1) * MIN // 10, T0, tenant="acme"),
                            point(2 * totals[i], T0 + (i + 1) * MIN // 10, T0, tenant="dumm-ai"),
                        ],
                        temporality=2,
                    )
                )
            )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=export, args=(i,)) for i in range(len(totals))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # Exports may arrive out of order: an older total after a newer one is a repeat, never a
    # reset, so the sum is the largest total (time order decides, not arrival order).
    assert committed(gw)["totals"] == {
        "acme/data-processed": "40",
        "dumm-ai/data-processed": "80",
    }


def test_catalog_changes_apply_to_known_series(gw: Gateway) -> None:
    req1 = request(sum_metric([point(5, T0 + MIN, T0, tenant="newco")]))
    assert gw.otlp.export(req1).rejected == 1  # unknown customer
    gw.catalog.put("customers", gw.catalog.parse("customers", {"id": "newco", "name": "New Co"}))
    req2 = request(sum_metric([point(6, T0 + 2 * MIN, T0 + MIN, tenant="newco")]))
    assert gw.otlp.export(req2).accepted == 1


def test_known_series_are_learned_again_and_hold_no_old_catalog(gw: Gateway) -> None:
    """A catalog change sends a known series back to the validator once; its new mapping is
    learned, so the next point skips the validator again. What is learned names the snapshot
    by its serial: a held snapshot would keep every version of the catalog alive (2.8 GB of
    them in the fuzz suite, where every example adds a customer)."""
    validated: list[int] = []
    sink = gw.otlp._sink
    observations = sink.observations

    def counting(obs: Any, source: Source) -> Batch:
        validated.append(len(obs))
        return observations(obs, source)

    sink.observations = counting  # type: ignore[method-assign]
    t = iter(range(1, 100))

    def send() -> int:
        i = next(t)
        return gw.otlp.export(
            request(sum_metric([point(i, T0 + i * MIN, T0 + (i - 1) * MIN, tenant="acme")]))
        ).accepted

    assert [send(), send()] == [1, 1]
    assert validated == [1]  # the second point was made from the learned mapping
    # a series never seen again: what was learned of it must not hold its snapshot either
    other = point(1, T0 + MIN, T0, tenant="dumm-ai")
    assert gw.otlp.export(request(sum_metric([other]))).accepted == 1
    first = weakref.ref(gw.catalog.current)
    for n in range(3):  # three catalog changes
        before = weakref.ref(gw.catalog.current)
        gw.catalog.put("customers", gw.catalog.parse("customers", {"id": f"c{n}", "name": "C"}))
        assert [send(), send(), send()] == [1, 1, 1]
        gc.collect()
        assert before() is None, "something learned keeps an old catalog snapshot alive"
    assert validated == [1, 1, 1, 1, 1]  # once after each change, then from the mapping
    assert first() is None, "the mapping of a series not seen since keeps its snapshot alive"


def test_too_many_points_is_refused_whole(tmp_path: Path) -> None:
    config = gateway_config(
        store={"url": store_url(tmp_path, "g.db")}, ingest={"max_batch_records": 3}
    )
    g = Gateway(parse_config(yaml.safe_dump(config)), clock=FixedClock(NOW))
    try:
        points = [point(1, T0 + MIN, T0, tenant="acme", n=i) for i in range(4)]
        with pytest.raises(OtlpError, match="4 data points; at most 3") as exc:
            g.otlp.export(request(sum_metric(points)))
        assert exc.value.status == 413
    finally:
        g.close()


def test_otlp_listener_tls_needs_both_files() -> None:
    from meter_gateway.config import ConfigError

    with pytest.raises(ConfigError) as exc:
        parse_config("server: {otlp_grpc: {listen: '127.0.0.1:4317', cert_file: /c.pem}}")
    assert exc.value.errors == [
        "server.otlp_grpc: TLS needs both cert_file and key_file (or neither)"
    ]
    config = parse_config(
        "server: {otlp_http: {listen: '0.0.0.0:4318', cert_file: /c.pem, key_file: /k.pem}}"
    )
    assert config.server.otlp_http.cert_file == "/c.pem"
    assert config.server.otlp_grpc.listen == "127.0.0.1:4317"  # the default stays


def test_points_of_a_known_series_are_judged_like_its_first(gw: Gateway) -> None:
    """After a series' first point, later points in the usual layout (start, time, value, then
    the same attribute bytes) are read straight from their bytes; whatever they hold, they are
    judged as the first was. Flags and a missing start time change the layout: field by field."""
    at = [T0 + i * MIN for i in range(1, 9)]
    points = [
        point(5, at[0], T0, tenant="acme"),  # the first: read field by field
        point(2.5, at[1], at[0], tenant="acme"),  # a double
        {**point(0.5, at[2], at[1], tenant="acme"), "asDouble": "NaN"},  # no value: skipped
        {**point(0.5, at[3], at[2], tenant="acme"), "asDouble": "Infinity"},  # rejected
        point(-3, at[4], at[3], tenant="acme"),  # a negative monotonic delta: rejected
        {**point(7, at[5], at[4], tenant="acme"), "flags": 1},  # NO_RECORDED_VALUE: skipped
        point(4, at[6], None, tenant="acme"),  # no start time
        point(1, at[7], at[6], tenant="acme"),
    ]
    req = request(sum_metric(points))
    outcome = gw.otlp.export(req)
    assert (outcome.points, outcome.accepted, outcome.rejected) == (8, 4, 2)
    got = committed(gw)
    assert got["totals"] == {"acme/data-processed": "12.5"}
    assert sorted(r["reason"] for r in got["rejected"]) == ["invalid_value", "negative_value"]
    skipped = gw.telemetry.otlp_skipped.labels("no_value")._value.get()
    assert skipped == 2
    # The same export again: every point is known now, and every one a duplicate or the same
    # refusal.
    again = gw.otlp.export(req)
    assert (again.accepted, again.duplicates, again.rejected) == (0, 4, 2)


def test_remembered_series_stay_within_the_bound_across_metrics(gw: Gateway) -> None:
    """Series are remembered per metric (and resource), but the bound (max_cached_series) is on
    all of them together; past it the receiver starts over, and counts stay exact."""
    gw.otlp._max_cached = 10
    for minute in (1, 2):
        start, t = T0 + (minute - 1) * MIN, T0 + minute * MIN
        for service in ("a", "b", "c"):
            points = [point(1, t, start, tenant="acme", n=i) for i in range(10)]
            gw.otlp.export(request(sum_metric(points), service=service))
            assert sum(len(known) for known in gw.otlp._tails.values()) <= 10
    assert committed(gw)["totals"] == {"acme/data-processed": "60"}


def test_known_series_leave_values_past_the_rules_after_scale_to_the_validator(gw: Gateway) -> None:
    """A known series' records skip the validator only while they plainly keep the value rules
    after the rule's scale (app.scaled.bytes: 1e-9): 19 places, or 1e21 and more, are the
    validator's to refuse, with its reason, as for a first point."""
    at = [T0 + i * MIN for i in range(1, 5)]
    first = point(2, at[0], T0, tenant="acme")  # 2e-9, and the series is learned
    gw.otlp.export(request(sum_metric([first], name="app.scaled.bytes")))
    points = [
        point(1e-10, at[1], at[0], tenant="acme"),  # 1e-19: 19 places
        point(0.001, at[2], at[1], tenant="acme"),  # 1e-12
    ]
    outcome = gw.otlp.export(request(sum_metric(points, name="app.scaled.bytes")))
    assert (outcome.accepted, outcome.rejected) == (1, 1)
    assert committed(gw)["totals"] == {"acme/data-processed": "0.000000002001"}
    assert [r["reason"] for r in committed(gw)["rejected"]] == ["invalid_value"]


@pytest.mark.parametrize("bad_time", [2**64 - 1, NOW + 3600 * 10**9, 1], ids=["max", "hour", "1"])
def test_a_cumulative_point_out_of_time_never_moves_its_series(gw: Gateway, bad_time: int) -> None:
    """A cumulative point refused for its time is refused before conversion: had it become the
    series' state, every later point would have been an old repeat (or counted from it)."""
    at = [T0 + i * MIN for i in range(1, 4)]

    def export(value: int, t: int) -> Any:
        return gw.otlp.export(
            request(sum_metric([point(value, t, T0, tenant="acme")], temporality=2))
        )

    assert export(5, at[0]).accepted == 1
    refused = export(50, bad_time)
    assert (refused.accepted, refused.rejected) == (0, 1)
    assert export(7, at[1]).accepted == 1
    assert committed(gw)["totals"] == {"acme/data-processed": "7"}
