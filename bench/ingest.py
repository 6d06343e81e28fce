"""Ingest benchmark: durable, deduplicated records per second through ``POST /v1/usage``.

Starts a real ``meter-gateway serve`` (tests/gatewayproc.py) in a temporary directory and posts
NDJSON batches with unique ids from separate client processes, each with several threads and
one keep-alive ``http.client`` connection per thread. Bodies are built before the clock starts.
Throughput counts only records that a 2xx response reported as accepted (the gateway answers
after the fsynced commit), divided by the wall time from the first send to the last response.

Two phases, each against a fresh gateway:

* ``fresh``  -- an empty database;
* ``seeded`` -- ``--seed-ids`` dedup keys (default 10 million) already in the dedup window,
  written straight into the SQLite file before start-up (rows of ``dedup_log``), plus a few
  thousand keys of real ids that are re-posted afterwards and must all come back duplicates.

After each phase the bench checks that ``GET /v1/usage?window=month`` per customer equals the
accepted records times the record value, and that re-posting one batch gives only duplicates.

    python -m bench.ingest                 # 300k records per phase, 8 connections, 1 process
    python -m bench.ingest --quick         # small run
    python -m bench.ingest --procs 2 --connections 8 --records 500000
    python -m bench.ingest --py-spy /tmp/prof   # py-spy record the server in each phase
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import multiprocessing as mp
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

if __package__ in (None, ""):  # run as ``python bench/ingest.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meter_gateway.model import dedup_key
from meter_gateway.store.sqlite import SQLiteStore
from tests.gatewayproc import ADMIN_KEY, BASE_CONFIG, INGEST_KEY, GatewayProcess

NS = 1_000_000_000
CUSTOMERS = ("dumm-ai", "acme")
DIMENSION = "data-processed"
VALUE = 3  # recordValue of every record
DEDUP_WINDOW_S = 35 * 86400
KNOWN_SEED_IDS = 2_000  # real ids among the seeded keys, re-posted after the seeded phase


# --- request bodies ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What every client posts: batch ``b`` holds the records ``b*batch ..`` of the plan,
    each with a unique id made of the plan's random ``nonce`` and the record's index."""

    prefix: str
    nonce: int
    id_style: str
    batches: int
    batch: int
    base_s: int  # records are stamped within the 10 minutes before this second
    ts_order: str = "live"  # live: ascending with ≤1 s jitter; random: anywhere in 10 minutes

    def body(self, b: int) -> bytes:
        lines = []
        for i in range(b * self.batch, (b + 1) * self.batch):
            ts = self.stamp(i)
            lines.append(
                b'{"id":"%s","timestamp":"%s","customerId":"%s","dimensionId":"%s",'
                b'"recordValue":%d}'
                % (
                    self.record_id(i).encode(),
                    ts.encode(),
                    CUSTOMERS[i % 2].encode(),
                    DIMENSION.encode(),
                    VALUE,
                )
            )
        return b"\n".join(lines) + b"\n"

    def record_id(self, i: int) -> str:
        if self.id_style == "digits":  # e.g. snowflake-like ids: a 19-digit run
            return f"{self.prefix}-{self.nonce % 10**9:09d}{i:010d}"
        # UUID-shaped (the common case): ``<nonce>-xxxx-4xxx-8xxx-<i as 12 hex digits>``
        n = self.nonce
        return (
            f"{n >> 64 & 0xFFFFFFFF:08x}-{n >> 48 & 0xFFFF:04x}-4{n >> 36 & 0xFFF:03x}-"
            f"8{n >> 24 & 0xFFF:03x}-{i:012x}"
        )

    def per_customer(self, b: int) -> dict[str, int]:
        ids = range(b * self.batch, (b + 1) * self.batch)
        return {c: sum(1 for i in ids if CUSTOMERS[i % 2] == c) for c in CUSTOMERS}

    def stamp(self, i: int) -> str:
        """Millisecond timestamps in the 10 minutes before ``base_s``: ``live`` rises with the
        record index (as live traffic does) with up to 1 s of jitter; ``random`` scatters them
        over the whole 10 minutes (late and out-of-order data: every insert into the time
        indexes lands on a different page)."""
        span = 600_000
        if self.ts_order == "random":
            off = (i * 7919) % span
        else:
            n = self.batches * self.batch
            off = span - 1 - (i * (span - 1000)) // max(1, n) - (i * 7919) % 1000
        return _fmt_ms(self.base_s * 1000 - off)


def _fmt_ms(ms: int) -> str:
    s, frac = divmod(ms, 1000)
    return datetime.fromtimestamp(s, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:03d}Z"


# --- client processes --------------------------------------------------------------------------


@dataclass
class ClientResult:
    t0: float = 0.0
    t1: float = 0.0
    latencies: list[float] = field(default_factory=list)
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    ok_batches: list[int] = field(default_factory=list)  # batches fully accepted
    bad: list[str] = field(default_factory=list)
    retries_429: int = 0
    reconnects: int = 0
    cpu_s: float = 0.0
    build_s: float = 0.0


def post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
    conn.request(
        "POST",
        "/v1/usage",
        body=body,
        headers={
            "Content-Type": "application/x-ndjson",
            "Authorization": f"Bearer {INGEST_KEY}",
        },
    )
    resp = conn.getresponse()
    return resp.status, resp.read()


def client_main(
    port: int, plan: Plan, mine: list[int], threads: int, barrier: Any, out: Any
) -> None:
    """One client process: build its bodies, wait for the start, post them over ``threads``
    keep-alive connections (each thread takes the next unsent batch)."""
    res = ClientResult()
    t = time.monotonic()
    bodies = [(b, plan.body(b)) for b in mine]
    res.build_s = time.monotonic() - t
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=120) for _ in range(threads)]
    for c in conns:
        c.connect()
    nxt = itertools.count()  # next() on a count is atomic under the GIL
    lock = threading.Lock()

    def worker(conn: http.client.HTTPConnection) -> None:
        lat: list[float] = []
        local = ClientResult()
        while (k := next(nxt)) < len(bodies):
            b, body = bodies[k]
            while True:
                start = time.monotonic()
                try:
                    status, raw = post(conn, body)
                except (OSError, http.client.HTTPException) as exc:
                    local.reconnects += 1
                    local.bad.append(f"batch {b}: {type(exc).__name__}: {exc}")
                    conn.close()
                    conn.connect()
                    continue
                lat.append(time.monotonic() - start)
                if status == 429:
                    local.retries_429 += 1
                    time.sleep(0.02)
                    continue
                break
            if 200 <= status < 300:
                r = orjson.loads(raw)
                local.accepted += r["accepted"]
                local.duplicates += r["duplicates"]
                local.rejected += r["rejected"]
                if r["accepted"] == plan.batch:
                    local.ok_batches.append(b)
                else:
                    local.bad.append(f"batch {b}: {raw[:300]!r}")
            else:
                local.bad.append(f"batch {b}: HTTP {status} {raw[:300]!r}")
        with lock:
            res.latencies.extend(lat)
            for name in ("accepted", "duplicates", "rejected", "retries_429", "reconnects"):
                setattr(res, name, getattr(res, name) + getattr(local, name))
            res.ok_batches.extend(local.ok_batches)
            res.bad.extend(local.bad)

    workers = [threading.Thread(target=worker, args=(c,)) for c in conns]
    cpu0 = time.process_time()
    barrier.wait()
    res.t0 = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    res.t1 = time.monotonic()
    res.cpu_s = time.process_time() - cpu0
    for c in conns:
        c.close()
    out.put(res)


# --- server helpers ----------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds all processes on the machine have used (non-idle time in /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def create_schema(db: Path) -> None:
    """Let the store create its schema (migrations), then release the file."""
    SQLiteStore(str(db), DEDUP_WINDOW_S, time.time_ns()).close()


def seed_dedup(db: Path, n: int, per_row: int = 100_000) -> list[str]:
    """Write ``n`` dedup keys seen now straight into ``dedup_log``; the first ``KNOWN_SEED_IDS``
    are digests of real ids (returned), the rest random."""
    known = [f"seeded-{i:08d}" for i in range(min(KNOWN_SEED_IDS, n))]
    now_s = int(time.time())
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("BEGIN")
    left = n
    first = True
    while left > 0:
        k = min(per_row, left)
        if first:
            blob = b"".join(dedup_key("id", rid) for rid in known) + os.urandom(
                16 * (k - len(known))
            )
            first = False
        else:
            blob = os.urandom(16 * k)
        conn.execute("INSERT INTO dedup_log (seen_s, keys) VALUES (?, ?)", (now_s, blob))
        left -= k
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return known


def start_gateway(workdir: Path) -> tuple[GatewayProcess, float]:
    gw = GatewayProcess(workdir, BASE_CONFIG)
    t = time.monotonic()
    gw.start(timeout=300)
    return gw, time.monotonic() - t


def start_py_spy(pid: int, out: str, gil: bool) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy")
    if exe is None:
        print("py-spy not found (pip install py-spy); profiling skipped")
        return None
    fmt = "raw" if out.endswith(".txt") else "flamegraph"
    return subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--threads",
            "--rate",
            "200",
            "--format",
            fmt,
            "--output",
            out,
            "--nonblocking",
            *(["--gil"] if gil else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


# --- one phase ---------------------------------------------------------------------------------


@dataclass
class PhaseResult:
    name: str
    records: int
    accepted: int
    wall_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    requests: int
    retries_429: int
    server_cpu_s: float
    client_cpu_s: float
    startup_s: float
    ok: bool

    @property
    def rate(self) -> float:
        return self.accepted / self.wall_s if self.wall_s else 0.0


def run_load(
    gw: GatewayProcess, plan: Plan, procs: int, connections: int
) -> tuple[list[ClientResult], float, float]:
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(procs + 1)
    out = ctx.Queue()
    threads = [connections // procs + (1 if i < connections % procs else 0) for i in range(procs)]
    shares = [list(range(plan.batches))[i::procs] for i in range(procs)]
    children = [
        ctx.Process(target=client_main, args=(gw.port, plan, shares[i], threads[i], barrier, out))
        for i in range(procs)
    ]
    for c in children:
        c.start()
    barrier.wait(timeout=600)  # every client has built its bodies and connected
    assert gw.proc is not None
    cpu0, busy0 = proc_cpu_s(gw.proc.pid), machine_busy_s()
    results = [out.get(timeout=3600) for _ in children]
    server_cpu = proc_cpu_s(gw.proc.pid) - cpu0
    busy = machine_busy_s() - busy0
    for c in children:
        c.join()
    return results, server_cpu, busy


def commit_stats(gw: GatewayProcess) -> str:
    """Group-commit figures from the gateway's own /metrics."""
    with gw.client(ADMIN_KEY) as http:
        r = http.get("/metrics")
    if r.status_code != 200:
        return f"/metrics: HTTP {r.status_code}"
    m: dict[str, float] = {}
    for line in r.text.splitlines():
        if line.startswith(("meter_gateway_commit_records_", "meter_gateway_commit_duration_")):
            key, _, val = line.rpartition(" ")
            if key.endswith(("_sum", "_count")):
                m[key] = float(val)
    n = m.get("meter_gateway_commit_records_count", 0)
    if not n:
        return "no commits in /metrics"
    recs = m.get("meter_gateway_commit_records_sum", 0)
    secs = m.get("meter_gateway_commit_duration_seconds_sum", 0)
    return (
        f"group commits: {n:.0f}, mean {recs / n:,.0f} records and {1000 * secs / n:.1f} ms "
        f"each; writer busy {secs:.2f}s in commits ({1e6 * secs / max(recs, 1):.1f} us/record)"
    )


def verify(
    gw: GatewayProcess, plan: Plan, ok_batches: list[int], accepted: int, known_dups: list[str]
) -> list[str]:
    """Problems found (empty when all is well)."""
    problems = []
    expected = dict.fromkeys(CUSTOMERS, 0)
    for b in ok_batches:
        for c, n in plan.per_customer(b).items():
            expected[c] += n
    if sum(expected.values()) != accepted:
        problems.append(
            f"accepted {accepted} != records of fully accepted batches {sum(expected.values())}"
        )
    first_ts = datetime.fromtimestamp(plan.base_s - 601, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    with gw.client(ADMIN_KEY) as http:
        for c in CUSTOMERS:
            r = http.get(
                "/v1/usage",
                params={
                    "window": "month",
                    "customerId": c,
                    "dimensionId": DIMENSION,
                    "from": first_ts,
                },
            )
            if r.status_code != 200:
                problems.append(f"GET /v1/usage for {c}: HTTP {r.status_code} {r.text[:200]}")
                continue
            got = sum(
                (Decimal(w["value"]) for w in r.json()["data"] if w["value"] is not None),
                Decimal(0),
            )
            want = Decimal(expected[c] * VALUE)
            print(
                f"  verify usage {c}/{DIMENSION}: got {got} want {want} "
                f"({expected[c]} records x {VALUE}) {'ok' if got == want else 'MISMATCH'}"
            )
            if got != want:
                problems.append(f"usage of {c}: got {got}, want {want}")
    with gw.client(INGEST_KEY) as http:
        again = plan.body(ok_batches[0] if ok_batches else 0)
        r = http.post("/v1/usage", content=again, headers={"Content-Type": "application/x-ndjson"})
        body = r.json()
        good = r.status_code == 200 and body["duplicates"] == plan.batch and body["accepted"] == 0
        print(
            f"  verify re-post of one batch: HTTP {r.status_code} accepted={body['accepted']} "
            f"duplicates={body['duplicates']} {'ok' if good else 'WRONG'}"
        )
        if not good:
            problems.append(f"re-posted batch: {r.status_code} {body}")
        if known_dups:
            lines = b"\n".join(
                orjson.dumps(
                    {
                        "id": rid,
                        "timestamp": plan.stamp(0),
                        "customerId": CUSTOMERS[0],
                        "dimensionId": DIMENSION,
                        "recordValue": VALUE,
                    }
                )
                for rid in known_dups
            )
            r = http.post(
                "/v1/usage", content=lines, headers={"Content-Type": "application/x-ndjson"}
            )
            body = r.json()
            good = r.status_code == 200 and body["duplicates"] == len(known_dups)
            print(
                f"  verify ids seeded before start-up: HTTP {r.status_code} "
                f"accepted={body['accepted']} duplicates={body['duplicates']} "
                f"of {len(known_dups)} {'ok' if good else 'WRONG'}"
            )
            if not good:
                problems.append(f"seeded ids re-posted: {r.status_code} {body}")
    return problems


def phase(name: str, args: argparse.Namespace, root: Path, run: int) -> PhaseResult:
    workdir = root / f"{name}-{run}"
    workdir.mkdir()
    db = workdir / "gateway.db"
    known: list[str] = []
    if name == "seeded":
        t = time.monotonic()
        create_schema(db)
        known = seed_dedup(db, args.seed_ids)
        print(
            f"[{name}] seeded {args.seed_ids:,} dedup keys into {db.name} in "
            f"{time.monotonic() - t:.2f}s ({db.stat().st_size / 1e6:.0f} MB)"
        )
    gw, startup = start_gateway(workdir)
    assert gw.proc is not None
    pid = gw.proc.pid
    print(
        f"[{name}] gateway start-up (spawn to /readyz 200): {startup:.2f}s, "
        f"RSS {proc_rss_mb(pid):.0f} MB"
    )
    spy = None
    try:
        nbatches = max(1, args.records // args.batch)
        plan = Plan(
            name,
            int.from_bytes(os.urandom(12), "big"),
            args.ids,
            nbatches,
            args.batch,
            int(time.time()),
            args.ts_order,
        )
        if args.py_spy:
            spy = start_py_spy(pid, f"{args.py_spy}-{name}.{args.py_spy_format}", args.py_spy_gil)
            time.sleep(0.5)
        results, server_cpu, machine_cpu = run_load(gw, plan, args.procs, args.connections)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
            print(f"[{name}] py-spy profile: {args.py_spy}-{name}.{args.py_spy_format}")
        wall = max(r.t1 for r in results) - min(r.t0 for r in results)
        lat = sorted(x for r in results for x in r.latencies)
        accepted = sum(r.accepted for r in results)
        ok_batches = sorted(b for r in results for b in r.ok_batches)
        bad = [m for r in results for m in r.bad]
        for m in bad[:5]:
            print(f"[{name}] problem: {m}")
        res = PhaseResult(
            name=name,
            records=nbatches * args.batch,
            accepted=accepted,
            wall_s=wall,
            p50_ms=1000 * lat[len(lat) // 2] if lat else 0.0,
            p99_ms=1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else 0.0,
            max_ms=1000 * lat[-1] if lat else 0.0,
            requests=len(lat),
            retries_429=sum(r.retries_429 for r in results),
            server_cpu_s=server_cpu,
            client_cpu_s=sum(r.cpu_s for r in results),
            startup_s=startup,
            ok=not bad,
        )
        print(
            f"[{name}] client bodies built in {max(r.build_s for r in results):.2f}s "
            f"(before timing), {args.procs} process(es) x "
            f"{args.connections} connection(s) in total"
        )
        print(
            f"[{name}] records/s (durable, deduplicated): {res.rate:,.0f}  "
            f"({accepted:,} accepted of {res.records:,} in {wall:.2f}s)"
        )
        print(
            f"[{name}] request latency ms: p50 {res.p50_ms:.1f}  p99 {res.p99_ms:.1f}  "
            f"max {res.max_ms:.1f}  ({res.requests} requests, {res.retries_429} x 429)"
        )
        print(
            f"[{name}] CPU during load: server {server_cpu:.2f}s "
            f"({100 * server_cpu / wall:.0f}% of one core), clients {res.client_cpu_s:.2f}s "
            f"({100 * res.client_cpu_s / wall:.0f}%), anything else "
            f"{max(0.0, machine_cpu - server_cpu - res.client_cpu_s):.2f}s; "
            f"server RSS {proc_rss_mb(pid):.0f} MB"
        )
        print(f"[{name}] {commit_stats(gw)}")
        problems = verify(gw, plan, ok_batches, accepted, known)
        for p in problems:
            print(f"[{name}] VERIFY FAILED: {p}")
        res.ok = res.ok and not problems
        return res
    finally:
        code = gw.stop()
        if code != 0:
            print(f"[{name}] gateway exited {code}; log:\n{gw.log()[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.ingest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--records", type=int, default=300_000, help="records per phase")
    ap.add_argument(
        "--connections",
        type=int,
        default=8,
        help="keep-alive connections in total (threads over the processes)",
    )
    ap.add_argument("--procs", type=int, default=1, help="client processes")
    ap.add_argument("--batch", type=int, default=1000, help="records per request")
    ap.add_argument(
        "--seed-ids",
        type=int,
        default=10_000_000,
        help="dedup keys already in the window for the seeded phase",
    )
    ap.add_argument(
        "--ids",
        choices=["uuid", "digits"],
        default="uuid",
        help="record id shape: UUID-like, or with a 19-digit run (snowflake-like)",
    )
    ap.add_argument(
        "--ts-order",
        choices=["live", "random"],
        default="live",
        help="record timestamps: rising like live traffic, or scattered over 10 min",
    )
    ap.add_argument("--phases", default="fresh,seeded", help="comma list: fresh, seeded")
    ap.add_argument(
        "--quick", action="store_true", help="small run: 20,000 records, 200,000 seeded ids"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument(
        "--py-spy",
        metavar="PREFIX",
        help="py-spy record the server during each phase to PREFIX-<phase>.svg",
    )
    ap.add_argument(
        "--py-spy-format",
        default="svg",
        choices=["svg", "txt"],
        help="svg flame graph or txt (collapsed stacks)",
    )
    ap.add_argument(
        "--py-spy-gil",
        action="store_true",
        help="sample only the thread holding the GIL (where Python time goes)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="run each phase this many times")
    args = ap.parse_args(argv)
    if args.quick:
        args.records = min(args.records, 20_000)
        args.seed_ids = min(args.seed_ids, 200_000)
    args.procs = max(1, min(args.procs, args.connections))
    print(
        f"meter-gateway ingest bench: {args.records:,} records per phase in batches of "
        f"{args.batch}, {args.connections} connections over {args.procs} client process(es), "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
    )
    root = Path(tempfile.mkdtemp(prefix="meter-gateway-bench-"))
    names = [p.strip() for p in args.phases.split(",") if p.strip()]
    for name in names:
        if name not in ("fresh", "seeded"):
            ap.error(f"unknown phase {name!r}")
    results: dict[str, list[PhaseResult]] = {name: [] for name in names}
    try:
        for run in range(args.repeat):
            for name in names:
                results[name].append(phase(name, args, root, run))
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print("summary:")
    medians: dict[str, float] = {}
    for name, runs in results.items():
        for r in runs:
            print(
                f"  {r.name:6s} records/s {r.rate:>9,.0f}  p50 {r.p50_ms:6.1f} ms  "
                f"p99 {r.p99_ms:6.1f} ms  start-up {r.startup_s:5.2f} s  "
                f"verify {'ok' if r.ok else 'FAILED'}"
            )
        medians[name] = statistics.median(r.rate for r in runs)
        if len(runs) > 1:
            print(f"  {name:6s} median records/s {medians[name]:,.0f} over {len(runs)} runs")
    if medians.get("fresh") and "seeded" in medians:
        print(f"  ratio seeded/fresh: {medians['seeded'] / medians['fresh']:.2f}")
    return 0 if all(r.ok for runs in results.values() for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
