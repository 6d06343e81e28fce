"""Create or update the dashboards (and optionally their Prometheus data source) in a running
Grafana through its HTTP API, with ``grafana-client``.

Idempotent: the folder and data source are looked up by uid and created only when missing;
dashboards are saved by uid with ``overwrite``, so pushing again updates them in place.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from grafana_client.api import GrafanaApi
from grafana_client.client import GrafanaClientError

from meter_gateway import __version__
from meter_gateway.dashboards import build_all
from meter_gateway.dashboards._grafana import JSON

DATASOURCE_UID = "meter-gateway-prometheus"
DATASOURCE_NAME = "Prometheus (meter-gateway)"
FOLDER_UID = "meter-gateway"
FOLDER_TITLE = "Meter gateway"


@dataclass(frozen=True, slots=True)
class Pushed:
    uid: str
    title: str
    url: str
    version: int | None


def datasource_body(url: str, scrape_interval: str) -> JSON:
    """The data source as ``POST /api/datasources`` takes it (same as the provisioning file)."""
    return {
        "name": DATASOURCE_NAME,
        "uid": DATASOURCE_UID,
        "type": "prometheus",
        "access": "proxy",
        "url": url,
        "isDefault": False,
        "jsonData": {"timeInterval": scrape_interval, "httpMethod": "POST"},
    }


def _missing(exc: GrafanaClientError) -> bool:
    return getattr(exc, "status_code", None) == 404


def _select_datasource(dashboard: JSON, uid: str, name: str) -> JSON:
    """Open the dashboard on the given data source instead of Grafana's default one."""
    dashboard = copy.deepcopy(dashboard)
    for var in dashboard["templating"]["list"]:
        if var["type"] == "datasource":
            var["current"] = {"text": name, "value": uid}
    return dashboard


def push(
    url: str,
    token: str | None,
    *,
    folder_uid: str = FOLDER_UID,
    folder_title: str = FOLDER_TITLE,
    datasource_url: str | None = None,
    scrape_interval: str = "15s",
    timeout: float = 30.0,
) -> list[Pushed]:
    """Push every dashboard into ``folder_uid`` (created if missing); with ``datasource_url``,
    also create or update the Prometheus data source and open the dashboards on it.

    ``token`` is a Grafana service-account token (sent as ``Authorization: Bearer``); without
    one, credentials in the URL (``https://user:password@grafana``) are used as Basic auth.
    Raises ``grafana_client.client.GrafanaException`` subclasses on API errors.
    """
    api = GrafanaApi.from_url(url, credential=token, timeout=timeout)
    try:
        api.folder.get_folder(folder_uid)
    except GrafanaClientError as exc:
        if not _missing(exc):
            raise
        api.folder.create_folder(folder_title, uid=folder_uid)

    dashboards = build_all()
    if datasource_url is not None:
        body = datasource_body(datasource_url, scrape_interval)
        try:
            api.datasource.get_datasource_by_uid(DATASOURCE_UID)
        except GrafanaClientError as exc:
            if not _missing(exc):
                raise
            api.datasource.create_datasource(body)
        else:
            api.datasource.update_datasource_by_uid(DATASOURCE_UID, body)
        dashboards = {
            name: _select_datasource(d, DATASOURCE_UID, DATASOURCE_NAME)
            for name, d in dashboards.items()
        }

    pushed = []
    for dash in dashboards.values():
        answer: dict[str, Any] = api.dashboard.update_dashboard(
            {
                "dashboard": dash,
                "folderUid": folder_uid,
                "overwrite": True,
                "message": f"meter-gateway {__version__} dashboards push",
            }
        )
        pushed.append(
            Pushed(
                uid=str(answer.get("uid", dash["uid"])),
                title=dash["title"],
                url=str(answer.get("url", "")),
                version=answer.get("version"),
            )
        )
    return pushed
