"""Real OpenTelemetry SDK exporters, in their own process, against a running gateway.

The app (tests/exporters/otlp_app.py) records known amounts and exports only when told to, so
every test knows exactly what each export holds; the gateway's totals must equal what the app
recorded, whatever the temporality, protocol, app restarts or gateway crashes in between.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from tests.exporters.otlp_app import AppProcess, gateway_config
from tests.gatewayproc import INGEST_KEY, GatewayProcess
from tests.helpers import month_values, now_iso, total

PROTOCOLS = ["grpc", "http"]
TEMPORALITIES = ["cumulative", "delta"]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(Path(tmp_path_factory.mktemp("otlp-sdk")), gateway_config()).start()
    yield gw
    assert gw.stop() == 0, gw.log()


def endpoint(gw: GatewayProcess, protocol: str) -> str:
    return f"http://{gw.otlp_grpc}" if protocol == "grpc" else gw.otlp_http


def app(gw: GatewayProcess, protocol: str, temporality: str, **kw: object) -> AppProcess:
    return AppProcess(protocol, endpoint(gw, protocol), INGEST_KEY, temporality, **kw)  # type: ignore[arg-type]


def level(client: httpx.Client, customer: str, dimension: str) -> Decimal | None:
    """The value of the latest month window that has one (``last`` dimensions)."""
    values = [v for v in month_values(client, customer, dimension, timedelta()) if v is not None]
    return Decimal(values[-1]) if values else None


def raw_values(client: httpx.Client, customer: str, dimension: str) -> list[Decimal]:
    r = client.get(
        "/v1/usage",
        params={
            "customerId": customer,
            "dimensionId": dimension,
            "window": "raw",
            "from": "2020-01-01T00:00:00Z",
            "to": now_iso(),
            "limit": 10_000,
        },
    )
    assert r.status_code == 200, r.text
    return [Decimal(x["recordValue"]) for x in r.json()["data"]]


@pytest.mark.parametrize("temporality", TEMPORALITIES)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_totals_equal_what_the_app_recorded(
    gateway: GatewayProcess, client: httpx.Client, customer: str, protocol: str, temporality: str
) -> None:
    alias = f"{customer}-alias"
    with app(gateway, protocol, temporality, gzip=protocol == "http") as a:
        for _ in range(3):
            a.add("app.data.processed", 5, tenant=customer)
            a.add("app.data.processed", 2.5, tenant=alias, region="eu")
            a.add("app.data.processed", 0.5, tenant=alias, region="eu")
            a.add("app.data.processed", 1000, tenant="nobody-we-know")  # rejected, not counted
            assert a.flush()
        assert a.flush()  # nothing new: cumulative re-sends its totals, delta sends nothing
        a.add("app.data.processed", 7, tenant=customer)
        assert a.close() == 0  # shutdown exports the last 7
    assert total(client, customer) == Decimal("31")  # 3 × (5 + 2.5 + 0.5) + 7


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_app_restart_is_counted_once(
    gateway: GatewayProcess, client: httpx.Client, customer: str, protocol: str
) -> None:
    # Cumulative: the second run starts over from 0 with a new start time; its first point is
    # a true start (whole value is the delta) and the first run's total is not counted again.
    for amount in (10, 4, 6):
        with app(gateway, protocol, "cumulative") as a:
            a.add("app.data.processed", amount, tenant=customer)
            assert a.flush()
            assert a.flush()
            assert a.close() == 0
    assert total(client, customer) == Decimal("20")


@pytest.mark.parametrize("temporality", TEMPORALITIES)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_histograms_count_and_sum(
    gateway: GatewayProcess, client: httpx.Client, customer: str, protocol: str, temporality: str
) -> None:
    with app(gateway, protocol, temporality) as a:
        for value in (100, 250, 50):
            a.add("app.requests.duration", value, "histogram", tenant=customer)
            a.add("app.request.size", value, "histogram", tenant=customer)
        assert a.flush()
        a.add("app.requests.duration", 1, "histogram", tenant=customer)
        a.add("app.request.size", 1000, "histogram", tenant=customer)
        assert a.flush()
        assert a.close() == 0
    # only .count of the duration and .sum of the size are mapped; the other halves are
    # neither billed nor rejected
    assert total(client, customer, "api-calls") == 4
    assert total(client, customer, "request-bytes") == 1400


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_gauges_are_levels_and_updown_counters_changes(
    gateway: GatewayProcess, client: httpx.Client, customer: str, protocol: str
) -> None:
    with app(gateway, protocol, "cumulative") as a:
        a.add("app.seats", 12, "gauge", tenant=customer)
        a.add("app.storage", 40, "updown", tenant=customer)
        assert a.flush()
        a.add("app.seats", 9, "gauge", tenant=customer)
        a.add("app.storage", -15, "updown", tenant=customer)
        assert a.flush()
        assert a.close() == 0
    # the last gauge sample is the level (never a sum of samples)
    assert level(client, customer, "seats") == 9
    # the up-down counter's running total becomes changes: +40 then -15
    assert sorted(raw_values(client, customer, "storage")) == [Decimal(-15), Decimal(40)]


@pytest.mark.parametrize("temporality", TEMPORALITIES)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_gateway_killed_between_exports_loses_and_duplicates_nothing(
    tmp_path: Path, protocol: str, temporality: str
) -> None:
    gw = GatewayProcess(tmp_path, gateway_config()).start()
    try:
        with app(gw, protocol, temporality) as a:
            a.add("app.data.processed", 7, tenant="acme")
            assert a.flush()
            gw.kill()
            gw.start()
            a.add("app.data.processed", 3, tenant="acme")
            a.add("app.data.processed", 1, tenant="dumm-ai")
            assert a.flush()
            gw.kill()
            gw.start()
            assert a.flush()  # cumulative: the same totals again, after the crash
            a.add("app.data.processed", 0.5, tenant="acme")
            assert a.flush()
            assert a.close() == 0
        with gw.client() as c:
            assert total(c, "acme") == Decimal("10.5")
            assert total(c, "dumm-ai") == Decimal("1")
    finally:
        gw.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_export_failing_while_gateway_is_down_is_made_up_by_cumulative(
    tmp_path: Path, protocol: str
) -> None:
    gw = GatewayProcess(tmp_path, gateway_config()).start()
    try:
        with app(gw, protocol, "cumulative", timeout_s=2.0) as a:
            a.add("app.data.processed", 4, tenant="acme")
            assert a.flush()
            gw.kill()
            a.add("app.data.processed", 6, tenant="acme")
            assert not a.flush()  # the exporter gives up: nobody is listening
            gw.start()
            assert a.flush()  # the running total carries the 6 the failed export lost
            assert a.close() == 0
        with gw.client() as c:
            assert total(c, "acme") == Decimal("10")
    finally:
        gw.stop()
