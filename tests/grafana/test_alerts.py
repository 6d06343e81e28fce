"""The alert rules load in Prometheus's own checker, and promtool's unit tests show every alert
firing and not firing on synthetic series; a weakened rule makes those unit tests fail."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from tests.grafana.dashboard_queries import RULES

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
RULE_TESTS = RULES.with_name("meter-gateway.rules.test.yml")


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def alert_names(rules_file: Path) -> set[str]:
    groups = yaml.safe_load(rules_file.read_text())["groups"]
    return {r["alert"] for g in groups for r in g["rules"] if "alert" in r}


def test_check_rules() -> None:
    r = promtool("check", "rules", str(RULES), cwd=RULES.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 8 rules found" in r.stdout


def test_unit_tests_pass() -> None:
    r = promtool("test", "rules", RULE_TESTS.name, cwd=RULES.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_is_shown_firing_and_not_firing() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", ()):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = alert_names(RULES)
    assert names == fired, f"never shown firing: {names - fired}"
    assert names == quiet, f"never shown quiet: {names - quiet}"


def test_a_weakened_rule_fails_the_unit_tests(tmp_path: Path) -> None:
    """The unit tests pin the thresholds: moving one makes promtool report the difference."""
    rules = RULES.read_text()
    for old, new in (
        ("(meter_gateway_meter_usage_ratio) >= 0.8", "(meter_gateway_meter_usage_ratio) >= 0.9"),
        ("> 0.05\n", "> 0.5\n"),
        ("[1h] offset 15m)) > 0", "[1h] offset 15m)) > 1000"),
    ):
        assert old in rules
        (tmp_path / RULES.name).write_text(rules.replace(old, new))
        shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
        r = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
        assert r.returncode != 0, f"still passes with {new!r}"
        assert "FAILED" in r.stdout + r.stderr
