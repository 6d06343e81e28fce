"""A small application emitting metrics with the real OpenTelemetry SDK, run as a subprocess.

Tests drive it over stdin with one JSON command per line and read one JSON answer per line:

    {"op": "add", "instrument": "counter", "name": "app.data.processed", "value": 5,
     "attributes": {"tenant": "acme"}}           -> {"ok": true}
    {"op": "record", "dimension": "data-processed", "value": 5, "customer": "acme"}
                                                 -> {"ok": true}   (--mode helper: UsageMeter)
    {"op": "flush"}                              -> {"ok": <every export succeeded>}
    {"op": "exit"}                               -> {"ok": true}, after shutdown

Instruments: counter, updown, histogram, gauge. Nothing is exported except on "flush" and
"exit" (the periodic interval is infinite), so tests decide exactly what each export holds.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

REPO = Path(__file__).resolve().parents[2]
TESTDATA = REPO / "tests" / "testdata" / "otlp"


def gateway_config(**overrides: Any) -> dict[str, Any]:
    """The OTLP tests' gateway config: tests/testdata/otlp/gateway.yaml plus the test keys."""
    import yaml

    from tests.gatewayproc import BASE_CONFIG

    config: dict[str, Any] = yaml.safe_load((TESTDATA / "gateway.yaml").read_text())
    config["auth"] = BASE_CONFIG["auth"]
    config.update(overrides)
    return config


class AppProcess:
    """The test side: starts this script and talks to it."""

    def __init__(
        self,
        protocol: str,
        endpoint: str,
        key: str | None,
        temporality: str = "cumulative",
        mode: str = "sdk",
        gzip: bool = False,
        service: str = "otlp-test-app",
        timeout_s: float = 10.0,
    ) -> None:
        cmd = [sys.executable, __file__, "--mode", mode, "--protocol", protocol]
        cmd += ["--endpoint", endpoint, "--temporality", temporality, "--service", service]
        cmd += ["--timeout", str(timeout_s)]
        if key:
            cmd += ["--key", key]
        if gzip:
            cmd.append("--gzip")
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            cwd=REPO,
        )

    def send(self, **cmd: Any) -> bool:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"app exited {self.proc.wait()}:\n{self.stderr()}")
        return bool(json.loads(line)["ok"])

    def add(self, name: str, value: float, instrument: str = "counter", **attrs: str) -> None:
        self.send(op="add", instrument=instrument, name=name, value=value, attributes=attrs)

    def record(self, dimension: str, value: float, customer: str) -> None:
        self.send(op="record", dimension=dimension, value=value, customer=customer)

    def flush(self) -> bool:
        return self.send(op="flush")

    def close(self) -> int:
        """Shut the SDK down (a last export) and wait for the process."""
        if self.proc.poll() is None:
            self.send(op="exit")
        code = self.proc.wait(60)
        self._release()
        return code

    def _release(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()
        self._stderr.close()

    def stderr(self) -> str:
        if self._stderr.closed:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def __enter__(self) -> AppProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._release()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["sdk", "helper"], default="sdk")
    p.add_argument("--protocol", choices=["grpc", "http"], required=True)
    p.add_argument("--endpoint", required=True)
    p.add_argument("--key", default=None)
    p.add_argument("--temporality", choices=["delta", "cumulative"], default="cumulative")
    p.add_argument("--gzip", action="store_true")
    p.add_argument("--service", default="otlp-test-app")
    p.add_argument("--timeout", type=float, default=10.0, help="exporter timeout, seconds")
    args = p.parse_args()
    if args.mode == "helper":
        app: Any = HelperApp(args)
    else:
        app = SdkApp(args)
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "exit":
            app.shutdown()
            _answer(True)
            return 0
        if op == "flush":
            _answer(app.flush())
        else:
            app.do(cmd)
            _answer(True)
    app.shutdown()
    return 0


def _answer(ok: bool) -> None:
    sys.stdout.write(json.dumps({"ok": ok}) + "\n")
    sys.stdout.flush()


def counting_failures(inner: Any) -> Any:
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult

    class _Outcomes(MetricExporter):
        """Passes every export to the real exporter and counts the failed ones."""

        def __init__(self) -> None:
            super().__init__(inner._preferred_temporality, inner._preferred_aggregation)
            self.failures = 0

        def export(self, metrics_data: Any, timeout_millis: float = 10_000, **kw: Any) -> Any:
            result = inner.export(metrics_data, timeout_millis=timeout_millis, **kw)
            if result is not MetricExportResult.SUCCESS:
                self.failures += 1
            return result

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            return bool(inner.force_flush(timeout_millis))

        def shutdown(self, timeout_millis: float = 30_000, **kw: Any) -> None:
            inner.shutdown(timeout_millis=timeout_millis, **kw)

    return _Outcomes()


class SdkApp:
    """MeterProvider + PeriodicExportingMetricReader + OTLPMetricExporter, nothing else."""

    def __init__(self, args: argparse.Namespace) -> None:
        from opentelemetry.sdk.metrics import (
            Counter,
            Histogram,
            MeterProvider,
            ObservableCounter,
            ObservableUpDownCounter,
            UpDownCounter,
        )
        from opentelemetry.sdk.metrics.export import (
            AggregationTemporality,
            PeriodicExportingMetricReader,
        )
        from opentelemetry.sdk.resources import Resource

        t = (
            AggregationTemporality.DELTA
            if args.temporality == "delta"
            else AggregationTemporality.CUMULATIVE
        )
        preferred = {
            Counter: t,
            UpDownCounter: t,
            Histogram: t,
            ObservableCounter: t,
            ObservableUpDownCounter: t,
        }
        headers = {"authorization": f"Bearer {args.key}"} if args.key else {}
        if args.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.exporter import Compression as GC
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter as G,
            )

            exporter: Any = G(
                endpoint=args.endpoint,
                insecure=True,
                headers=headers,
                timeout=args.timeout,
                preferred_temporality=preferred,
                compression=GC.Gzip if args.gzip else GC.NoCompression,
            )
        else:
            from opentelemetry.exporter.otlp.proto.http import Compression as HC
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter as H,
            )

            exporter = H(
                endpoint=args.endpoint.rstrip("/") + "/v1/metrics",
                headers=headers,
                timeout=args.timeout,
                preferred_temporality=preferred,
                compression=HC.Gzip if args.gzip else HC.NoCompression,
            )
        self.exports = counting_failures(exporter)
        reader = PeriodicExportingMetricReader(self.exports, export_interval_millis=math.inf)
        self.provider = MeterProvider(
            metric_readers=[reader],
            resource=Resource.create({"service.name": args.service}),
            shutdown_on_exit=False,
        )
        self.meter = self.provider.get_meter("otlp-test-app", "1.0")
        self.instruments: dict[tuple[str, str], Any] = {}

    def do(self, cmd: dict[str, Any]) -> None:
        kind, name = cmd.get("instrument", "counter"), cmd["name"]
        inst = self.instruments.get((kind, name))
        if inst is None:
            create = {
                "counter": self.meter.create_counter,
                "updown": self.meter.create_up_down_counter,
                "histogram": self.meter.create_histogram,
                "gauge": self.meter.create_gauge,
            }[kind]
            inst = self.instruments[(kind, name)] = create(name, unit=cmd.get("unit", ""))
        attrs = cmd.get("attributes") or {}
        if kind in ("counter", "updown"):
            inst.add(cmd["value"], attrs)
        elif kind == "histogram":
            inst.record(cmd["value"], attrs)
        else:
            inst.set(cmd["value"], attrs)

    def flush(self) -> bool:
        """Whether every export of this flush succeeded (force_flush alone does not say)."""
        failures = self.exports.failures
        return bool(self.provider.force_flush(30_000)) and self.exports.failures == failures

    def shutdown(self) -> None:
        # With an infinite interval the reader has no thread to make a last export on shutdown.
        self.provider.force_flush(30_000)
        self.provider.shutdown(30_000)


class HelperApp:
    """The app-side helper of this project, ``exporters.usage.UsageMeter``."""

    def __init__(self, args: argparse.Namespace) -> None:
        from exporters.usage import UsageMeter

        self.usage = UsageMeter(
            args.endpoint,
            api_key=args.key,
            protocol=args.protocol,
            temporality=args.temporality,
            export_interval_s=math.inf,
            service_name=args.service,
            timeout_s=args.timeout,
        )

    def do(self, cmd: dict[str, Any]) -> None:
        self.usage.record(cmd["dimension"], cmd["value"], customer=cmd["customer"])

    def flush(self) -> bool:
        return self.usage.flush()

    def shutdown(self) -> None:
        self.usage.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
