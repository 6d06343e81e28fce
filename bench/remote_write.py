"""Remote-write benchmark: the gateway's ``/api/v1/write`` against Prometheus' own remote-write
receiver (``prometheus --web.enable-remote-write-receiver``), same bodies, same machine, one run.

Bodies are prebuilt ``WriteRequest``s (snappy block) of ``--series`` counter series with one
sample each (``app_bytes_processed_total`` with a ``tenant`` among ``--customers`` and a ``pod``
unique to the series and sending thread), every request one second later and 3 higher. Each
client thread sends ``--requests`` of them over one keep-alive connection. Samples per second
counts samples of 2xx answers (the gateway answers after its fsynced commit; Prometheus after
appending to its head and WAL) over the wall time from the first send to the last answer.
Afterwards the gateway's per-customer totals are checked against what was sent (the first sample
of each series is its baseline). Both servers run ``--rounds`` times (default 3), each round on
fresh servers and alternating which goes first, and the round whose ratio is the median is
printed in full (Prometheus' own CPU per sample varies by a third from one run to the next).

    python -m bench.remote_write                 # 8 threads × 25 requests × 2000 samples
    python -m bench.remote_write --quick
    python -m bench.remote_write --py-spy /tmp/rw.txt   # py-spy record the gateway (raw stacks)
    python -m bench.remote_write --py-spy /tmp/rw.txt --py-spy-args=--gil  # the GIL's holder
    python -m bench.remote_write --in-process    # the receiver alone: decode, convert

Besides the rates it prints the gateway's CPU as user and system time and by thread (names from
``py-spy dump``: the AnyIO workers decode and convert, ``meter-gateway-writer`` prepares the
store's commits, ``meter-gateway-applier`` runs their transactions, MainThread is HTTP).

``--in-process`` times the receiver's own CPU per sample in this process, no HTTP and no store
commit (a committer that only answers; the server's GC thresholds): ``batch`` (snappy,
decode, observations) and ``commit`` (hold, convert against the state, group rows) of every
request after each thread's first two (baselines, new series), reported as the median
request's and the mean; and each thread's first two requests (new series: baselines; then
amounts the validator judges once per series) and the mean of every request. For measuring the
receiver's steps; the full run is the figure.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

if __package__ in (None, ""):  # run as ``python bench/remote_write.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cramjam

from meter_gateway.config import Config
from meter_gateway.model import Batch, CommitResult
from meter_gateway.server import GC_THRESHOLDS
from meter_gateway.service import Gateway
from receivers import prompb
from tests.gatewayproc import BASE_CONFIG, INGEST_KEY, GatewayProcess
from tests.helpers import total
from tests.promserver import PrometheusServer

METRIC = "app_bytes_processed_total"
STEP = 3


def build_bodies(args: argparse.Namespace, base_ms: int) -> list[list[bytes]]:
    """Per thread, its requests in order."""
    out: list[list[bytes]] = []
    for thread in range(args.threads):
        bodies = []
        for k in range(args.requests):
            req = prompb.WriteRequest()
            for i in range(args.series):
                ts = req.timeseries.add()
                ts.labels.add(name="__name__", value=METRIC)
                ts.labels.add(name="job", value="bench")
                ts.labels.add(name="pod", value=f"t{thread}-p{i}")
                ts.labels.add(name="tenant", value=f"cust-{i % args.customers}")
                ts.samples.add(value=float(k * STEP), timestamp=base_ms + k * 1000)
            bodies.append(bytes(cramjam.snappy.compress_raw(req.SerializeToString())))
        out.append(bodies)
    return out


def send_all(url: str, bodies: list[list[bytes]], headers: dict[str, str]) -> dict[str, Any]:
    parts = urlsplit(url)
    ok = [0] * len(bodies)
    failures: list[str] = []
    latencies: list[float] = []
    start_barrier = threading.Barrier(len(bodies) + 1)

    def worker(n: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=120)
        start_barrier.wait()
        for body in bodies[n]:
            t0 = time.perf_counter()
            conn.request("POST", parts.path, body=body, headers=headers)
            resp = conn.getresponse()
            text = resp.read()
            latencies.append(time.perf_counter() - t0)
            if 200 <= resp.status < 300:
                ok[n] += 1
            else:
                failures.append(f"{resp.status} {text[:200]!r}")
        conn.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(len(bodies))]
    for t in threads:
        t.start()
    start_barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "requests_ok": sum(ok),
        "wall_s": wall,
        "failures": failures,
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else 0.0,
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else 0.0,
    }


def cpu_s(pid: int) -> float:
    return sum(user_system_s(pid))


def user_system_s(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid`` (by thread id)."""
    out: dict[int, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names by thread id (``py-spy dump``; empty without py-spy)."""
    exe = shutil.which("py-spy")
    if exe is None:
        return {}
    try:
        text = subprocess.run(
            [exe, "dump", "-p", str(pid)], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    names: dict[int, str] = {}
    for line in text.splitlines():
        if line.startswith("Thread "):
            tid, _, rest = line[len("Thread ") :].partition(" ")
            if tid.isdigit():
                names[int(tid)] = rest.partition('"')[2].rstrip('"')
    return names


def by_thread(before: dict[int, float], after: dict[int, float], names: dict[int, str]) -> str:
    """CPU per thread kind (names without their numbers), most first."""
    kinds: dict[str, float] = {}
    for tid, t in after.items():
        name = names.get(tid, "(not Python)")
        kind = name.rstrip("0123456789 _-()").removesuffix(" (") or name
        if name.startswith("AnyIO worker"):
            kind = "AnyIO worker threads"
        kinds[kind] = kinds.get(kind, 0.0) + t - before.get(tid, 0.0)
    return ", ".join(f"{k} {v:.2f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))


def start_py_spy(pid: int, out: str, extra: str = "") -> subprocess.Popen[bytes] | None:
    """py-spy record ``pid`` (every thread, idle ones left out) to ``out``: collapsed stacks
    for ``.txt``, else a flame graph."""
    exe = shutil.which("py-spy")
    if exe is None:
        print("py-spy not found (pip install py-spy); profiling skipped")
        return None
    fmt = "raw" if out.endswith(".txt") else "flamegraph"
    cmd = [exe, "record", "-p", str(pid), "-r", "200", "--nonblocking", "-f", fmt, "-o", out]
    cmd += extra.split()
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class _Answering:
    """A committer that commits nothing and answers at once (``--in-process``)."""

    def submit_sync(self, batch: Batch, timeout: float | None = None) -> CommitResult:
        return CommitResult(len(batch.records), 0, len(batch.errors))


def in_process(args: argparse.Namespace, rules: list[dict[str, Any]]) -> int:
    """The receiver's CPU per sample, in this process (see the module docstring)."""
    import gc
    import statistics

    base_ms = int(time.time() * 1000) - (args.requests + 60) * 1000
    bodies = build_bodies(args, base_ms)
    with tempfile.TemporaryDirectory(prefix="bench-rw-") as tmp:
        cfg = dict(BASE_CONFIG)
        cfg["store"] = {"url": f"sqlite:///{tmp}/gateway.db"}
        cfg["customers"] = _customers(args)
        cfg["rules"] = rules
        g = Gateway(Config.model_validate(cfg))
        try:
            rw = g.remote_write
            rw.totals._committer = rw._committer = _Answering()
            gc.collect()
            gc.freeze()
            gc.set_threshold(*GC_THRESHOLDS)
            costs: list[tuple[float, float]] = []
            first: list[float] = []  # every thread's first two requests, batch and commit
            for k in range(args.requests):
                for thread in bodies:
                    t0 = time.process_time()
                    batch, decoded = rw.batch(thread[k])
                    t1 = time.process_time()
                    rw.commit(batch, decoded)
                    if k >= 2:
                        costs.append((t1 - t0, time.process_time() - t1))
                    else:
                        first.append(time.process_time() - t0)
        finally:
            g.close()
    if not costs:
        print("--in-process needs --requests 3 or more")
        return 1
    us = 1e6 / args.series
    for i, part in enumerate(("batch", "commit")):
        median = statistics.median(c[i] for c in costs) * us
        mean = statistics.fmean(c[i] for c in costs) * us
        print(f"{part:<7} median {median:.2f} us/sample, mean {mean:.2f}")
    for k in range(min(2, args.requests)):
        cost = statistics.fmean(first[k * args.threads : (k + 1) * args.threads]) * us
        print(f"request {k + 1} of each thread (batch and commit): {cost:.2f} us/sample")
    whole = (sum(first) + sum(a + b for a, b in costs)) / (args.requests * args.threads)
    print(f"every request (batch and commit): mean {whole * us:.2f} us/sample")
    print(f"load average: {os.getloadavg()}")
    return 0


def _customers(args: argparse.Namespace) -> list[dict[str, str]]:
    return [
        {"id": f"cust-{i}", "name": f"Customer {i}", "offering": "pay-as-you-go"}
        for i in range(args.customers)
    ]


def _per_cpu(r: dict[str, Any], series: int) -> float:
    return float(r["requests_ok"] * series / max(r["server_cpu_s"], 1e-9))


def _ratio(results: dict[str, dict[str, Any]], series: int) -> float:
    """Gateway ÷ Prometheus in samples per server CPU second."""
    return _per_cpu(results["gateway"], series) / _per_cpu(results["prometheus"], series)


def _cpu_line(results: dict[str, dict[str, Any]], series: int) -> str:
    gw, prom = (_per_cpu(results[n], series) for n in ("gateway", "prometheus"))
    return (
        f"per server CPU second: gateway {gw:,.0f}, prometheus {prom:,.0f} samples; "
        f"gateway / prometheus = {_ratio(results, series):.3f}"
    )


HEADERS = {
    "Content-Type": "application/x-protobuf",
    "Content-Encoding": "snappy",
    "X-Prometheus-Remote-Write-Version": "0.1.0",
}


def run_prometheus(workdir: Path, bodies: list[list[bytes]]) -> dict[str, Any]:
    """Prometheus' own receiver, started afresh, sent every body."""
    with PrometheusServer(
        extra_args=["--web.enable-remote-write-receiver"], workdir=workdir
    ) as prom:
        assert prom.proc is not None
        cpu0 = cpu_s(prom.proc.pid)
        r = send_all(f"{prom.url}/api/v1/write", bodies, HEADERS)
        r["server_cpu_s"] = cpu_s(prom.proc.pid) - cpu0
        return r


def run_gateway(
    workdir: Path,
    args: argparse.Namespace,
    rules: list[dict[str, Any]],
    bodies: list[list[bytes]],
    py_spy: str | None,
    failed: list[str],
) -> dict[str, Any]:
    """A fresh gateway sent every body; its totals checked against what was sent (mismatches
    appended to ``failed``)."""
    cfg = dict(BASE_CONFIG)
    cfg["server"] = {"otlp_grpc": {"enabled": False}, "otlp_http": {"enabled": False}}
    cfg["customers"] = _customers(args)
    cfg["rules"] = rules
    workdir.mkdir(parents=True)
    gw = GatewayProcess(workdir, cfg).start()
    try:
        assert gw.proc is not None
        spy = start_py_spy(gw.proc.pid, py_spy, args.py_spy_args) if py_spy else None
        if spy is not None:
            time.sleep(0.5)
        cpu0 = cpu_s(gw.proc.pid)
        split0 = user_system_s(gw.proc.pid)
        threads0 = thread_cpu_s(gw.proc.pid)
        headers = {**HEADERS, "Authorization": f"Bearer {INGEST_KEY}"}
        r = send_all(f"{gw.url}/api/v1/write", bodies, headers)
        r["server_cpu_s"] = cpu_s(gw.proc.pid) - cpu0
        split = user_system_s(gw.proc.pid)
        r["user_system"] = (split[0] - split0[0], split[1] - split0[1])
        r["threads"] = by_thread(threads0, thread_cpu_s(gw.proc.pid), thread_names(gw.proc.pid))
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
            print(f"py-spy profile of the gateway: {py_spy}")
        # Every series: baseline at 0, then (requests - 1) steps of 3.
        per_series = (args.requests - 1) * STEP
        with gw.client() as c:
            for i in range(args.customers):
                n = sum(1 for s in range(args.series) if s % args.customers == i)
                want = Decimal(per_series * n * args.threads)
                got = total(c, f"cust-{i}")
                if got != want:
                    failed.append(f"cust-{i}: {got} != {want}")
        return r
    finally:
        gw.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--series", type=int, default=2000, help="series (= samples) per request")
    p.add_argument("--requests", type=int, default=25, help="requests per thread")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--customers", type=int, default=50)
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of both servers, alternating which goes first; the median round is shown",
    )
    p.add_argument(
        "--py-spy", metavar="FILE", help="py-spy record the gateway while it is sent to (.txt: raw)"
    )
    p.add_argument(
        "--py-spy-args",
        default="",
        metavar="ARGS",
        help="more py-spy record arguments, e.g. '--gil' (only the thread holding the GIL)",
    )
    p.add_argument(
        "--in-process", action="store_true", help="time the receiver alone, in this process"
    )
    args = p.parse_args()
    if args.quick:
        args.series, args.requests, args.threads, args.rounds = 500, 10, 4, 1
    rules: list[dict[str, Any]] = [
        {
            "match": {"source": "remote_write", "metric": METRIC},
            "dimension": "data-processed",
            "customer_attribute": "tenant",
        }
    ]
    if args.in_process:
        return in_process(args, rules)
    samples = args.series * args.requests * args.threads
    base_ms = int(time.time() * 1000) - (args.requests + 60) * 1000
    print(f"building {args.threads * args.requests} requests of {args.series} samples ...")
    bodies = build_bodies(args, base_ms)
    size = sum(len(b) for t in bodies for b in t) / (args.threads * args.requests)
    print(f"{samples} samples per target, {size / 1024:.1f} KiB per request (snappy)")
    rounds: list[dict[str, dict[str, Any]]] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-rw-") as tmp:
        for k in range(args.rounds):
            # Alternating which goes first, so a drift of the machine's speed over the run
            # falls on both; each round starts both servers afresh with the same bodies.
            workdir = Path(tmp) / f"round-{k}"
            results: dict[str, dict[str, Any]] = {}
            order = ("prometheus", "gateway") if k % 2 == 0 else ("gateway", "prometheus")
            for name in order:
                if name == "prometheus":
                    results[name] = run_prometheus(workdir / "prom", bodies)
                else:
                    spy = args.py_spy if k == 0 else None
                    results[name] = run_gateway(workdir / "gw", args, rules, bodies, spy, failed)
            rounds.append(results)
            if args.rounds > 1:
                print(f"round {k + 1}: {_cpu_line(results, args.series)}")
    # The round whose gateway/Prometheus ratio is the median is reported in full.
    ratios = [_ratio(r, args.series) for r in rounds]
    results = rounds[sorted(range(len(rounds)), key=ratios.__getitem__)[len(rounds) // 2]]
    print()
    if args.rounds > 1:
        listed = ", ".join(f"{x:.3f}" for x in ratios)
        print(f"the median round of {args.rounds} (gateway / prometheus per CPU: {listed}):")
    print(f"{'target':<12}{'samples/s':>12}{'wall s':>9}{'p50 ms':>9}{'p99 ms':>9}{'cpu s':>8}")
    rates: dict[str, float] = {}
    for name, r in results.items():
        got = r["requests_ok"] * args.series
        rates[name] = got / r["wall_s"]
        print(
            f"{name:<12}{rates[name]:>12,.0f}{r['wall_s']:>9.2f}{r['p50_ms']:>9.1f}"
            f"{r['p99_ms']:>9.1f}{r['server_cpu_s']:>8.2f}"
        )
    for one in rounds:
        for name, r in one.items():
            if r["failures"]:
                n = len(r["failures"])
                failed.append(f"{name}: {n} failed requests, e.g. {r['failures'][0]}")
    print(f"\ngateway / prometheus = {rates['gateway'] / rates['prometheus']:.3f} (wall time)")
    for name, r in results.items():
        us = 1e6 * r["server_cpu_s"] / max(r["requests_ok"] * args.series, 1)
        print(f"server CPU per sample: {name} {us:.2f} us")
    print(f"{_cpu_line(results, args.series)} (issue 17 asks >= 0.25)")
    user, system = results["gateway"]["user_system"]
    print(f"gateway CPU s: user {user:.2f}, system {system:.2f}")
    print(f"gateway CPU s by thread: {results['gateway']['threads']}")
    print(f"load average: {os.getloadavg()}")
    for f in failed:
        print("FAILED:", f)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
