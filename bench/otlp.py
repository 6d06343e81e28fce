"""OTLP benchmark: durable data points per second through the OTLP/gRPC and OTLP/HTTP receivers.

Starts a real ``meter-gateway serve`` (tests/gatewayproc.py) in a temporary directory; client
processes send prebuilt ``ExportMetricsServiceRequest`` protobufs of ``--points`` sum points each
(one stream per point: a ``tenant`` among ``--customers`` and a ``worker`` attribute unique to the
sending thread), every export one step later in time. gRPC calls go over one channel per thread
(raw bytes, no stub overhead), HTTP over one keep-alive ``http.client`` connection per thread.
Only points the gateway answered for (after its fsynced commit) count: points sent minus
``partial_success.rejected_data_points``, divided by the wall time from the first send to the
last answer. Afterwards the per-customer totals are checked against what was sent.

    python -m bench.otlp                              # gRPC then HTTP, delta sums
    python -m bench.otlp --protocol grpc --temporality cumulative
    python -m bench.otlp --quick
    python -m bench.otlp --py-spy /tmp/otlp           # flame graphs of the server per phase
    python -m bench.otlp --py-spy /tmp/otlp --py-spy-format gil   # where the GIL goes
    python -m bench.otlp --temporality both --rounds 3  # the ratio per round and its median

On a shared machine a single ratio moves with whatever else runs: ``--rounds`` repeats the
phases, delta and cumulative in turn (the order swapped every round, so a drift weighs on
both), and prints each round's cumulative / delta and their median.
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing as mp
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python bench/otlp.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from bench.ingest import commit_stats
from tests.gatewayproc import BASE_CONFIG, INGEST_KEY, GatewayProcess

NS = 1_000_000_000
METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
METRIC = "app.data.processed"
DIMENSION = "data-processed"
VALUE = 3  # every delta point, and every step of a cumulative one


@dataclass(frozen=True)
class Plan:
    points: int  # per export
    exports: int  # per thread
    customers: int
    temporality: int  # 1 delta, 2 cumulative
    base_ns: int  # points are stamped from here on, 1 ms apart

    def body(self, proc: int, thread: int, export: int) -> bytes:
        req = ExportMetricsServiceRequest()
        rm = req.resource_metrics.add()
        kv = rm.resource.attributes.add()
        kv.key, kv.value.string_value = "service.name", f"bench-{proc}-{thread}"
        sm = rm.scope_metrics.add()
        sm.scope.name = "bench"
        m = sm.metrics.add()
        m.name, m.unit = METRIC, "By"
        m.sum.aggregation_temporality = self.temporality
        m.sum.is_monotonic = True
        t = self.base_ns + (export + 1) * 1_000_000
        start = t - 1_000_000 if self.temporality == 1 else self.base_ns - NS
        value = VALUE if self.temporality == 1 else VALUE * (export + 1)
        for i in range(self.points):
            p = m.sum.data_points.add()
            p.start_time_unix_nano, p.time_unix_nano, p.as_int = start, t, value
            a = p.attributes.add()
            a.key, a.value.string_value = "tenant", self.customer(i)
            b = p.attributes.add()
            b.key, b.value.string_value = "worker", f"w{proc}-{thread}-{i}"
        return bytes(req.SerializeToString())

    def customer(self, i: int) -> str:
        return f"c{i % self.customers}"

    def per_customer_point_value(self) -> dict[str, int]:
        """Points each customer gets in one export (all exports are alike)."""
        out: dict[str, int] = {}
        for i in range(self.points):
            out[self.customer(i)] = out.get(self.customer(i), 0) + 1
        return out


@dataclass
class ClientResult:
    t0: float = 0.0
    t1: float = 0.0
    points: int = 0
    rejected: int = 0
    exports: int = 0
    retries: int = 0
    cpu_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def client_main(
    protocol: str, target: str, plan: Plan, proc: int, threads: int, barrier: Any, out: Any
) -> None:
    bodies = {(k, e): plan.body(proc, k, e) for k in range(threads) for e in range(plan.exports)}
    res = ClientResult()
    lock = threading.Lock()

    def worker(k: int) -> None:
        local = ClientResult()
        send = _grpc_sender(target) if protocol == "grpc" else _http_sender(target)
        for e in range(plan.exports):
            while True:
                start = time.monotonic()
                status, raw = send(bodies[(k, e)])
                local.latencies.append(time.monotonic() - start)
                if status == "retry":
                    local.retries += 1
                    time.sleep(0.05)
                    continue
                break
            if status != "ok":
                local.errors.append(f"export {e}: {status} {raw[:200]!r}")
                continue
            response = ExportMetricsServiceResponse.FromString(raw)
            local.points += plan.points
            local.rejected += response.partial_success.rejected_data_points
            local.exports += 1
            if response.partial_success.error_message:
                local.errors.append(response.partial_success.error_message[:200])
        with lock:
            for name in ("points", "rejected", "exports", "retries"):
                setattr(res, name, getattr(res, name) + getattr(local, name))
            res.latencies.extend(local.latencies)
            res.errors.extend(local.errors)

    workers = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    barrier.wait()
    res.t0 = time.monotonic()
    cpu0 = time.process_time()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    res.t1 = time.monotonic()
    res.cpu_s = time.process_time() - cpu0
    out.put(res)


def _grpc_sender(target: str) -> Any:
    import grpc

    channel = grpc.insecure_channel(target)
    call = channel.unary_unary(METHOD)
    metadata = (("authorization", f"Bearer {INGEST_KEY}"),)

    def send(body: bytes) -> tuple[str, bytes]:
        try:
            return "ok", call(body, metadata=metadata, timeout=120)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                return "retry", b""
            return str(exc.code()), str(exc.details()).encode()

    return send


def _http_sender(base: str) -> Any:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    headers = {"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {INGEST_KEY}"}

    def send(body: bytes) -> tuple[str, bytes]:
        conn.request("POST", "/v1/metrics", body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        if resp.status == 200:
            return "ok", raw
        if resp.status in (429, 503):
            return "retry", raw
        return f"HTTP {resp.status}", raw

    return send


# --- the server --------------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def gateway_config(customers: int) -> dict[str, Any]:
    config = dict(BASE_CONFIG)
    config["customers"] = [
        {"id": f"c{i}", "name": f"Customer {i}", "offering": "pay-as-you-go"}
        for i in range(customers)
    ]
    config["rules"] = [{"match": {"source": "otlp", "metric": METRIC}, "dimension": DIMENSION}]
    return config


def verify(gw: GatewayProcess, plan: Plan, exports_ok: int) -> list[str]:
    per = plan.per_customer_point_value()
    problems = []
    with gw.client() as c:
        for customer, n in sorted(per.items()):
            r = c.get(
                "/v1/usage",
                params={
                    "customerId": customer,
                    "dimensionId": DIMENSION,
                    "window": "month",
                    "from": "2020-01-01T00:00:00Z",
                    "to": "2100-01-01T00:00:00Z",
                },
            )
            got = sum((Decimal(w["value"]) for w in r.json()["data"]), Decimal(0))
            want = Decimal(n * VALUE * exports_ok)
            if got != want:
                problems.append(f"{customer}: stored {got}, sent {want}")
    return problems


def phase(args: argparse.Namespace, protocol: str, workdir: Path) -> dict[str, Any]:
    plan = Plan(
        args.points,
        args.exports,
        args.customers,
        1 if args.temporality == "delta" else 2,
        time.time_ns() - 600 * NS,
    )
    gw = GatewayProcess(workdir, gateway_config(args.customers)).start(timeout=120)
    spy = None
    try:
        target = gw.otlp_grpc if protocol == "grpc" else gw.otlp_http
        ctx = mp.get_context("fork")
        barrier = ctx.Barrier(args.procs + 1)
        out = ctx.Queue()
        per_proc = [
            args.threads // args.procs + (1 if i < args.threads % args.procs else 0)
            for i in range(args.procs)
        ]
        children = [
            ctx.Process(
                target=client_main, args=(protocol, target, plan, i, per_proc[i], barrier, out)
            )
            for i in range(args.procs)
        ]
        for c in children:
            c.start()
        barrier.wait(timeout=600)
        assert gw.proc is not None
        if args.py_spy:
            spy = start_py_spy(
                gw.proc.pid, f"{args.py_spy}-{protocol}-{args.temporality}", args.py_spy_format
            )
        cpu0 = proc_cpu_s(gw.proc.pid)
        results = [out.get(timeout=3600) for _ in children]
        server_cpu = proc_cpu_s(gw.proc.pid) - cpu0
        for c in children:
            c.join()
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            spy.wait(60)
        wall = max(r.t1 for r in results) - min(r.t0 for r in results)
        points = sum(r.points for r in results)
        rejected = sum(r.rejected for r in results)
        exports_ok = sum(r.exports for r in results)
        lat = sorted(x for r in results for x in r.latencies)
        errors = [e for r in results for e in r.errors]
        problems = verify(gw, plan, exports_ok) if not errors else []
        if exports_ok % max(1, args.threads):
            problems.append("not every thread completed all its exports")
        stats = commit_stats(gw)
        return {
            "protocol": protocol,
            "points": points,
            "accepted": points - rejected,
            "wall_s": wall,
            "rate": (points - rejected) / wall if wall else 0.0,
            "p50_ms": 1000 * lat[len(lat) // 2] if lat else 0.0,
            "p99_ms": 1000 * lat[int(len(lat) * 0.99)] if lat else 0.0,
            "retries": sum(r.retries for r in results),
            "server_cpu_s": server_cpu,
            "client_cpu_s": sum(r.cpu_s for r in results),
            "commits": stats,
            "errors": errors[:5],
            "problems": problems[:5],
        }
    finally:
        gw.stop()


def start_py_spy(pid: int, prefix: str, kind: str) -> subprocess.Popen[bytes] | None:
    """``kind`` svg: a flame graph of every thread; gil: collapsed stacks of the samples that hold
    the GIL (what bounds throughput here); all: collapsed stacks of every busy thread; idle:
    of every thread, where the waiting ones wait too."""
    exe = shutil.which("py-spy")
    if exe is None:
        print("py-spy not found; profiling skipped")
        return None
    out = f"{prefix}.svg" if kind == "svg" else f"{prefix}.{kind}.txt"
    extra = {"gil": ["--gil"], "idle": ["--idle"]}.get(kind, [])
    fmt = [] if kind == "svg" else ["--format", "raw", *extra]
    print(f"py-spy -> {out}")
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--threads", "--rate", "200", "--output", out,
         "--nonblocking", *fmt],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--protocol", choices=["grpc", "http", "both"], default="both")
    p.add_argument(
        "--temporality",
        choices=["delta", "cumulative", "both"],
        default="delta",
        help="both: delta then cumulative in one run, and their ratio",
    )
    p.add_argument("--points", type=int, default=2000, help="data points per export")
    p.add_argument("--exports", type=int, default=25, help="exports per client thread")
    p.add_argument("--threads", type=int, default=8, help="client threads in all")
    p.add_argument("--procs", type=int, default=2, help="client processes")
    p.add_argument("--customers", type=int, default=50)
    p.add_argument("--rounds", type=int, default=1, help="run the phases this many times")
    p.add_argument("--quick", action="store_true", help="a small run")
    p.add_argument(
        "--py-spy", default=None, help="profile the server into <prefix>-<protocol>-<temporality>.*"
    )
    p.add_argument(
        "--py-spy-format",
        default="svg",
        choices=["svg", "gil", "all", "idle"],
        help="svg: flame graph; gil / all / idle: collapsed stacks of GIL holders / busy threads "
        "/ every thread, waiting ones too",
    )
    args = p.parse_args()
    if args.quick:
        args.points, args.exports, args.threads = 500, 5, 4
    protocols = ["grpc", "http"] if args.protocol == "both" else [args.protocol]
    temporalities = ["delta", "cumulative"] if args.temporality == "both" else [args.temporality]
    total = args.points * args.exports * args.threads
    print(
        f"{total:,} {args.temporality} points per protocol: {args.threads} threads in "
        f"{args.procs} processes, {args.exports} exports of {args.points} points each"
    )
    ok = True
    # (protocol, temporality) → (points/s, points per server CPU second) of each round
    rates: dict[tuple[str, str], list[tuple[float, float]]] = {}
    phases = [
        (p, t)
        for rnd in range(args.rounds)
        for p in protocols
        for t in (temporalities if rnd % 2 == 0 else temporalities[::-1])
    ]
    for protocol, temporality in phases:
        args.temporality = temporality
        with tempfile.TemporaryDirectory(prefix="bench-otlp-") as tmp:
            r = phase(args, protocol, Path(tmp))
        per_cpu = r["accepted"] / max(r["server_cpu_s"], 1e-9)
        rates.setdefault((protocol, temporality), []).append((r["rate"], per_cpu))
        print(
            f"{protocol:5s} {temporality:10s} {r['rate']:>10,.0f} durable points/s, "
            f"{per_cpu:,.0f} per server CPU second  "
            f"({r['accepted']:,} in {r['wall_s']:.2f}s; export latency p50 {r['p50_ms']:.0f} ms, "
            f"p99 {r['p99_ms']:.0f} ms; {r['retries']} retries)"
        )
        wall = r["wall_s"]
        print(
            f"      CPU: server {r['server_cpu_s'] / wall:.2f} cores, "
            f"clients {r['client_cpu_s'] / wall:.2f} cores"
        )
        print(f"      {r['commits']}")
        for line in r["errors"] + r["problems"]:
            print(f"      PROBLEM: {line}")
            ok = False
    for protocol in protocols:
        if (protocol, "delta") not in rates or (protocol, "cumulative") not in rates:
            continue
        pairs = list(zip(rates[(protocol, "delta")], rates[(protocol, "cumulative")], strict=True))
        by_wall = [cw / dw for (dw, _), (cw, _) in pairs]
        by_cpu = [cc / dc for (_, dc), (_, cc) in pairs]
        each = (
            f" (rounds: {', '.join(f'{w:.2f}' for w in by_wall)} and "
            f"{', '.join(f'{c:.2f}' for c in by_cpu)})"
            if len(pairs) > 1
            else ""
        )
        median = "median " if len(pairs) > 1 else ""
        print(
            f"{protocol}: cumulative / delta = {median}{statistics.median(by_wall):.2f} durable "
            f"points/s, {statistics.median(by_cpu):.2f} per server CPU second{each} "
            "(issue 17 asks >= 0.8)"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
