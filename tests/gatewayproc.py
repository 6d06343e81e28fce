"""Run a real ``meter-gateway serve`` process on a free loopback port, for tests and benches."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.pgdb import store_url

ADMIN_KEY = "test-admin-key-0123456789"
INGEST_KEY = "test-ingest-key-0123456789"
READ_KEY = "test-read-key-0123456789"

BASE_CONFIG: dict[str, Any] = {
    "auth": {
        "api_keys": [
            {"name": "admin", "key": ADMIN_KEY, "scopes": ["admin"]},
            {"name": "ingest", "key": INGEST_KEY, "scopes": ["ingest"]},
            {"name": "read", "key": READ_KEY, "scopes": ["read"]},
        ]
    },
    "dimensions": [
        {
            "id": "data-processed",
            "name": "Data Processed",
            "unit": "gigabyte",
            "aggregation": "sum",
            "price": "0.08",
            "unit_cost": "0.02",
        },
        {
            "id": "compute-time",
            "name": "Compute Time",
            "unit": "minute",
            "aggregation": "sum",
            "aggregation_interval": "hour",
            "usage_increment": 60,
            "rounding": "ceil",
            "price": "0.096",
        },
        {
            "id": "active-users",
            "name": "Active Users",
            "unit": "user",
            "aggregation": "unique_count",
            "unique_key": "user_id",
        },
        {"id": "storage", "name": "Storage", "unit": "gigabyte", "aggregation": "weighted_sum"},
    ],
    "offerings": [
        {
            "id": "pay-as-you-go",
            "name": "Pay-as-you-go",
            "currency": "USD",
            "charges": [{"dimension": "data-processed", "model": "per_unit"}],
        }
    ],
    "customers": [
        {
            "id": "dumm-ai",
            "name": "Dumm AI Corp",
            "offering": "pay-as-you-go",
            "aliases": ["dumm-ai-prod"],
        },
        {"id": "acme", "name": "Acme", "offering": "pay-as-you-go"},
    ],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(listen: str) -> bool:
    host, _, port = listen.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
            return True
    except OSError:
        return False


class GatewayProcess:
    """A gateway subprocess; ``url`` is its HTTP API, ``otlp_grpc`` (host:port) and
    ``otlp_http`` (base URL) its OTLP receivers, each on a free port unless the config sets one.
    """

    def __init__(
        self, workdir: Path, config: dict[str, Any] | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.workdir = workdir
        self.config = dict(BASE_CONFIG if config is None else config)
        self.port = free_port()
        server = dict(self.config.get("server") or {})
        server["http"] = {"listen": f"127.0.0.1:{self.port}"}
        for name in ("otlp_grpc", "otlp_http"):
            listener = dict(server.get(name) or {})
            listener.setdefault("listen", f"127.0.0.1:{free_port()}")
            server[name] = listener
        self.config["server"] = server
        self.otlp_grpc = str(server["otlp_grpc"]["listen"])
        self.otlp_http = "http://" + str(server["otlp_http"]["listen"])
        # SQLite or PostgreSQL per METER_TEST_STORE (tests/pgdb.py); one database per workdir
        self.config.setdefault("store", {"url": store_url(workdir)})
        self.config_path = workdir / "gateway.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "gateway.log"

    def start(self, timeout: float = 20.0) -> GatewayProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meter_gateway", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.workdir,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200 and all(
                    _accepts(listen)
                    for name, listen in self._otlp_listeners()
                    if self.config["server"][name].get("enabled", True)
                ):
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"gateway did not become ready:\n{self.log()}")

    def _otlp_listeners(self) -> list[tuple[str, str]]:
        return [(n, str(self.config["server"][n]["listen"])) for n in ("otlp_grpc", "otlp_http")]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, key: str = ADMIN_KEY) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
