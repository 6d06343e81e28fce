"""``meter-gateway dashboards push`` against a loopback HTTP server that answers like Grafana's
HTTP API and checks each request: path, method, auth header and payload shape
(``POST /api/dashboards/db``, ``GET/POST /api/folders``, ``GET/POST/PUT /api/datasources``).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from meter_gateway.dashboards import build_all
from tests.grafana.dashboard_queries import ROOT

TOKEN = "glsa_test-service-account-token"


@dataclass
class FakeGrafana:
    """Grafana's API as far as push uses it, with state: folders, data sources, dashboards."""

    auth: str = f"Bearer {TOKEN}"
    folders: dict[str, dict[str, Any]] = field(default_factory=dict)
    datasources: dict[str, dict[str, Any]] = field(default_factory=dict)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)
    log: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def handle(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, Any]:
        self.log.append((method, path))
        if headers.get("Authorization") != self.auth:
            return 401, {"message": "Unauthorized"}
        payload: Any = None
        if method in ("POST", "PUT"):
            if headers.get("Content-Type", "").split(";")[0] != "application/json":
                self.problems.append(f"{method} {path}: Content-Type {headers.get('Content-Type')}")
            payload = json.loads(body)
        match method, path.split("/")[1:]:
            case "GET", ["api", "folders", uid]:
                if uid in self.folders:
                    return 200, self.folders[uid]
                return 404, {"message": "folder not found", "status": "not-found"}
            case "POST", ["api", "folders"]:
                self.expect(payload, {"title", "uid"}, path)
                self.folders[payload["uid"]] = {**payload, "id": len(self.folders) + 1}
                return 200, self.folders[payload["uid"]]
            case "GET", ["api", "datasources", "uid", uid]:
                if uid in self.datasources:
                    return 200, self.datasources[uid]
                return 404, {"message": "Data source not found"}
            case "POST", ["api", "datasources"]:
                self.expect(payload, {"name", "type", "access", "url"}, path)
                self.datasources[payload["uid"]] = payload
                return 200, {"datasource": payload, "id": 1, "message": "Datasource added"}
            case "PUT", ["api", "datasources", "uid", uid]:
                self.expect(payload, {"name", "type", "access", "url"}, path)
                if uid not in self.datasources:
                    return 404, {"message": "Data source not found"}
                self.datasources[uid] = payload
                return 200, {"datasource": payload, "id": 1, "message": "Datasource updated"}
            case "POST", ["api", "dashboards", "db"]:
                self.expect(payload, {"dashboard", "folderUid", "overwrite"}, path)
                dash = payload["dashboard"]
                self.expect(dash, {"uid", "title", "panels", "schemaVersion"}, path)
                if payload["folderUid"] not in self.folders:
                    return 400, {"message": "folder not found"}
                if dash.get("id") is not None:
                    self.problems.append(f"{dash['uid']}: an id from another Grafana")
                old = self.dashboards.get(dash["uid"])
                if old is not None and not payload["overwrite"]:
                    return 412, {"message": "A dashboard with the same uid already exists"}
                version = 1 if old is None else old["version"] + 1
                self.dashboards[dash["uid"]] = {**payload, "version": version}
                url = f"/d/{dash['uid']}/{dash['title'].lower().replace(' ', '-')}"
                return 200, {"id": 1, "uid": dash["uid"], "url": url, "status": "success",
                             "version": version}  # fmt: skip
        self.problems.append(f"unexpected {method} {path}")
        return 404, {"message": "Not found"}

    def expect(self, payload: Any, keys: set[str], path: str) -> None:
        if not isinstance(payload, dict) or not keys <= payload.keys():
            self.problems.append(f"{path}: payload lacks {keys} ({payload!r:.200})")


@pytest.fixture
def grafana() -> Iterator[tuple[FakeGrafana, str]]:
    fake = FakeGrafana()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            status, answer = fake.handle(
                self.command, self.path, self.headers, self.rfile.read(length)
            )
            body = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def push(url: str, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GRAFANA_TOKEN"}
    if token is not None:
        env["GRAFANA_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "meter_gateway", "dashboards", "push", "--url", url, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def test_push_creates_folder_datasource_and_dashboards(grafana: tuple[FakeGrafana, str]) -> None:
    fake, url = grafana
    r = push(url, "--datasource-url", "http://prometheus:9090", "--scrape-interval", "30s")
    assert r.returncode == 0, r.stderr
    assert fake.problems == []
    assert fake.log == [
        ("GET", "/api/folders/meter-gateway"),
        ("POST", "/api/folders"),
        ("GET", "/api/datasources/uid/meter-gateway-prometheus"),
        ("POST", "/api/datasources"),
        ("POST", "/api/dashboards/db"),
        ("POST", "/api/dashboards/db"),
        ("POST", "/api/dashboards/db"),
    ]
    assert fake.folders["meter-gateway"]["title"] == "Meter gateway"
    ds = fake.datasources["meter-gateway-prometheus"]
    assert ds["type"] == "prometheus"
    assert ds["access"] == "proxy"
    assert ds["url"] == "http://prometheus:9090"
    assert ds["jsonData"]["timeInterval"] == "30s"

    built = {d["uid"]: d for d in build_all().values()}
    assert set(fake.dashboards) == set(built)
    for uid, saved in fake.dashboards.items():
        assert saved["folderUid"] == "meter-gateway"
        assert saved["overwrite"] is True
        dash = saved["dashboard"]
        [var] = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
        # Opened on the pushed data source; otherwise exactly the committed dashboard.
        assert var.pop("current") == {
            "text": "Prometheus (meter-gateway)",
            "value": "meter-gateway-prometheus",
        }
        assert dash == built[uid]
        assert f"{uid}\tversion 1\t" in r.stdout


def test_push_again_updates_in_place(grafana: tuple[FakeGrafana, str]) -> None:
    fake, url = grafana
    assert push(url, "--datasource-url", "http://prometheus:9090").returncode == 0
    fake.log.clear()
    r = push(url, "--datasource-url", "http://prom-2:9090")
    assert r.returncode == 0, r.stderr
    assert fake.problems == []
    assert fake.log == [
        ("GET", "/api/folders/meter-gateway"),
        ("GET", "/api/datasources/uid/meter-gateway-prometheus"),
        ("PUT", "/api/datasources/uid/meter-gateway-prometheus"),
        *[("POST", "/api/dashboards/db")] * 3,
    ]
    assert fake.datasources["meter-gateway-prometheus"]["url"] == "http://prom-2:9090"
    assert {d["version"] for d in fake.dashboards.values()} == {2}


def test_push_without_datasource_leaves_datasources_alone(
    grafana: tuple[FakeGrafana, str],
) -> None:
    fake, url = grafana
    r = push(url, "--folder-uid", "billing", "--folder-title", "Billing")
    assert r.returncode == 0, r.stderr
    assert not any("datasources" in path for _, path in fake.log)
    assert fake.folders["billing"]["title"] == "Billing"
    assert {d["dashboard"]["uid"] for d in fake.dashboards.values()} == {
        d["uid"] for d in build_all().values()
    }
    for saved in fake.dashboards.values():
        [var] = [v for v in saved["dashboard"]["templating"]["list"] if v["type"] == "datasource"]
        assert "current" not in var  # Grafana's default Prometheus


def test_basic_auth_from_the_url(grafana: tuple[FakeGrafana, str]) -> None:
    fake, url = grafana
    fake.auth = "Basic " + base64.b64encode(b"admin:s3cret").decode()
    r = push(url.replace("http://", "http://admin:s3cret@"), token=None)
    assert r.returncode == 0, r.stderr
    assert len(fake.dashboards) == 3


def test_a_rejected_token_is_reported_and_nothing_is_pushed(
    grafana: tuple[FakeGrafana, str],
) -> None:
    fake, url = grafana
    r = push(url, token="wrong")
    assert r.returncode == 1
    assert "401" in r.stderr
    assert fake.dashboards == {}
    assert fake.log == [("GET", "/api/folders/meter-gateway")]


def test_an_unreachable_grafana_is_reported() -> None:
    from tests.gatewayproc import free_port

    r = push(f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 1
    assert "127.0.0.1" in r.stderr
    assert "Traceback" not in r.stderr
