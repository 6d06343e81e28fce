"""Config: validated once, every error with its path; one YAML file per invalid case."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from meter_gateway.config import ConfigError, load_config, parse_config, parse_duration

TESTDATA = Path(__file__).parent / "testdata" / "config"
ROOT = Path(__file__).parent.parent


def errors_of(name: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_config(TESTDATA / name, environ or {})
    return exc.value.errors


def test_defaults_without_a_file() -> None:
    c = load_config(None, {})
    assert c.server.http.listen == "127.0.0.1:8080"
    assert c.server.otlp_grpc.listen == "127.0.0.1:4317"
    assert c.server.otlp_http.listen == "127.0.0.1:4318"
    assert c.store.url == "sqlite:///./meter-gateway.db"
    assert c.ingest.dedup_window == timedelta(days=35)
    assert c.ingest.late_arrival_limit == timedelta(days=35)
    assert c.ingest.future_tolerance == timedelta(minutes=5)


def test_the_spec_example_and_the_getting_started_example_load() -> None:
    c = load_config(ROOT / "examples" / "getting-started.yaml", {"METER_ADMIN_KEY": "k" * 20})
    assert c.customers[0].aliases == ("dumm-ai-prod",)
    assert c.dimensions[0].price == Decimal("0.08")
    spec = load_config(
        ROOT / "examples" / "full.yaml", {"METER_INGEST_KEY": "k" * 20, "PROM_TOKEN": "t"}
    )
    assert spec.receivers.prometheus is not None
    assert spec.receivers.prometheus.headers == {"Authorization": "Bearer t"}
    assert spec.rules[0].scale == Decimal(1)


def test_unknown_keys_are_errors_with_their_path() -> None:
    assert errors_of("unknown_key.yaml") == ["server.htttp: unknown key"]


def test_the_http_api_cannot_be_turned_off() -> None:
    (err,) = errors_of("http_disabled.yaml")
    assert err.startswith("server.http: ")
    assert "cannot be disabled" in err


def test_every_bad_value_is_reported_at_once() -> None:
    errs = "\n".join(errors_of("bad_values.yaml"))
    assert "ingest.dedup_window: '35 days' is not a duration" in errs
    assert "store.url: 'mysql://x': expected sqlite:///path or postgresql://" in errs
    assert "dimensions.0.aggregation" in errs
    assert "'median'" in errs
    assert "dimensions.1: aggregation unique_count needs unique_key" in errs
    assert "dimensions.2: usage_increment must be > 0" in errs


def test_references_are_checked() -> None:
    errs = "\n".join(errors_of("bad_references.yaml"))
    assert "dimensions.1.id: duplicate id 'data'" in errs
    assert "offerings.0.charges.0.dimension: unknown dimension 'nope'" in errs
    assert "customers.0.offering: unknown offering 'missing'" in errs
    assert "customers.1.aliases: 'shared' already names 'c1'" in errs
    assert "rules.0.dimension: unknown dimension 'ghost'" in errs


def test_tiers_must_end_unbounded() -> None:
    errs = "\n".join(errors_of("bad_tiers.yaml"))
    assert "offerings.0.charges.0" in errs
    assert "only the last tier is unbounded" in errs


def test_env_references_and_key_env_must_be_set() -> None:
    errs = errors_of("missing_env.yaml")
    assert errs == [
        "receivers.prometheus.headers.Authorization: environment variable "
        "METER_TEST_UNSET_TOKEN is not set"
    ]
    errs = errors_of("missing_env.yaml", {"METER_TEST_UNSET_TOKEN": "x"})
    assert errs == [
        "auth.api_keys.0: environment variable METER_TEST_UNSET_KEY (key_env) is not set"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("5m", timedelta(minutes=5)),
        ("24h", timedelta(hours=24)),
        ("35d", timedelta(days=35)),
        ("1h30m", timedelta(minutes=90)),
        (120, timedelta(minutes=2)),
    ],
)
def test_durations(text: str | int, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "5 m", "m5", "1y", "-5m", "1.5h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_yaml_syntax_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="<yaml>"):
        parse_config("server: [unclosed", {})


def test_check_config_command_prints_errors_and_exits_nonzero(tmp_path: Path) -> None:
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "meter_gateway",
            "check-config",
            "--config",
            str(TESTDATA / "bad_references.yaml"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "unknown dimension 'nope'" in bad.stderr
    good = subprocess.run(
        [
            sys.executable,
            "-m",
            "meter_gateway",
            "check-config",
            "--config",
            str(ROOT / "examples" / "getting-started.yaml"),
        ],
        capture_output=True,
        text=True,
        env={"METER_ADMIN_KEY": "k" * 20, "PATH": ""},
    )
    assert good.returncode == 0, good.stderr
    assert "OK" in good.stdout
