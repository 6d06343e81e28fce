"""A small prometheus-client app for tests: per-customer counters and gauges a test drives.

Run ``python -m tests.promapp PORT``. ``/metrics`` is the exposition; ``POST /inc?name=&tenant=
&label=&amount=`` adds to a counter, ``POST /set?name=&tenant=&label=&value=`` sets a gauge,
``POST /remove?name=&tenant=&label=`` drops a gauge's series; each answers the new value. Counters:
``app_bytes_processed_total``; gauges: ``app_storage_bytes``, ``app_pod_running``. Every metric
has one label, given by ``label`` (default ``tenant``). A series exists from its first change on;
a restarted app starts every counter from zero again (a counter reset).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

COUNTERS = ("app_bytes_processed",)
GAUGES = ("app_storage_bytes", "app_pod_running")


class App:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.lock = threading.Lock()
        self.metrics: dict[tuple[str, str], Any] = {}

    def metric(self, name: str, label: str) -> Any:
        key = (name, label)
        if key not in self.metrics:
            if name in COUNTERS:
                self.metrics[key] = Counter(name, name, [label], registry=self.registry)
            elif name in GAUGES:
                self.metrics[key] = Gauge(name, name, [label], registry=self.registry)
            else:
                raise KeyError(name)
        return self.metrics[key]


def serve(port: int) -> None:
    app = App()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _answer(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if urlsplit(self.path).path == "/metrics":
                with app.lock:
                    body = generate_latest(app.registry)
                self._answer(200, body, "text/plain; version=0.0.4")
            else:
                self._answer(404, b"not found")

        def do_POST(self) -> None:
            url = urlsplit(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            try:
                with app.lock:
                    m = app.metric(q["name"], q.get("label", "tenant")).labels(q["tenant"])
                    if url.path == "/inc":
                        m.inc(float(q["amount"]))
                    elif url.path == "/set":
                        m.set(float(q["value"]))
                    elif url.path == "/remove":
                        app.metric(q["name"], q.get("label", "tenant")).remove(q["tenant"])
                        self._answer(200, b"removed")
                        return
                    else:
                        self._answer(404, b"not found")
                        return
                    value = m._value.get()
            except (KeyError, ValueError) as exc:
                self._answer(400, repr(exc).encode())
                return
            self._answer(200, repr(value).encode())

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


class PromApp:
    """The app as a subprocess on ``port`` (restartable on the same port)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.target = f"127.0.0.1:{port}"
        self.url = f"http://{self.target}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> PromApp:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.promapp", str(self.port)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/metrics", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("promapp did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def _post(self, path: str, **params: Any) -> str:
        r = httpx.post(f"{self.url}{path}", params=params, timeout=10)
        r.raise_for_status()
        return r.text

    def inc(self, tenant: str, amount: float, name: str = "app_bytes_processed", **kw: Any) -> str:
        return self._post("/inc", name=name, tenant=tenant, amount=repr(amount), **kw)

    def set(self, tenant: str, value: float, name: str = "app_storage_bytes", **kw: Any) -> str:
        return self._post("/set", name=name, tenant=tenant, value=repr(value), **kw)

    def remove(self, tenant: str, name: str, **kw: Any) -> str:
        return self._post("/remove", name=name, tenant=tenant, **kw)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
