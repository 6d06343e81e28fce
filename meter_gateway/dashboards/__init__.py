"""The gateway's Grafana dashboards, defined as code: the one source of ``grafana_dashboards/``.

``build_all()`` returns each dashboard's JSON by file name; ``render()`` is the exact text of
the committed files (``meter-gateway dashboards export`` writes them); ``push`` (in
``meter_gateway.dashboards.push``) uploads them to a running Grafana. They ship in the wheel,
so an installed gateway can push its dashboards without a source checkout.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from meter_gateway.dashboards import health, margin, usage
from meter_gateway.dashboards._grafana import JSON

BUILDERS: dict[str, Callable[[], JSON]] = {
    "usage-monitoring.json": usage.build,
    "profit-margin.json": margin.build,
    "gateway-health.json": health.build,
}


def build_all() -> dict[str, JSON]:
    return {name: build() for name, build in BUILDERS.items()}


def render(dashboard: JSON) -> str:
    """Stable text: two-space indent, keys in definition order, non-ASCII kept, final newline."""
    return json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n"


def export(directory: Path) -> list[Path]:
    """Write every dashboard into ``directory``; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, dash in build_all().items():
        path = directory / name
        path.write_text(render(dash), encoding="utf-8")
        written.append(path)
    return written
