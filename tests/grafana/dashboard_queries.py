"""What Grafana would send to Prometheus for a dashboard: every panel target's and every query
variable's PromQL, with template variables and ``$__`` macros expanded the way Grafana's
Prometheus data source does it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parent.parent.parent
DASHBOARD_DIR = ROOT / "grafana_dashboards"
RULES = DASHBOARD_DIR / "alerts" / "meter-gateway.rules.yml"
ALL = ".*"  # the variables' allValue

LABEL_VALUES = re.compile(r"^label_values\((?P<match>.+),\s*(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)\)$")
METRIC = re.compile(r"\bmeter_gateway_[a-zA-Z0-9_]+")
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def load_dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARD_DIR.glob("*.json"))}


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref: str
    expr: str
    instant: bool


@dataclass(frozen=True)
class VariableQuery:
    dashboard: str
    name: str
    match: str  # the series selector of label_values(match, label)
    label: str
    multi: bool


def panel_queries(name: str, dashboard: Mapping[str, Any]) -> Iterator[PanelQuery]:
    for panel in dashboard["panels"]:
        for t in panel.get("targets", ()):
            yield PanelQuery(name, panel["title"], t["refId"], t["expr"], bool(t.get("instant")))


def variable_queries(name: str, dashboard: Mapping[str, Any]) -> Iterator[VariableQuery]:
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = LABEL_VALUES.match(var["query"])
        assert m, f"{name} ${var['name']}: only label_values(...) is supported: {var['query']}"
        yield VariableQuery(name, var["name"], m["match"], m["label"], bool(var.get("multi")))


def all_exprs(dashboard: Mapping[str, Any]) -> list[str]:
    exprs = [q.expr for q in panel_queries("", dashboard)]
    exprs += [q.match for q in variable_queries("", dashboard)]
    return exprs


def regex_escape(value: str) -> str:
    """Grafana's ``prometheusSpecialRegexEscape`` for multi-value variables."""
    value = value.replace("\\", "\\\\\\\\")
    return re.sub(r"[$^*{}\[\]'+?.()|]", lambda m: "\\\\" + m.group(0), value)


def variable_text(value: str | None, multi: bool) -> str:
    """A selected value as Grafana writes it into the query (``None``: "All")."""
    if value is None:
        return ALL
    return regex_escape(value) if multi else value


def nice_interval(seconds: float) -> float:
    """Grafana's ``roundInterval`` for the intervals a test uses (≤ 1 minute)."""
    for limit, rounded in (
        (0.015, 0.01),
        (0.035, 0.02),
        (0.075, 0.05),
        (0.15, 0.1),
        (0.35, 0.2),
        (0.75, 0.5),
        (1.5, 1),
        (3.5, 2),
        (7.5, 5),
        (12.5, 10),
        (17.5, 15),
        (25, 20),
        (45, 30),
        (90, 60),
    ):
        if seconds < limit:
            return rounded
    raise ValueError(f"interval {seconds}s is outside what this helper rounds")


def macros(range_s: int, scrape_s: int, max_data_points: int = 1000) -> dict[str, str]:
    """``$__interval``: range ÷ data points, rounded, at least the scrape interval (the data
    source's ``timeInterval``); ``$__rate_interval``: max(interval + scrape, 4 × scrape)."""
    interval = max(float(scrape_s), nice_interval(range_s / max_data_points))
    rate_interval = max(interval + scrape_s, 4 * scrape_s)
    return {
        "__interval": f"{int(interval)}s",
        "__interval_ms": str(int(interval * 1000)),
        "__rate_interval": f"{int(rate_interval)}s",
        "__range": f"{range_s}s",
        "__range_s": str(range_s),
        "__range_ms": str(range_s * 1000),
    }


def expand(expr: str, values: Mapping[str, str]) -> str:
    """Substitute ``$name`` and ``${name}``; an unknown variable is an error, not a blank."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return values[name]

    return VARIABLE.sub(sub, expr)


def metric_names(expr: str) -> set[str]:
    return set(METRIC.findall(expr))
