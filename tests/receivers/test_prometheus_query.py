"""The Prometheus query receiver's window logic (pure, golden files) and its job (watermark,
baselines, catch-up, errors) against a real store, ingestor and validator.

Golden files: ``tests/testdata/prometheus/windows/<case>.yaml`` holds samples in;
``<case>.expected.yaml`` what the window functions make of them. Regenerate with
``REGEN_GOLDEN=1 pytest tests/receivers/test_prometheus_query.py`` and review the diff.
The end-to-end tests against a real Prometheus are in ``test_prometheus_e2e.py``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from meter_gateway.clock import FixedClock
from meter_gateway.config import Config, ConfigError, parse_config
from meter_gateway.decimals import fmt
from meter_gateway.model import Source
from meter_gateway.promql import parse_selector
from meter_gateway.service import Gateway
from receivers.prometheus_query import (
    GaugeSeries,
    PrometheusApi,
    PrometheusQueryJob,
    QueryError,
    QueryFailed,
    RawSeries,
    Sample,
    SeriesState,
    build_jobs,
    clamp_places,
    counter_increments,
    exact_value,
    gauge_windows,
    parse_matrix,
    windows_due,
)
from tests.gatewayproc import free_port
from tests.pgdb import store_url

DATA = Path(__file__).parent.parent / "testdata" / "prometheus" / "windows"
REGEN = os.environ.get("REGEN_GOLDEN") == "1"
NS = 1_000_000_000
T0 = 1_777_636_800 * NS  # 2026-05-01T12:00:00Z


def _state(d: dict[str, Any] | None) -> SeriesState | None:
    return None if d is None else SeriesState({}, int(d["t"]), Decimal(d["v"]))


def _samples(rows: list[list[Any]]) -> list[Sample]:
    return [Sample(int(t), Decimal(v)) for t, v in rows]


def _run_case(case: dict[str, Any]) -> dict[str, Any]:
    windows = [(s * 1_000_000, e * 1_000_000) for s, e in case["windows"]]
    if case["kind"] == "counter":
        incs, last = counter_increments(
            _state(case["carried"]), _samples(case["samples"]), windows, case["from_zero"]
        )
        return {
            "increments": [fmt(x) for x in incs],
            "carry": None if last is None else [last.t_ms, fmt(last.value)],
        }
    series = {
        sid: GaugeSeries(_state(s["carried"]), _samples(s["samples"]))
        for sid, s in case["series"].items()
    }
    result, carry = gauge_windows(series, windows)
    return {
        "levels": [[t // 1_000_000, fmt(v)] for t, v in result.levels],
        "integrals": [fmt(x) for x in result.integrals],
        "carry": {k: None if v is None else [v.t_ms, fmt(v.value)] for k, v in carry.items()},
    }


@pytest.mark.parametrize("case", sorted(p.stem for p in DATA.glob("*.yaml") if "." not in p.stem))
def test_golden_windows(case: str) -> None:
    got = _run_case(yaml.safe_load((DATA / f"{case}.yaml").read_text()))
    expected_path = DATA / f"{case}.expected.yaml"
    if REGEN:
        expected_path.write_text(yaml.safe_dump(got, sort_keys=True))
    assert expected_path.exists(), f"no golden output for {case}: run with REGEN_GOLDEN=1"
    assert got == yaml.safe_load(expected_path.read_text())


def test_counter_reset_and_boundary_by_hand() -> None:
    # The golden case above, spelled out: 0.5 + 0.5 | 9 + 0 | 5 + 2.25 (9 at 30000 is next run's)
    case = yaml.safe_load((DATA / "counter_reset_boundary.yaml").read_text())
    assert _run_case(case)["increments"] == ["1", "9", "7.25"]


def test_gauge_integral_is_exact_level_seconds() -> None:
    case = yaml.safe_load((DATA / "gauge_two_series.yaml").read_text())
    got = _run_case(case)
    # [0,10): 5·4 + 7·6 = 62; [10,20): 7·2 + 10·4 + 11·4 = 98; [20,30): 8·10 (vol-b gone)
    assert got["integrals"] == ["62", "98", "80"]
    assert got["carry"]["vol-b"] is None


def test_summing_windows_equals_the_whole_range() -> None:
    """Reading 1, 2 or 6 windows per step gives the same total: no window boundary loses or
    repeats a step (the flaw of summing increase())."""
    samples = [
        Sample(t, Decimal(v))
        for t, v in [(500, "3"), (1500, "4"), (2500, "1"), (3000, "6"), (4700, "6.5"), (5999, "9")]
    ]
    totals = []
    for per_step in (1, 2, 6):
        carried: SeriesState | None = SeriesState({}, 0, Decimal(0))
        total = Decimal(0)
        for k in range(0, 6, per_step):
            windows = [(i * 10**9, (i + 1) * 10**9) for i in range(k, k + per_step)]
            incs, last = counter_increments(carried, samples, windows, True)
            total += sum(incs)
            if last is not None:
                carried = SeriesState({}, last.t_ms, last.value)
        totals.append(total)
    assert totals == [Decimal(13)] * 3  # 3 + 1 + 1 (a reset to 1) + 5 + 0.5 + 2.5


def test_windows_due_aligned_bounded_and_first_run() -> None:
    i, d = 60 * NS, 30 * NS
    now = T0 + 10 * 60 * NS + 45 * NS  # 12:10:45 → windows up to 12:10:00 are readable
    assert windows_due(None, now, i, d, 5) == [(T0 + 9 * i, T0 + 10 * i)]
    assert windows_due(T0 + 10 * i, now, i, d, 5) == []
    due = windows_due(T0, now, i, d, 4)
    assert due == [(T0 + k * i, T0 + (k + 1) * i) for k in range(4)]
    # A watermark off the grid (the interval changed) closes on the next aligned end.
    assert windows_due(T0 + 15 * NS, now, i, d, 1) == [(T0 + 15 * NS, T0 + i)]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1027", Decimal("1027")),
        ("0.1", Decimal("0.1")),
        ("1e+21", Decimal("1e21")),
        ("-3.5", Decimal("-3.5")),
        ("NaN", None),
        ("+Inf", None),
        ("-Inf", None),
        ("", None),
        ("0x10", None),
        (17, None),  # values are strings in the API; anything else is not a sample
        ("9" * 401, None),
    ],
)
def test_exact_value(raw: object, expected: Decimal | None) -> None:
    assert exact_value(raw) == expected


def test_clamp_places() -> None:
    assert clamp_places(Decimal("1.23456789012345678901")) == Decimal("1.234567890123456789")
    assert clamp_places(Decimal("1.5")) == Decimal("1.5")


@pytest.mark.parametrize(
    "text",
    [
        "app_bytes_total",
        'app_bytes_total{env="prod"}',
        "app_bytes_total{env='prod', tenant!~\"x|y\"}",
        '{__name__=~"app_.*"}',
        '  kube_pod_status_phase { phase = "Running" , } ',
        'x{a="}"}',
    ],
)
def test_selectors_accepted(text: str) -> None:
    parse_selector(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{}",
        "rate(app_bytes_total[5m])",
        "sum by (tenant) (app_bytes_total)",
        "app_bytes_total[5m]",
        "app_bytes_total offset 5m",
        "a + b",
        'app{env="prod"',
        "app{env=prod}",
        'app{env="prod"} or vector(1)',
    ],
)
def test_selectors_rejected(text: str) -> None:
    with pytest.raises(ValueError, match=r"selector|matcher|quoted|expected"):
        parse_selector(text)


@pytest.mark.parametrize(
    "result",
    [
        {"not": "a list"},
        [1],
        [{"metric": {}}],
        [{"metric": {}, "values": [[1, "1", 2]]}],
        [{"metric": {}, "values": [["x", "1"]]}],
        [{"metric": {}, "values": [[True, "1"]]}],
    ],
)
def test_parse_matrix_rejects_other_shapes(result: object) -> None:
    with pytest.raises(QueryFailed) as exc:
        parse_matrix(result)
    assert exc.value.error is QueryError.BAD_RESPONSE


def test_parse_matrix_skips_nan_and_inf_and_rounds_times() -> None:
    result = [
        {
            "metric": {"__name__": "m", "tenant": "acme"},
            "values": [[1.001, "1"], [2.002, "NaN"], [3.003, "+Inf"], [4.004, "2"]],
        }
    ]
    (s,) = parse_matrix(result)
    assert s.skipped == 2
    assert s.samples == [Sample(1001, Decimal(1)), Sample(4004, Decimal(2))]


# --- the job, against the real store, ingestor and validator ----------------------------------

CONFIG: dict[str, Any] = {
    "dimensions": [
        {"id": "bytes", "name": "Bytes", "aggregation": "sum"},
        {"id": "storage", "name": "Storage", "aggregation": "time_weighted_avg"},
    ],
    "customers": [
        {"id": "acme", "name": "Acme"},
        {"id": "dumm-ai", "name": "Dumm", "aliases": ["dumm-ai-prod"]},
    ],
}


class FakeSource:
    """Samples in memory, answered like a range selector at ``end`` over ``span``; ``fail``
    makes the next reads raise."""

    def __init__(self) -> None:
        self.series: dict[tuple[tuple[str, str], ...], list[Sample]] = {}
        self.fail: QueryError | None = None
        self.reads: list[tuple[int, int]] = []

    def add(self, labels: dict[str, str], t_ms: int, value: str) -> None:
        self.series.setdefault(tuple(sorted(labels.items())), []).append(
            Sample(t_ms, Decimal(value))
        )

    def range_samples(self, selector: str, span_ms: int, end_ms: int) -> list[RawSeries]:
        self.reads.append((span_ms, end_ms))
        if self.fail is not None:
            raise QueryFailed(self.fail, "injected")
        out = []
        for labels, samples in self.series.items():
            inside = [s for s in samples if end_ms - span_ms <= s.t_ms <= end_ms]
            if inside:
                out.append(RawSeries(dict(labels), inside, 0))
        return out


class Recorder:
    def __init__(self) -> None:
        self.lag: dict[str, float] = {}
        self.watermarks: dict[str, float] = {}
        self.samples = 0
        self.errors: list[str] = []

    def prometheus_lag(self, dimension: str, seconds: float) -> None:
        self.lag[dimension] = seconds

    def prometheus_watermark(self, dimension: str, end_s: float) -> None:
        self.watermarks[dimension] = end_s

    def prometheus_samples(self, dimension: str, n: int) -> None:
        self.samples += n

    def prometheus_error(self, dimension: str, error: str) -> None:
        self.errors.append(error)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    cfg = Config.model_validate({**CONFIG, "store": {"url": store_url(tmp_path, "g.db")}})
    gw = Gateway(cfg, clock=FixedClock(T0))
    yield gw
    gw.close()


def _job(
    gw: Gateway, source: FakeSource, kind: str = "counter", dim: str = "bytes", **kw: Any
) -> tuple[PrometheusQueryJob, Recorder]:
    prom = {
        "url": "http://127.0.0.1:1",
        "interval": "10s",
        "delay": "5s",
        "series": [{"dimension": dim, "query": "app_bytes_total", "kind": kind, **kw}],
    }
    cfg = Config.model_validate({**CONFIG, "receivers": {"prometheus": prom}})
    rec = Recorder()
    from meter_gateway.pipeline.validate import Validator

    (job,) = build_jobs(
        cfg.receivers.prometheus,  # type: ignore[arg-type]
        lambda m: Validator(lambda: gw.catalog.current, gw.clock, gw.config.ingest, m),
        gw.store,
        gw.ingestor,
        rec,
        gw._aggregation,
        35 * 86400.0,
        source=source,
    )
    return job, rec


def _ms(seconds: float) -> int:
    return T0 // 1_000_000 + int(seconds * 1000)


def test_job_baseline_then_exact_windows_and_restart(gateway: Gateway, tmp_path: Path) -> None:
    src = FakeSource()
    acme = {"__name__": "app_bytes_total", "tenant": "acme"}
    src.add(acme, _ms(-3), "1000")  # existed before the receiver: a baseline
    src.add(acme, _ms(2), "1010")
    job, rec = _job(gateway, src)
    # First run at 12:00:15: the window [12:00:00, 12:00:10) only sets baselines.
    job.run(T0 + 15 * NS)
    assert job.watermark() == T0 + 10 * NS
    assert gateway.store.state_scan("prometheus/")  # series baseline + watermark
    assert _records(gateway, "acme") == []
    src.add(acme, _ms(12), "1015")
    src.add({"__name__": "app_bytes_total", "tenant": "dumm-ai-prod"}, _ms(13), "7")
    job.run(T0 + 25 * NS)  # reads [10, 20)
    assert _records(gateway, "acme") == [(T0 + 10 * NS, "5")]
    assert _records(gateway, "dumm-ai") == [(T0 + 10 * NS, "7")]  # new series: from zero
    # A repeat of the same time reads nothing new.
    job.run(T0 + 25 * NS)
    assert len(src.reads) == 2
    assert rec.lag["bytes"] == 5.0
    assert rec.watermarks["bytes"] == (T0 + 20 * NS) / NS


def _records(gw: Gateway, customer: str, dim: str = "bytes") -> list[tuple[int, str]]:
    rows = gw.store.raw(customer, dim, T0 - 3600 * NS, T0 + 3600 * NS)
    return [(r.ts, fmt(r.value)) for r in rows]


def test_job_catches_up_in_bounded_steps_and_never_loses_a_window(gateway: Gateway) -> None:
    src = FakeSource()
    acme = {"__name__": "app_bytes_total", "tenant": "acme"}
    src.add(acme, _ms(1), "0")
    job, rec = _job(gateway, src)
    job.run(T0 + 15 * NS)  # baseline at 10 s
    for k in range(1, 40):  # one sample a second, +1 each, for 40 s
        src.add(acme, _ms(10 + k), str(k))
    # Prometheus down: the run fails, the error is counted, the watermark stays.
    src.fail = QueryError.UNAVAILABLE
    with pytest.raises(QueryFailed):
        job.run(T0 + 60 * NS)
    assert rec.errors == ["unavailable"]
    assert job.watermark() == T0 + 10 * NS
    src.fail = None
    # 900 s steps hold 90 windows of 10 s; a small step size splits the catch-up.
    job._max_windows = 2
    assert job.run(T0 + 60 * NS) == 0.0  # more to do
    assert job.watermark() == T0 + 30 * NS
    while job.run(T0 + 60 * NS) == 0.0:
        pass
    assert job.watermark() == T0 + 50 * NS
    # 10..19 → +9 (the step 0→1 at 11 s included), 20..29 → +10, 30..39 → +10, 40..49 → +9
    assert [v for _, v in _records(gateway, "acme")] == ["9", "10", "10", "10"]
    assert sum(Decimal(v) for _, v in _records(gateway, "acme")) == 39


def test_job_restart_neither_skips_nor_repeats(tmp_path: Path) -> None:
    src = FakeSource()
    acme = {"__name__": "app_bytes_total", "tenant": "acme"}
    src.add(acme, _ms(1), "5")
    cfg = Config.model_validate({**CONFIG, "store": {"url": store_url(tmp_path, "g.db")}})
    gw = Gateway(cfg, clock=FixedClock(T0))
    job, _ = _job(gw, src)
    job.run(T0 + 15 * NS)
    src.add(acme, _ms(12), "8")
    job.run(T0 + 25 * NS)
    gw.close()
    src.add(acme, _ms(22), "20")
    src.add(acme, _ms(32), "21")
    gw = Gateway(cfg, clock=FixedClock(T0 + 45 * NS))
    try:
        job, _ = _job(gw, src)
        assert job.watermark() == T0 + 20 * NS
        job.run(T0 + 45 * NS)
        assert _records(gw, "acme") == [
            (T0 + 10 * NS, "3"),
            (T0 + 20 * NS, "12"),
            (T0 + 30 * NS, "1"),
        ]
    finally:
        gw.close()


def test_job_gauge_levels_per_customer(gateway: Gateway) -> None:
    src = FakeSource()
    a = {"__name__": "app_storage_bytes", "tenant": "acme", "volume": "a"}
    b = {"__name__": "app_storage_bytes", "tenant": "acme", "volume": "b"}
    job, _ = _job(gateway, src, kind="gauge", dim="storage", scale="1e-9")
    job.run(T0 + 15 * NS)  # nothing yet
    src.add(a, _ms(12), "5000000000")
    src.add(b, _ms(14), "2500000000")
    src.add(a, _ms(22), "5000000000")
    src.add(b, _ms(24), "2500000000")
    job.run(T0 + 35 * NS)
    assert _records(gateway, "acme", "storage") == [
        (T0 + 12 * NS, "5"),
        (T0 + 14 * NS, "7.5"),
        (T0 + 20 * NS, "7.5"),
    ]
    # b disappears: no sample in [30, 40) → 0 from 30 s on for it.
    src.add(a, _ms(32), "5000000000")
    job.run(T0 + 45 * NS)
    assert _records(gateway, "acme", "storage")[-1] == (T0 + 30 * NS, "5")


def test_job_gauge_integrates_for_sum_dimensions(gateway: Gateway) -> None:
    src = FakeSource()
    pod = {"__name__": "kube_pod_status_phase", "namespace": "acme", "pod": "p1"}
    job, _ = _job(gateway, src, kind="gauge", customer_label="namespace")
    job.run(T0 + 15 * NS)
    src.add(pod, _ms(12.5), "1")
    src.add(pod, _ms(17.5), "1")
    src.add(pod, _ms(22.5), "1")
    src.add(pod, _ms(25), "0")
    job.run(T0 + 35 * NS)
    assert _records(gateway, "acme") == [(T0 + 10 * NS, "7.5"), (T0 + 20 * NS, "5")]


def test_unknown_customer_is_kept_as_rejected_and_the_window_still_moves(gateway: Gateway) -> None:
    src = FakeSource()
    job, _ = _job(gateway, src)
    job.run(T0 + 15 * NS)
    src.add({"__name__": "app_bytes_total", "tenant": "nobody"}, _ms(12), "4")
    src.add({"__name__": "app_bytes_total"}, _ms(12), "4")  # no customer label at all
    job.run(T0 + 25 * NS)
    assert job.watermark() == T0 + 20 * NS
    rejected = gateway.store.rejected(None, 10, None)
    assert sorted(r.reason for r in rejected) == ["unknown_customer", "unmapped"]
    assert all(r.source == Source.PROMETHEUS.value for r in rejected)


# --- config -------------------------------------------------------------------------------------


def test_measurement_template_fills_dimension_and_series() -> None:
    cfg = parse_config(
        yaml.safe_dump(
            {
                "dimensions": [
                    {"id": "pods", "name": "Pods", "measurement": "kubernetes-pod-compute-time"},
                    {
                        "id": "vol",
                        "name": "Volumes",
                        "measurement": "volume-size-gb",
                        "aggregation_interval": "day",
                    },
                ],
                "receivers": {
                    "prometheus": {
                        "url": "http://127.0.0.1:9090",
                        "series": [
                            {"dimension": "pods"},
                            {"dimension": "vol", "query": "my_volume_bytes", "scale": "1e-6"},
                        ],
                    }
                },
            }
        )
    )
    pods, vol = cfg.dimensions
    assert (pods.unit, pods.aggregation, pods.aggregation_interval) == ("minute", "sum", "hour")
    assert (pods.usage_increment, pods.rounding) == (Decimal(60), "ceil")
    assert (vol.aggregation, vol.aggregation_interval) == ("time_weighted_avg", "day")
    assert cfg.receivers.prometheus is not None
    s_pods, s_vol = cfg.receivers.prometheus.series
    assert (s_pods.query, s_pods.kind, s_pods.customer_label) == (
        'kube_pod_status_phase{phase="Running"}',
        "gauge",
        "namespace",
    )
    assert (s_vol.query, s_vol.kind, s_vol.scale) == ("my_volume_bytes", "gauge", Decimal("1e-6"))


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            {"dimensions": [{"id": "d", "name": "D", "measurement": "nope"}]},
            "unknown measurement 'nope'",
        ),
        (
            {
                "dimensions": [{"id": "d", "name": "D"}],
                "receivers": {
                    "prometheus": {
                        "url": "http://x",
                        "series": [{"dimension": "d", "query": "rate(x[5m])"}],
                    }
                },
            },
            "receivers.prometheus.series.0.query",
        ),
        (
            {
                "dimensions": [{"id": "d", "name": "D", "aggregation": "count"}],
                "receivers": {
                    "prometheus": {
                        "url": "http://x",
                        "series": [{"dimension": "d", "query": "x", "kind": "gauge"}],
                    }
                },
            },
            "receivers.prometheus.series.0.kind: a gauge is a level",
        ),
        (
            {
                "dimensions": [{"id": "d", "name": "D"}],
                "receivers": {"prometheus": {"url": "http://x", "series": [{"dimension": "d"}]}},
            },
            "receivers.prometheus.series.0.query",
        ),
    ],
)
def test_config_errors_name_the_path(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(yaml.safe_dump(doc))
    assert message in str(exc.value), str(exc.value)


# --- PrometheusApi against real HTTP servers on loopback ----------------------------------------


class _Answers(BaseHTTPRequestHandler):
    mode = "ok"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        mode = type(self).mode
        if mode == "slow":
            time.sleep(2)
        body = {
            "ok": b'{"status":"success","data":{"resultType":"matrix","result":[{"metric":'
            b'{"tenant":"acme"},"values":[[1.5,"2"],[2.5,"NaN"]]}]}}',
            "slow": b"{}",
            "400": b'{"status":"error","errorType":"bad_data","error":"parse error"}',
            "503": b"unavailable",
            "garbage": b"<html>not json</html>",
            "shape": b'{"status":"success","data":{"result":{"x":1}}}',
        }[mode]
        code = int(mode) if mode.isdigit() else 200
        try:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except BrokenPipeError:  # the client timed out first
            pass


@pytest.fixture(scope="module")
def http_answers() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("400", QueryError.HTTP_4XX),
        ("503", QueryError.HTTP_5XX),
        ("slow", QueryError.TIMEOUT),
        ("garbage", QueryError.BAD_RESPONSE),
        ("shape", QueryError.BAD_RESPONSE),
    ],
)
def test_api_errors_are_classified(http_answers: str, mode: str, error: QueryError) -> None:
    _Answers.mode = mode
    api = PrometheusApi(http_answers, timeout_s=0.5)
    with pytest.raises(QueryFailed) as exc:
        api.range_samples("app_bytes_total", 10_000, 1_000_000)
    assert exc.value.error is error


def test_api_down_is_unavailable_and_ok_parses(http_answers: str) -> None:
    with pytest.raises(QueryFailed) as exc:
        PrometheusApi(f"http://127.0.0.1:{free_port()}").range_samples("x", 1000, 2000)
    assert exc.value.error is QueryError.UNAVAILABLE
    _Answers.mode = "ok"
    (s,) = PrometheusApi(http_answers).range_samples("x", 1000, 2000)
    assert (s.labels, s.samples, s.skipped) == ({"tenant": "acme"}, [Sample(1500, Decimal(2))], 1)
