"""exporters/usage.py: the app-side UsageMeter, run in its own process against a gateway."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from exporters.usage import UsageMeter, _amount, gateway_rules
from tests.exporters.otlp_app import AppProcess, gateway_config
from tests.gatewayproc import INGEST_KEY, GatewayProcess
from tests.helpers import total


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(Path(tmp_path_factory.mktemp("usage")), gateway_config()).start()
    yield gw
    assert gw.stop() == 0, gw.log()


@pytest.mark.parametrize("temporality", ["delta", "cumulative"])
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_usage_meter_totals(
    gateway: GatewayProcess, client: httpx.Client, customer: str, protocol: str, temporality: str
) -> None:
    endpoint = f"http://{gateway.otlp_grpc}" if protocol == "grpc" else gateway.otlp_http
    with AppProcess(protocol, endpoint, INGEST_KEY, temporality, mode="helper") as app:
        app.record("data-processed", 3, customer)
        app.record("data-processed", "0.5", customer)
        app.record("data-processed", 2, f"{customer}-alias")
        assert app.flush()
        app.record("data-processed", 4, customer)
        assert app.close() == 0  # shutdown flushes the last 4
    assert total(client, customer) == Decimal("9.5")


def test_flush_says_when_the_gateway_did_not_take_it(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path, gateway_config()).start()
    endpoint = f"http://{gw.otlp_grpc}"
    gw.stop()
    with AppProcess("grpc", endpoint, INGEST_KEY, mode="helper", timeout_s=1.0) as app:
        app.record("data-processed", 1, "acme")
        assert not app.flush()
        app.proc.kill()


def test_wrong_key_fails_the_flush(gateway: GatewayProcess) -> None:
    endpoint = f"http://{gateway.otlp_grpc}"
    with AppProcess("grpc", endpoint, "not-a-key-0123456789", mode="helper") as app:
        app.record("data-processed", 1, "acme")
        assert not app.flush()
        app.proc.kill()


def test_gateway_rules_match_the_meter_metric_names() -> None:
    rules = gateway_rules(["data-processed"])
    configured = [r for r in gateway_config()["rules"] if r["match"]["metric"].startswith("usage.")]
    assert rules == configured


@pytest.mark.parametrize(
    ("value", "expected"),
    [(3, 3), (0.5, 0.5), (Decimal("2"), 2), (Decimal("2.5"), 2.5), ("7", 7), ("0.25", 0.25)],
)
def test_amounts(value: object, expected: float) -> None:
    got = _amount(value)  # type: ignore[arg-type]
    assert got == expected
    assert type(got) is type(expected)


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), Decimal("NaN"), "-0.5"])
def test_bad_amounts_raise(value: object) -> None:
    with pytest.raises(ValueError, match="usage must"):
        _amount(value)  # type: ignore[arg-type]


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="temporality"):
        UsageMeter(temporality="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="protocol"):
        UsageMeter(protocol="carrier-pigeon")  # type: ignore[arg-type]
