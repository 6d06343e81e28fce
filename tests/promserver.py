"""Run a real Prometheus server (Debian's ``/usr/bin/prometheus``) on a free loopback port.

For tests and benches that need the real thing: scraping, PromQL, remote write in and out,
rule files. Each server gets its own temporary storage directory and config file.

    with PrometheusServer(scrape_targets=["127.0.0.1:8000"], scrape_interval="1s") as prom:
        prom.wait_for_targets()            # every target scraped once and up
        prom.query("up")                   # → the ``data.result`` list of /api/v1/query
        prom.url                           # http://127.0.0.1:<port>

Options: ``scrape_configs`` (full scrape config dicts, beside or instead of ``scrape_targets``),
``remote_write`` (``remote_write`` entries, e.g. ``[{"url": gateway + "/api/v1/write"}]``),
``rule_files`` (paths; ``rules()`` and ``alerts()`` read the results), ``extra_args``
(e.g. ``["--web.enable-remote-write-receiver"]``), ``workdir`` (kept after stop; a temporary
directory, removed on stop, otherwise), ``global_config`` (extra keys of ``global:``).
``reload()`` re-reads the config file (the server runs with ``--web.enable-lifecycle``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import yaml

from tests.helpers import eventually

PROMETHEUS_BINARY = os.environ.get("PROMETHEUS_BINARY", "/usr/bin/prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrometheusServer:
    """A Prometheus subprocess; ``url`` is its base URL (``http://127.0.0.1:<port>``)."""

    def __init__(
        self,
        scrape_targets: Sequence[str] = (),
        scrape_interval: str = "1s",
        *,
        job_name: str = "app",
        scrape_configs: Sequence[Mapping[str, Any]] = (),
        remote_write: Sequence[Mapping[str, Any]] = (),
        rule_files: Sequence[str | Path] = (),
        evaluation_interval: str | None = None,
        global_config: Mapping[str, Any] | None = None,
        extra_args: Sequence[str] = (),
        workdir: Path | None = None,
        binary: str = PROMETHEUS_BINARY,
    ) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="prom-")) if workdir is None else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.scrape_interval = scrape_interval
        self.binary = binary
        self.extra_args = list(extra_args)
        self.config_path = self.workdir / "prometheus.yml"
        self.storage_path = self.workdir / "data"
        self.log_path = self.workdir / "prometheus.log"
        glob: dict[str, Any] = {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": evaluation_interval or scrape_interval,
            **(global_config or {}),
        }
        configs = [dict(c) for c in scrape_configs]
        if scrape_targets:
            configs.append(
                {"job_name": job_name, "static_configs": [{"targets": list(scrape_targets)}]}
            )
        self.config: dict[str, Any] = {"global": glob, "scrape_configs": configs}
        if remote_write:
            self.config["remote_write"] = [dict(r) for r in remote_write]
        if rule_files:
            self.config["rule_files"] = [str(p) for p in rule_files]
        self.proc: subprocess.Popen[bytes] | None = None

    # --- lifecycle -----------------------------------------------------------------------

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def start(self, timeout: float = 60.0) -> PrometheusServer:
        self.write_config()
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.storage_path}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"prometheus did not become ready:\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> int | None:
        code: int | None = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait()
            self.proc = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def reload(self) -> None:
        """Write ``self.config`` and make the running server re-read it."""
        self.write_config()
        r = httpx.post(f"{self.url}/-/reload", timeout=10)
        r.raise_for_status()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- HTTP API ------------------------------------------------------------------------

    def api(self, path: str, **params: Any) -> Any:
        """GET ``/api/v1/<path>`` and return ``data`` (raises on a non-success answer)."""
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = r.json()
        if r.status_code != 200 or body.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params}: {r.status_code} {r.text}")
        return body["data"]

    def query(self, expr: str, time_s: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if time_s is not None:
            params["time"] = repr(time_s)
        result: list[dict[str, Any]] = self.api("query", **params)["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self.api("targets")["activeTargets"]
        return active

    def rules(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = self.api("rules")["groups"]
        return groups

    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts

    def wait_for(
        self, check: Callable[[], Any], timeout: float = 60.0, what: str = "condition"
    ) -> Any:
        """Poll ``check`` until it returns something truthy; return that (``eventually``)."""
        return eventually(check, f"prometheus: {what}", timeout)

    def wait_for_targets(self, timeout: float = 60.0) -> None:
        """Wait until every configured target was scraped and is up."""

        def all_up() -> bool:
            ts = self.targets()
            return bool(ts) and all(t["health"] == "up" for t in ts)

        self.wait_for(all_up, timeout, "all targets up")

    def wait_for_series(self, expr: str, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Wait until an instant query returns at least one series; return them."""
        result: list[dict[str, Any]] = self.wait_for(lambda: self.query(expr), timeout, expr)
        return result
