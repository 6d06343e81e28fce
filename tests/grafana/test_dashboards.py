"""The committed dashboards are exactly what the code builds, and they are valid Grafana
classic dashboard JSON: checked against the pinned grafana-foundation-sdk models (every key
must survive a decode/encode through the typed models) and structurally against the schema's
rules (required keys, no unknown top-level keys, grid, stable uids).
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard

from meter_gateway.dashboards import build_all, render
from tests.grafana.dashboard_queries import (
    DASHBOARD_DIR,
    all_exprs,
    expand,
    load_dashboards,
    macros,
    panel_queries,
    variable_queries,
)

BUILT = build_all()
UIDS = {
    "usage-monitoring.json": "meter-gateway-usage",
    "profit-margin.json": "meter-gateway-margin",
    "gateway-health.json": "meter-gateway-health",
}

# From Grafana's classic dashboard schema (draft-07, additionalProperties false everywhere).
DASHBOARD_KEYS = {
    "id", "uid", "title", "description", "revision", "gnetId", "tags", "timezone", "editable",
    "graphTooltip", "time", "timepicker", "fiscalYearStartMonth", "liveNow", "weekStart",
    "refresh", "schemaVersion", "version", "panels", "templating", "annotations", "links",
    "snapshot", "preload",
}  # fmt: skip
DASHBOARD_REQUIRED = {"schemaVersion", "templating", "annotations"}
PANEL_KEYS = {
    "type", "id", "pluginVersion", "targets", "title", "description", "transparent",
    "datasource", "gridPos", "links", "repeat", "repeatDirection", "maxPerRow", "maxDataPoints",
    "transformations", "interval", "timeFrom", "timeShift", "hideTimeOverride", "timeCompare",
    "libraryPanel", "cacheTimeout", "queryCachingTTL", "options", "fieldConfig",
}  # fmt: skip
ROW_KEYS = {"type", "collapsed", "title", "datasource", "gridPos", "id", "panels", "repeat"}
ROW_REQUIRED = {"type", "collapsed", "id", "panels"}
VARIABLE_KEYS = {
    "type", "name", "label", "hide", "skipUrlSync", "description", "query", "datasource",
    "current", "multi", "allowCustomValue", "options", "refresh", "sort", "includeAll",
    "allValue", "regex", "staticOptions", "staticOptionsOrder", "auto", "auto_min", "auto_count",
    "definition",
}  # fmt: skip
FIELD_CONFIG_KEYS = {
    "displayName", "displayNameFromDS", "description", "path", "writeable", "filterable", "unit",
    "decimals", "min", "max", "mappings", "thresholds", "color", "links", "actions", "noValue",
    "custom", "fieldMinMax",
}  # fmt: skip


def dropped_keys(before: Any, after: Any, path: str = "$") -> list[str]:
    """Paths present in ``before`` that are missing or changed in ``after``."""
    if isinstance(before, dict):
        if not isinstance(after, dict):
            return [path]
        out = []
        for k, v in before.items():
            out += [f"{path}.{k}"] if k not in after else dropped_keys(v, after[k], f"{path}.{k}")
        return out
    if isinstance(before, list):
        if not isinstance(after, list) or len(before) != len(after):
            return [path]
        return [
            p
            for i, (a, b) in enumerate(zip(before, after, strict=False))
            for p in dropped_keys(a, b, f"{path}[{i}]")
        ]
    return [] if before == after else [f"{path}: {before!r} became {after!r}"]


def sdk_roundtrip(dashboard: dict[str, Any]) -> dict[str, Any]:
    register_default_plugins()
    out: dict[str, Any] = json.loads(
        json.dumps(Dashboard.from_json(copy.deepcopy(dashboard)), cls=JSONEncoder)
    )
    return out


def test_committed_json_is_what_the_code_builds() -> None:
    """Regenerate with ``meter-gateway dashboards export --out grafana_dashboards``."""
    on_disk = {p.name for p in DASHBOARD_DIR.glob("*.json")}
    assert on_disk == set(BUILT)
    for name, dash in BUILT.items():
        assert (DASHBOARD_DIR / name).read_text(encoding="utf-8") == render(dash), name


@pytest.mark.parametrize("name", sorted(BUILT))
def test_every_key_is_known_to_the_sdk_models(name: str) -> None:
    assert dropped_keys(BUILT[name], sdk_roundtrip(BUILT[name])) == []


def test_the_sdk_check_catches_an_unknown_key() -> None:
    dash = json.loads(json.dumps(BUILT["gateway-health.json"]))
    dash["panels"][1]["fieldConfig"]["defaults"]["colour"] = {"mode": "fixed"}
    dash["panels"][1]["targets"][0]["datasource"]["name"] = "prom"
    dash["templating"]["list"][1]["refreshOnLoad"] = True
    assert len(dropped_keys(dash, sdk_roundtrip(dash))) == 3


@pytest.mark.parametrize("name", sorted(BUILT))
def test_structure(name: str) -> None:
    dash = BUILT[name]
    assert DASHBOARD_REQUIRED <= dash.keys() <= DASHBOARD_KEYS
    assert "id" not in dash  # Grafana assigns it; the uid identifies the dashboard
    assert dash["uid"] == UIDS[name]
    assert 8 <= len(dash["uid"]) <= 40
    assert isinstance(dash["schemaVersion"], int)
    assert dash["schemaVersion"] >= 39
    assert set(dash["annotations"]) == {"list"}
    assert set(dash["templating"]) == {"list"}
    assert set(dash["time"]) == {"from", "to"}

    variables = dash["templating"]["list"]
    for var in variables:
        assert {"type", "name"} <= var.keys() <= VARIABLE_KEYS, var
    [ds] = [v for v in variables if v["type"] == "datasource"]
    assert ds["name"] == "datasource"
    assert ds["query"] == "prometheus"
    for var in variables:
        if var["type"] == "query":
            assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}

    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dash["panels"]:
        g = panel["gridPos"]
        assert set(g) == {"h", "w", "x", "y"}
        assert g["x"] >= 0
        assert g["x"] + g["w"] <= 24
        mine = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            assert ROW_REQUIRED <= panel.keys() <= ROW_KEYS
            continue
        assert {"type"} <= panel.keys() <= PANEL_KEYS, panel["title"]
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults.keys() <= FIELD_CONFIG_KEYS
        assert defaults["unit"], f"{panel['title']}: no unit"
        steps = defaults["thresholds"]["steps"]
        assert steps[0]["value"] is None
        assert all(set(s) == {"value", "color"} for s in steps)
        values = [s["value"] for s in steps[1:]]
        assert values == sorted(values), f"{panel['title']}: thresholds out of order"
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        for t in panel["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]


@pytest.mark.parametrize("name", sorted(BUILT))
def test_every_query_expands_with_the_dashboards_own_variables(name: str) -> None:
    """No query refers to a variable the dashboard does not define."""
    dash = BUILT[name]
    values = {v["name"]: "x" for v in dash["templating"]["list"]} | macros(300, 15)
    for expr in all_exprs(dash):
        expand(expr, values)
    assert list(panel_queries(name, dash))
    assert list(variable_queries(name, dash))


SHARED_GAUGES = re.compile(
    r"meter_gateway_(?:period_\w+|meter_(?:value|capacity|usage_ratio)|wallet_balance\w*)"
)


@pytest.mark.parametrize("name", sorted(BUILT))
def test_replicated_gauges_are_deduplicated_with_max(name: str) -> None:
    """Every replica reports the same per-customer gauges (one shared store): each use must be
    wrapped in ``max by (...)`` (possibly through deriv) before any sum."""
    for expr in all_exprs(BUILT[name]):
        for m in SHARED_GAUGES.finditer(expr):
            before = expr[: m.start()]
            if before.startswith("label_values(") or before == "":
                continue  # a variable's series selector
            before = re.sub(r"deriv\($", "", before)
            assert re.search(r"max by \([a-z, ]+\) \($", before), expr


def test_loaded_dashboards_equal_the_built_ones() -> None:
    assert load_dashboards() == BUILT
