"""Small builders for Grafana's classic dashboard JSON (schemaVersion 41), Prometheus only.

Plain dicts, so the dashboards build from an installed wheel with no Grafana SDK present; the
test suite checks the output against the pinned ``grafana-foundation-sdk`` models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]

SCHEMA_VERSION = 41
DATASOURCE: JSON = {"type": "prometheus", "uid": "${datasource}"}
TAG = "meter-gateway"

GREEN, ORANGE, RED, BLUE = "green", "orange", "red", "blue"


def thresholds(base: str, *steps: tuple[float, str]) -> JSON:
    """Absolute thresholds: ``base`` below the first step, then each ``(value, color)``."""
    return {
        "mode": "absolute",
        "steps": [{"value": None, "color": base}] + [{"value": v, "color": c} for v, c in steps],
    }


NEUTRAL = thresholds(BLUE)


def target(
    expr: str, legend: str = "__auto", *, ref: str = "A", instant: bool = False, table: bool = False
) -> JSON:
    """One PromQL query; ``instant`` for stat, bar gauge and table panels (value at "now")."""
    return {
        "refId": ref,
        "datasource": dict(DATASOURCE),
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend,
        "range": not instant,
        "instant": instant,
        "format": "table" if table else "time_series",
    }


def _field_config(
    unit: str, th: JSON, *, decimals: int | None, lo: float | None, hi: float | None, **extra: Any
) -> JSON:
    defaults: JSON = {"unit": unit, "thresholds": th, "color": {"mode": "thresholds"}}
    if decimals is not None:
        defaults["decimals"] = decimals
    if lo is not None:
        defaults["min"] = lo
    if hi is not None:
        defaults["max"] = hi
    defaults.update(extra)
    return {"defaults": defaults, "overrides": []}


def timeseries(
    title: str,
    description: str,
    targets: Sequence[JSON],
    *,
    unit: str = "short",
    th: JSON = NEUTRAL,
    decimals: int | None = None,
    lo: float | None = None,
    hi: float | None = None,
    stack: bool = False,
) -> JSON:
    fc = _field_config(unit, th, decimals=decimals, lo=lo, hi=hi)
    fc["defaults"]["color"] = {"mode": "palette-classic"}
    fc["defaults"]["custom"] = {
        "drawStyle": "line",
        "lineWidth": 1,
        "fillOpacity": 20 if stack else 10,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        # Lines only where a threshold means something (set beyond the neutral base).
        "thresholdsStyle": {"mode": "line" if len(th["steps"]) > 1 else "off"},
    }
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": dict(DATASOURCE),
        "targets": list(targets),
        "fieldConfig": fc,
        "options": {
            "legend": {
                "displayMode": "table",
                "placement": "bottom",
                "showLegend": True,
                "calcs": ["lastNotNull", "max"],
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def _reduce() -> JSON:
    return {"calcs": ["lastNotNull"], "fields": "", "values": False}


def stat(
    title: str,
    description: str,
    targets: Sequence[JSON],
    *,
    unit: str = "short",
    th: JSON = NEUTRAL,
    decimals: int | None = None,
) -> JSON:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": dict(DATASOURCE),
        "targets": list(targets),
        "fieldConfig": _field_config(unit, th, decimals=decimals, lo=None, hi=None),
        "options": {
            "reduceOptions": _reduce(),
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "textMode": "auto",
            "orientation": "auto",
        },
    }


def bargauge(
    title: str,
    description: str,
    targets: Sequence[JSON],
    *,
    unit: str = "short",
    th: JSON = NEUTRAL,
    decimals: int | None = None,
    lo: float | None = 0,
    hi: float | None = None,
) -> JSON:
    return {
        "type": "bargauge",
        "title": title,
        "description": description,
        "datasource": dict(DATASOURCE),
        "targets": list(targets),
        "fieldConfig": _field_config(unit, th, decimals=decimals, lo=lo, hi=hi),
        "options": {
            "reduceOptions": _reduce(),
            "displayMode": "gradient",
            "orientation": "horizontal",
            "showUnfilled": True,
            "valueMode": "color",
        },
    }


def table(
    title: str,
    description: str,
    targets: Sequence[JSON],
    columns: dict[str, str],
    *,
    sort_by: str | None = None,
    descending: bool = True,
    decimals: int | None = None,
) -> JSON:
    """Instant queries in table format, one row per label set, merged into one table.

    ``columns`` renames ``Value #<refId>`` to a readable header. No per-column units: the
    dashboard schema types override values as objects, so the header carries the unit.
    """
    fc = _field_config("short", NEUTRAL, decimals=decimals, lo=None, hi=None)
    options: JSON = {"showHeader": True, "cellHeight": "sm"}
    if sort_by:
        options["sortBy"] = [{"displayName": sort_by, "desc": descending}]
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": dict(DATASOURCE),
        "targets": list(targets),
        "fieldConfig": fc,
        "options": options,
        "transformations": [
            {"id": "merge", "options": {}},
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True},
                    "renameByName": {f"Value #{ref}": name for ref, name in columns.items()},
                },
            },
        ],
    }


def row(title: str) -> JSON:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


@dataclass
class Layout:
    """Places panels left to right on Grafana's 24-column grid; a row starts a new line."""

    panels: list[JSON] = field(default_factory=list)
    _x: int = 0
    _y: int = 0
    _line_h: int = 0

    def row(self, title: str) -> None:
        self._newline()
        self._put(row(title), 24, 1)
        self._newline()

    def add(self, panel: JSON, w: int, h: int = 8) -> None:
        if self._x + w > 24:
            self._newline()
        self._put(panel, w, h)

    def _put(self, panel: JSON, w: int, h: int) -> None:
        grid = {"h": h, "w": w, "x": self._x, "y": self._y}
        placed = {"id": len(self.panels) + 1, "gridPos": grid}
        self.panels.append({"type": panel["type"], "title": panel["title"], **placed, **panel})
        self._x += w
        self._line_h = max(self._line_h, h)

    def _newline(self) -> None:
        self._y += self._line_h
        self._x = 0
        self._line_h = 0


def datasource_variable() -> JSON:
    """The Prometheus data source every panel uses; Grafana preselects the default one."""
    return {
        "type": "datasource",
        "name": "datasource",
        "label": "Prometheus",
        "query": "prometheus",
        "refresh": 1,
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "regex": "",
        "options": [],
    }


def query_variable(
    name: str, label: str, metric: str, *, multi: bool = True, description: str = ""
) -> JSON:
    """A ``label_values(metric, name)`` variable, refreshed when the time range changes.

    Multi-value variables offer "All" as ``.*`` (not an alternation of every value), so panels
    filter with ``name=~"$name"`` and stay short with thousands of customers.
    """
    query = f"label_values({metric}, {name})"
    var: JSON = {
        "type": "query",
        "name": name,
        "label": label,
        "description": description,
        "datasource": dict(DATASOURCE),
        "query": query,
        "refresh": 2,
        "sort": 1,
        "hide": 0,
        "regex": "",
        "multi": multi,
        "includeAll": multi,
        "options": [],
    }
    if multi:
        var["allValue"] = ".*"
    return var


ANNOTATIONS: JSON = {
    "list": [
        {
            "builtIn": 1,
            "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True,
            "hide": True,
            "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts",
            "type": "dashboard",
        }
    ]
}


def dashboard(
    *,
    uid: str,
    title: str,
    description: str,
    layout: Layout,
    variables: Sequence[JSON],
    time_from: str = "now-24h",
    refresh: str = "30s",
) -> JSON:
    """A dashboard without ``id`` (Grafana assigns one; the ``uid`` identifies it)."""
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": [TAG],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "refresh": refresh,
        "time": {"from": time_from, "to": "now"},
        "schemaVersion": SCHEMA_VERSION,
        "links": [
            {
                "title": "Meter gateway",
                "type": "dashboards",
                "tags": [TAG],
                "asDropdown": True,
                "includeVars": False,
                "keepTime": True,
                "targetBlank": False,
                "icon": "external link",
                "tooltip": "",
                "url": "",
            }
        ],
        "annotations": ANNOTATIONS,
        "templating": {"list": [datasource_variable(), *variables]},
        "panels": layout.panels,
    }
