"""Config: validated once, every error with its path; one YAML file per invalid case."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError

from meter_gateway.config import (
    NEW_DEFINITION,
    OVERRIDES,
    ConfigError,
    Customer,
    Dimension,
    IngestConfig,
    Offering,
    format_duration,
    load_config,
    parse_config,
    parse_duration,
)
from meter_gateway.pipeline.admission import EXPANSION, Budget

TESTDATA = Path(__file__).parent / "testdata" / "config"
ROOT = Path(__file__).parent.parent
UPDATE_GOLDEN = os.environ.get("METER_GATEWAY_UPDATE_GOLDEN") == "1"


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


# --- invalid documents: one YAML per case, its expected lines beside it ----------------------

CASES = sorted(p.stem for p in TESTDATA.glob("*.yaml"))


@pytest.mark.parametrize("case", CASES)
def test_invalid_config_reports_every_error_in_one_pass(case: str) -> None:
    """``<case>.yaml`` → exactly the lines in ``<case>.errors`` (regenerate with
    METER_GATEWAY_UPDATE_GOLDEN=1 and review the diff)."""
    got = "".join(f"{line}\n" for line in errors_of(f"{case}.yaml"))
    golden = TESTDATA / f"{case}.errors"
    if UPDATE_GOLDEN:
        golden.write_text(got, encoding="utf-8")
    assert got == golden.read_text(encoding="utf-8"), (
        f"{golden.name} differs: METER_GATEWAY_UPDATE_GOLDEN=1 and review the diff"
    )


def test_one_pass_holds_every_kind_of_error() -> None:
    """The headline case, spelled out: nothing waits for another error to be fixed first."""
    errs = errors_of("one_pass.yaml")
    paths = [line.partition(": ")[0] for line in errs]
    assert paths == [
        "store.url",  # unset variables, all of them
        "receivers.prometheus.headers.Authorization",
        "server.htttp",  # schema
        "ingest.dedup_window",
        "dimensions.0.unit",  # template/unit mismatch
        "dimensions.1",  # model rule
        "offerings.0.currency",  # ISO 4217
        "customers.0.aliases",  # alias equal to its own id
        "offerings.0.charges.0.dimension",  # references
        "customers.0.offering",
        "auth.api_keys.0.key_env",  # key_env unset
    ]
    assert all(len(line.splitlines()) == 1 for line in errs)


def test_an_unset_variable_is_reported_once_not_again_as_the_empty_value() -> None:
    errs = errors_of("missing_env.yaml")
    assert sum("store.url" in line for line in errs) == 1


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


def _check_config(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meter_gateway", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": os.environ.get("PATH", ""), **env},
        timeout=60,
    )


def test_check_config_command_prints_every_error_and_exits_2() -> None:
    bad = _check_config(TESTDATA / "one_pass.yaml", {})
    assert bad.returncode == 2
    expected = (TESTDATA / "one_pass.errors").read_text(encoding="utf-8").splitlines()
    assert bad.stderr.splitlines() == [f"{TESTDATA / 'one_pass.yaml'}: {e}" for e in expected]
    good = _check_config(ROOT / "examples" / "getting-started.yaml", {"METER_ADMIN_KEY": "k" * 20})
    assert good.returncode == 0, good.stderr
    assert good.stdout.endswith("OK (1 dimensions, 1 offerings, 1 customers)\n"), good.stdout


def test_check_config_reads_the_overriding_environment_too() -> None:
    run = _check_config(
        ROOT / "examples" / "getting-started.yaml",
        {"METER_ADMIN_KEY": "k" * 20, "METER_GATEWAY_STORE_URL": "mysql://db"},
    )
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        f"{ROOT / 'examples' / 'getting-started.yaml'}: store.url (from METER_GATEWAY_STORE_URL): "
        "'mysql://db': expected sqlite:///path or postgresql://..."
    ]


# --- precedence: argument > environment > file > default --------------------------------------


@pytest.mark.parametrize(
    ("argument", "env", "expected"),
    [
        ("0.0.0.0:1", "0.0.0.0:2", "0.0.0.0:1"),
        (None, "0.0.0.0:2", "0.0.0.0:2"),
        (None, None, "127.0.0.1:9999"),
        (None, "", "127.0.0.1:9999"),  # an empty variable is not a setting
    ],
)
def test_overrides_precedence(argument: str | None, env: str | None, expected: str) -> None:
    environ = {} if env is None else {"METER_GATEWAY_HTTP_LISTEN": env}
    text = "server: {http: {listen: '127.0.0.1:9999'}}"
    config = parse_config(text, environ, {"server.http.listen": argument})
    assert config.server.http.listen == expected


def test_overrides_fill_a_document_without_the_section_and_leave_the_rest() -> None:
    environ = {"METER_GATEWAY_STORE_URL": "sqlite:////data/gw.db"}
    config = parse_config("", environ, {"server.otlp_grpc.listen": "0.0.0.0:4317"})
    assert config.store.url == "sqlite:////data/gw.db"
    assert config.server.otlp_grpc.listen == "0.0.0.0:4317"
    assert config.server.otlp_http.listen == "127.0.0.1:4318"  # default
    assert config.server.otlp_grpc.enabled


def test_a_bad_override_names_where_it_came_from() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config("", {}, {"server.http.listen": "nohost"})
    assert exc.value.errors == [
        "server.http.listen (from --http-listen): 'nohost' is not host:port"
    ]


def test_every_override_names_a_setting_of_the_model() -> None:
    config = parse_config("", {})
    for o in OVERRIDES:
        node: object = config
        for key in o.path.split("."):
            node = getattr(node, key)
        assert isinstance(node, str), o.path
        assert o.env.startswith("METER_GATEWAY_")
        assert o.option.startswith("--")


# --- durations print as written -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (timedelta(days=35), "35d"),
        (timedelta(minutes=5), "5m"),
        (timedelta(minutes=90), "1h30m"),
        (timedelta(seconds=90), "1m30s"),
        (timedelta(milliseconds=250), "250ms"),
        (timedelta(), "0s"),
        (timedelta(weeks=1), "7d"),
    ],
)
def test_format_duration(value: timedelta, text: str) -> None:
    assert format_duration(value) == text
    assert parse_duration(text) == value


def test_default_limits_print_as_the_spec_writes_them() -> None:
    ingest = parse_config("", {}).ingest
    assert format_duration(ingest.late_arrival_limit) == "35d"
    assert format_duration(ingest.future_tolerance) == "5m"


# --- definitions already stored still load ------------------------------------------------------


def test_checks_for_new_definitions_spare_what_the_store_already_holds() -> None:
    """A catalog written before these checks (a pod-time dimension labelled ``second``, an
    alias equal to its id, a code ISO 4217 no longer lists) must still load at start-up."""
    stored_dim = {
        "id": "pods",
        "name": "Pods",
        "measurement": "kubernetes-pod-compute-time",
        "unit": "second",
    }
    assert Dimension.model_validate(stored_dim).unit == "second"
    assert Offering.model_validate({"id": "o", "name": "O", "currency": "SVC"}).currency == "SVC"
    customer = {"id": "acme", "name": "Acme", "aliases": ["acme"]}
    assert Customer.model_validate(customer).aliases == ("acme",)
    for model, body in ((Dimension, stored_dim), (Customer, customer)):
        with pytest.raises(ValidationError):
            model.model_validate(body, context=NEW_DEFINITION)
    with pytest.raises(ValidationError, match="unknown currency 'SVC'"):
        Offering.model_validate({"id": "o", "name": "O", "currency": "SVC"}, context=NEW_DEFINITION)


def test_the_default_budget_takes_the_largest_default_body_alone() -> None:
    # a body larger than ingest.max_inflight_bytes is refused 413 whatever the load; by default
    # every body within max_body_bytes can be admitted (alone when its estimate exceeds the budget)
    ingest = IngestConfig()
    assert ingest.max_body_bytes <= ingest.max_inflight_bytes
    budget = Budget(ingest.max_inflight_bytes, 1.0)
    largest = ingest.max_body_bytes
    with budget.reserve(largest * EXPANSION, wire_bytes=largest) as r:
        assert r.nbytes == largest * EXPANSION
