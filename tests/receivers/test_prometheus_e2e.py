"""The Prometheus query receiver against a real Prometheus (Debian's 2.42) scraping a real
prometheus-client app, with a real gateway process: usage equals the exact counter increase
the app made, across a counter reset (app restart) and a gateway restart; gauges give the exact
time-weighted level and the exact running time.

Nothing here asserts on time: the tests wait (with generous deadlines) for the gateway's
watermark to pass the last change, then compare exact decimals.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx
import pytest

from meter_gateway.pipeline.timestamps import parse_timestamp
from tests.gatewayproc import BASE_CONFIG, GatewayProcess, free_port
from tests.helpers import eventually, total
from tests.promapp import PromApp
from tests.promserver import PrometheusServer

NS = 1_000_000_000
WAIT_S = 90.0  # scrapes and query windows of a second or two each; generous on a busy machine


def _config(prom_url: str) -> dict[str, Any]:
    cfg = dict(BASE_CONFIG)
    cfg["dimensions"] = [
        *BASE_CONFIG["dimensions"],
        {
            "id": "storage-level",
            "name": "Storage",
            "unit": "gigabyte",
            "aggregation": "time_weighted_avg",
        },
        {"id": "pod-time", "name": "Pod time", "measurement": "kubernetes-pod-compute-time"},
    ]
    cfg["receivers"] = {
        "prometheus": {
            "url": prom_url,
            "interval": "2s",
            "delay": "2s",
            "series": [
                {
                    "dimension": "data-processed",
                    "query": "app_bytes_processed_total",
                    "customer_label": "tenant",
                    "kind": "counter",
                },
                {
                    "dimension": "storage-level",
                    "query": "app_storage_bytes",
                    "kind": "gauge",
                    "scale": "1e-9",
                },
                {"dimension": "pod-time", "query": "app_pod_running"},  # the template's rest
            ],
        }
    }
    return cfg


@pytest.fixture(scope="module")
def apps() -> Iterator[tuple[PromApp, PromApp]]:
    counters, gauges = PromApp(free_port()).start(), PromApp(free_port()).start()
    yield counters, gauges
    counters.stop()
    gauges.stop()


@pytest.fixture(scope="module")
def prom(apps: tuple[PromApp, PromApp]) -> Iterator[PrometheusServer]:
    with PrometheusServer(scrape_targets=[a.target for a in apps], scrape_interval="1s") as p:
        p.wait_for_targets()
        yield p


def _metric(gw: GatewayProcess, name: str, **labels: str) -> float | None:
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return None if m is None else float(m.group(1))


def _wait_watermark(gw: GatewayProcess, dimension: str, past_s: float) -> None:
    def passed() -> bool:
        wm = _metric(gw, "meter_gateway_prometheus_query_watermark_seconds", dimension=dimension)
        return wm is not None and wm > past_s

    try:
        eventually(passed, f"{dimension} watermark past {past_s}", WAIT_S)
    except AssertionError as exc:  # with the gateway's log as it is at the deadline
        raise AssertionError(f"{exc}\n{gw.log()[-2000:]}") from exc


def _wait_value(prom: PrometheusServer, expr: str, value: str) -> float:
    """Wait until Prometheus has scraped ``value`` for ``expr``; return that sample's time."""

    def seen() -> float | None:
        r = prom.query(expr)
        return float(r[0]["value"][0]) if r and r[0]["value"][1] == value else None

    t = eventually(seen, f"{expr} == {value}", WAIT_S)
    assert t is not None  # (eventually returns only truthy values)
    return t


def test_counter_usage_is_the_exact_increase_across_resets_and_restarts(
    tmp_path: Path, apps: tuple[PromApp, PromApp], prom: PrometheusServer
) -> None:
    app, _ = apps
    # Counted before the receiver ever ran: a baseline, not usage.
    app.inc("acme", 1000)
    _wait_value(prom, 'app_bytes_processed_total{tenant="acme"}', "1000")
    gw = GatewayProcess(tmp_path, _config(prom.url)).start()
    try:
        _wait_watermark(gw, "data-processed", 0)  # the first run set the baselines
        app.inc("acme", 100)
        app.inc("acme", 250.5)
        app.inc("dumm-ai-prod", 7)  # a series first seen now counts from zero
        _wait_value(prom, 'app_bytes_processed_total{tenant="acme"}', "1350.5")
        _wait_value(prom, 'app_bytes_processed_total{tenant="dumm-ai-prod"}', "7")
        # The gateway goes down in the middle; the app keeps counting.
        assert gw.stop() == 0
        app.inc("acme", 30)
        t = _wait_value(prom, 'app_bytes_processed_total{tenant="acme"}', "1380.5")
        eventually(
            lambda: time.time() > t + 5, "a few windows pass while the gateway is down", WAIT_S
        )
        gw.start()
        # The app restarts: every counter starts from zero again (a reset).
        app.stop()
        app.start()
        app.inc("acme", 40)
        app.inc("dumm-ai-prod", 3)
        _wait_value(prom, 'app_bytes_processed_total{tenant="acme"}', "40")
        last = _wait_value(prom, 'app_bytes_processed_total{tenant="dumm-ai-prod"}', "3")
        _wait_watermark(gw, "data-processed", last + 2)
        with gw.client() as c:
            assert total(c, "acme") == Decimal("420.5")  # 100 + 250.5 + 30 + 40
            assert total(c, "dumm-ai") == Decimal(10)  # 7 + 3, through the alias
        text = httpx.get(f"{gw.url}/metrics", timeout=10).text
        assert 'meter_gateway_prometheus_samples_read_total{dimension="data-processed"}' in text
        lag = _metric(gw, "meter_gateway_prometheus_query_lag_seconds", dimension="data-processed")
        assert lag is not None
        assert lag >= 2
    finally:
        gw.stop()


def _step_function(prom: PrometheusServer, selector: str, at: float) -> list[tuple[int, Fraction]]:
    """(time ms, level) at each raw sample whose value differs from the one before."""
    (series,) = prom.query(f"{selector}[10m]", at)
    out: list[tuple[int, Fraction]] = []
    for t, v in series["values"]:
        level = Fraction(Decimal(v))
        if not out or out[-1][1] != level:
            out.append((round(t * 1000), level))
    return out


def _integral(
    steps: list[tuple[int, Fraction]], start_ms: Fraction | int, end_ms: Fraction | int
) -> Fraction:
    """∫ level dt in seconds over [start, end) (level 0 before the first step)."""
    total = Fraction(0)
    for i, (t, level) in enumerate(steps):
        nxt = steps[i + 1][0] if i + 1 < len(steps) else end_ms
        lo, hi = max(t, start_ms), min(nxt, end_ms)
        if hi > lo:
            total += level * (hi - lo) / 1000
    return total


def test_gauges_give_the_exact_time_weighted_level_and_running_time(
    tmp_path: Path, apps: tuple[PromApp, PromApp], prom: PrometheusServer
) -> None:
    _, app = apps
    gw = GatewayProcess(tmp_path, _config(prom.url)).start()
    try:
        _wait_watermark(gw, "storage-level", 0)
        app.set("acme", 5e9)  # 5 GB
        app.set("acme", 1, name="app_pod_running", label="namespace")
        t1 = _wait_value(prom, 'app_storage_bytes{tenant="acme"}', "5000000000")
        eventually(lambda: time.time() > t1 + 4, "the level holds a while", WAIT_S)
        app.set("acme", 8e9)
        app.set("acme", 0, name="app_pod_running", label="namespace")
        t2 = _wait_value(prom, 'app_storage_bytes{tenant="acme"}', "8000000000")
        _wait_value(prom, 'app_pod_running{namespace="acme"}', "0")
        _wait_watermark(gw, "storage-level", t2 + 2)
        _wait_watermark(gw, "pod-time", t2 + 2)
        at = time.time()
        hour_ms = int(at // 3600 * 3600 * 1000)
        storage = _step_function(prom, 'app_storage_bytes{tenant="acme"}', at)
        assert [lv for _, lv in storage] == [5_000_000_000, 8_000_000_000]
        with gw.client() as c:
            r = c.get(
                "/v1/usage",
                params={
                    "customerId": "acme",
                    "dimensionId": "storage-level",
                    "window": "hour",
                    "from": time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(at)),
                    "to": time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(at + 3600)),
                },
            )
            assert r.status_code == 200, r.text
            body = r.json()
            (window,) = body["data"]
            # The current hour's time-weighted average level in GB, measured up to asOf over the
            # whole hour (SPEC 9); the forecast, the level held to the hour's end, apart.
            as_of_ms = Fraction(parse_timestamp(body["asOf"]), 1_000_000)
            for field, end_ms in (("value", as_of_ms), ("projected", hour_ms + 3_600_000)):
                expected = _integral(storage, hour_ms, end_ms) / 3600 / 10**9
                got = Fraction(Decimal(window[field]))
                assert abs(got - expected) < Fraction(1, 10**15), (field, got, expected)
            # Running time: seconds between the first sample at 1 and the first at 0, exactly.
            pods = _step_function(prom, 'app_pod_running{namespace="acme"}', at)
            assert [lv for _, lv in pods] == [1, 0]
            running = Fraction(pods[1][0] - pods[0][0], 1000)
            assert Fraction(total(c, "acme", "pod-time")) == running
    finally:
        gw.stop()
