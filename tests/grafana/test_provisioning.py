"""Grafana file provisioning: the data source and dashboard provider files have the shape
Grafana's provisioning reads (``apiVersion: 1``; ``datasources:``; ``providers:`` of type file)
and agree with what ``dashboards push`` creates."""

from __future__ import annotations

from typing import Any

import yaml

from meter_gateway.dashboards.push import (
    DATASOURCE_NAME,
    DATASOURCE_UID,
    FOLDER_UID,
    datasource_body,
)
from tests.grafana.dashboard_queries import DASHBOARD_DIR

PROVISIONING = DASHBOARD_DIR / "provisioning"


def load(path: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((PROVISIONING / path).read_text())
    return data


def test_datasource_file() -> None:
    data = load("datasources/meter-gateway.yaml")
    assert data["apiVersion"] == 1
    [ds] = data["datasources"]
    assert ds["type"] == "prometheus"
    assert ds["access"] == "proxy"
    assert ds["url"] == "${PROMETHEUS_URL}"  # Grafana expands environment variables
    # The same data source push creates (name, uid, type, access, options).
    pushed = datasource_body("${PROMETHEUS_URL}", ds["jsonData"]["timeInterval"])
    assert {k: ds[k] for k in pushed} == pushed
    assert (ds["uid"], ds["name"]) == (DATASOURCE_UID, DATASOURCE_NAME)


def test_dashboard_provider_file() -> None:
    data = load("dashboards/meter-gateway.yaml")
    assert data["apiVersion"] == 1
    [provider] = data["providers"]
    assert provider["type"] == "file"
    assert provider["folderUid"] == FOLDER_UID
    assert provider["options"]["path"] == "${METER_GATEWAY_DASHBOARDS}"
    assert provider["options"]["foldersFromFilesStructure"] is False
    # The provider reads every *.json under the path: only dashboards may be there.
    assert {p.parent for p in DASHBOARD_DIR.rglob("*.json")} == {DASHBOARD_DIR}
