"""Realistic ingest benchmark (issue 17): many customers, every kind of aggregation, metadata,
out-of-order time and a full dedup window -- verified exactly against what was sent.

Workload, per phase on a fresh gateway and a fresh database:

* ``--customers`` (default 1,000) customers on one offering, six dimensions: ``sum``, ``count``,
  ``max``, ``unique_count`` (``user_id`` out of ``--users``, default 5,000), ``weighted_sum``
  (changes, some negative) and an hourly ``sum`` billed in increments of 60 rounded up;
  every record carries two metadata keys (``user_id``, ``region``) and a UUID-shaped id;
* NDJSON batches of ``--batch`` records over ``--connections`` keep-alive connections
  (bench/ingest.py's client processes: bodies are built before the clock starts, only records
  a 2xx reported as accepted count, over the wall time from the first send to the last answer);
* timestamps over 20 minutes -- centred 6 minutes before the bodies are built, so none is more
  than the gateway's 5 minutes in the future -- scattered at random (``out``) or rising with
  the record index (``in``); ``--order both`` runs the two and prints their ratio;
* ``--seed-ids`` dedup keys already in the window before start-up, written the fast way
  (bench/ingest.py for SQLite, bench/replicas.py for PostgreSQL); 2,000 of them are digests of
  real ids that are re-posted at the end and must all come back duplicates.

After the load the bench recomputes, with ``Decimal``, what every window and every summary
must say and compares exactly: ``GET /v1/usage?window=hour`` for each dimension over all
customers (sum, count, max, distinct users, time-weighted level, hourly sum), and every
customer's ``usage-summary`` for the month up to a fixed past instant (billable quantities,
the hourly dimension rounded up per hour). Then it times ``usage-summary`` for the current
month and for a year over ``--read-customers`` customers. It prints durable records/s, request
latency p50/p99/max, the gateway's peak RSS (VmHWM) and those read latencies.

``--with-best-case`` adds a short ``bench.ingest`` run (2 customers, one ``sum`` dimension, in
order) on the same store for one comparison line. ``--overload`` offers twice the rate the
out-of-order phase sustained for ``--overload-s`` seconds, open loop (no retries), and reports
the share of 429s (and whether they carry ``Retry-After``), peak RSS and ``/healthz`` latency;
what was accepted is verified as well.

    python -m bench.mix                               # SQLite then PostgreSQL, 300k records
    python -m bench.mix --store sqlite --order out --records 100000
    python -m bench.mix --store sqlite --seed-ids 10000000
    python -m bench.mix --store sqlite --with-best-case --overload
    python -m bench.mix --store sqlite --order out --py-spy /tmp/mix   # raw stacks of the load
    python -m bench.mix --store sqlite --order out --py-spy /tmp/mix --py-spy-gil  # GIL holders
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Context, Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg

if __package__ in (None, ""):  # run as ``python bench/mix.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ingest import (
    commit_stats,
    create_schema,
    proc_cpu_s,
    run_load,
    seed_dedup,
    start_py_spy,
)
from bench.ingest import phase as best_case_phase
from bench.replicas import seed_pg
from meter_gateway.store.postgres import migrate
from tests import pgdb
from tests.gatewayproc import ADMIN_KEY, BASE_CONFIG, INGEST_KEY, GatewayProcess

NS = 1_000_000_000
MS = 1_000_000
HOUR_NS = 3600 * NS
SPAN_MS = 20 * 60 * 1000  # timestamps spread over 20 minutes ...
CENTRE_LAG_MS = 6 * 60 * 1000  # ... centred this long before the bodies are built
REGIONS = ("eu-west-1", "us-east-1", "ap-south-1", "sa-east-1")

# The six dimensions, in the order records cycle through them.
SUM, COUNT, MAX, USERS, STORAGE, COMPUTE = range(6)
DIMENSIONS: list[dict[str, Any]] = [
    {"id": "data-processed", "name": "Data Processed", "unit": "gigabyte", "aggregation": "sum",
     "price": "0.08", "unit_cost": "0.02"},
    {"id": "api-calls", "name": "API Calls", "unit": "request", "aggregation": "count",
     "price": "0.0001"},
    {"id": "peak-connections", "name": "Peak Connections", "unit": "connection",
     "aggregation": "max"},
    {"id": "active-users", "name": "Active Users", "unit": "user",
     "aggregation": "unique_count", "unique_key": "user_id", "price": "2"},
    {"id": "storage", "name": "Storage", "unit": "gigabyte", "aggregation": "weighted_sum",
     "price": "0.023"},
    {"id": "compute-time", "name": "Compute Time", "unit": "minute", "aggregation": "sum",
     "aggregation_interval": "hour", "usage_increment": 60, "rounding": "ceil",
     "price": "0.096"},
]  # fmt: skip
DIM_IDS = [d["id"] for d in DIMENSIONS]

# The gateway's result rule (aggregation.engine.divide): exact when short, else 18 places.
_EXACT = Context(prec=120, rounding=ROUND_HALF_EVEN, Emax=10_000, Emin=-10_000)
_PLACES = Decimal("1e-18")


def customer_id(k: int) -> str:
    return f"cust-{k:04d}"


def mix_config(customers: int) -> dict[str, Any]:
    """The gateway config: BASE_CONFIG's keys, six dimensions, one offering, the customers."""
    return {
        "auth": BASE_CONFIG["auth"],
        "dimensions": DIMENSIONS,
        "offerings": [
            {
                "id": "usage",
                "name": "Usage",
                "currency": "USD",
                "charges": [
                    {"dimension": d["id"], "model": "per_unit"} for d in DIMENSIONS if "price" in d
                ],
            }
        ],
        "customers": [
            {"id": customer_id(k), "name": f"Customer {k}", "offering": "usage"}
            for k in range(customers)
        ],
    }


def divide(a: Decimal, b: int) -> Decimal:
    q = _EXACT.divide(a, Decimal(b))
    exp = q.as_tuple().exponent
    if isinstance(exp, int) and exp < -18:
        q = q.quantize(_PLACES, rounding=ROUND_HALF_EVEN, context=_EXACT)
    return q


def _sum(values: Iterable[Decimal]) -> Decimal:
    total = Decimal(0)
    for v in values:
        total = _EXACT.add(total, v)
    return total


def _fixed(n: int, places: int) -> str:
    """``n / 10**places`` as decimal text: _fixed(-1234, 2) == "-12.34"."""
    sign, n = ("-", -n) if n < 0 else ("", n)
    unit = 10**places
    return f"{sign}{n // unit}.{n % unit:0{places}d}"


def _iso_ms(ms: int) -> str:
    s, frac = divmod(ms, 1000)
    return datetime.fromtimestamp(s, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:03d}Z"


def _iso_ns(ns: int) -> str:
    return _iso_ms(ns // MS)


def _parse_ns(text: str) -> int:
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int(dt.timestamp()) * NS + dt.microsecond * 1000


# --- the workload ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rec:
    index: int
    ts_ms: int
    customer: int
    dim: int
    value: str  # decimal text, sent as a JSON number
    user: int


@dataclass(frozen=True)
class MixPlan:
    """What the clients post. Batch ``b`` holds records ``b*batch ..``; each record's customer,
    value, user and (out of order) timestamp come from a generator seeded with the batch, so
    the bench regenerates exactly what it sent when it verifies."""

    nonce: int
    batches: int
    batch: int
    customers: int
    users: int
    start_ms: int  # earliest timestamp; the latest is start_ms + SPAN_MS - 1
    in_order: bool

    @classmethod
    def new(cls, records: int, batch: int, customers: int, users: int, in_order: bool) -> MixPlan:
        now_ms = time.time_ns() // MS
        return cls(
            nonce=int.from_bytes(os.urandom(12), "big"),
            batches=max(1, records // batch),
            batch=batch,
            customers=customers,
            users=users,
            start_ms=now_ms - CENTRE_LAG_MS - SPAN_MS // 2,
            in_order=in_order,
        )

    @property
    def records_total(self) -> int:
        return self.batches * self.batch

    def records(self, b: int) -> list[Rec]:
        rng = random.Random(self.nonce * 1_000_003 + b)
        n = self.records_total
        out = []
        for i in range(b * self.batch, (b + 1) * self.batch):
            dim = i % 6
            if self.in_order:
                ts = self.start_ms + i * SPAN_MS // n
            else:
                ts = self.start_ms + rng.randrange(SPAN_MS)
            if dim == SUM:
                value = _fixed(rng.randrange(1, 100_000), 3)
            elif dim == MAX:
                value = str(rng.randrange(1, 10_000))
            elif dim == STORAGE:
                value = _fixed(rng.randrange(-1_000, 10_000), 2)
            elif dim == COMPUTE:
                value = _fixed(rng.randrange(1, 600), 1)
            else:  # count, unique_count: the value does not matter
                value = "1"
            out.append(
                Rec(i, ts, rng.randrange(self.customers), dim, value, rng.randrange(self.users))
            )
        return out

    def record_id(self, i: int) -> str:
        n = self.nonce
        return (
            f"{n >> 64 & 0xFFFFFFFF:08x}-{n >> 48 & 0xFFFF:04x}-4{n >> 36 & 0xFFF:03x}-"
            f"8{n >> 24 & 0xFFF:03x}-{i:012x}"
        )

    def body(self, b: int) -> bytes:
        return b"".join(
            b'{"id":"%s","timestamp":"%s","customerId":"%s","dimensionId":"%s",'
            b'"recordValue":%s,"metadata":{"user_id":"u-%05d","region":"%s"}}\n'
            % (
                self.record_id(r.index).encode(),
                _iso_ms(r.ts_ms).encode(),
                customer_id(r.customer).encode(),
                DIM_IDS[r.dim].encode(),
                r.value.encode(),
                r.user,
                REGIONS[r.user % len(REGIONS)].encode(),
            )
            for r in self.records(b)
        )


# --- what the gateway must answer --------------------------------------------------------------


class Expected:
    """Exact aggregates of the accepted records with timestamps before ``to_ns``, recomputed
    from what was sent, per (dimension, customer) and window."""

    def __init__(self, plan: MixPlan, ok_batches: list[int], to_ns: int) -> None:
        self.to_ns = to_ns
        # (dimension, customer) -> [(ts_ns, value, user)]
        self.points: dict[tuple[int, int], list[tuple[int, Decimal, int]]] = defaultdict(list)
        for b in ok_batches:
            for r in plan.records(b):
                ts = r.ts_ms * MS
                if ts < to_ns:
                    self.points[(r.dim, r.customer)].append((ts, Decimal(r.value), r.user))

    def customers(self, dim: int) -> set[int]:
        return {c for d, c in self.points if d == dim}

    def value(self, dim: int, customer: int, s: int, e: int) -> Decimal | None:
        """What ``GET /v1/usage`` must say for the window ``[s, e)``."""
        points = self.points.get((dim, customer), [])
        inside = [(ts, v, u) for ts, v, u in points if s <= ts < e]
        method = DIMENSIONS[dim]["aggregation"]
        if method == "weighted_sum":
            # changes to a level carried across windows: Σ level × ns held ÷ window ns
            level = _sum(v for ts, v, _ in points if ts < s)
            integral = _EXACT.multiply(level, e - s)
            for ts, v, _ in inside:
                integral = _EXACT.add(integral, _EXACT.multiply(v, e - ts))
            return divide(integral, e - s)
        if method == "unique_count":
            return Decimal(len({u for _, _, u in inside}))
        if method == "count":
            return Decimal(len(inside))
        if method == "max":
            return max((v for _, v, _ in inside), default=None)
        return _sum(v for _, v, _ in inside)

    def quantity(self, dim: int, customer: int, s: int, e: int) -> Decimal:
        """The billable quantity ``usage-summary`` must show for ``[s, e)``."""
        if DIMENSIONS[dim].get("aggregation_interval") == "hour":
            total = Decimal(0)
            for ws, we in hour_windows(s, e):
                v = self.value(dim, customer, ws, we)
                assert v is not None
                q = divide(v, DIMENSIONS[dim]["usage_increment"])
                total = _EXACT.add(total, q.quantize(Decimal(1), ROUND_CEILING, _EXACT))
            return total
        v = self.value(dim, customer, s, e)
        return Decimal(0) if v is None else v


def hour_windows(s: int, e: int) -> Iterator[tuple[int, int]]:
    """UTC hour windows in ``[s, e)``, clipped to it."""
    h = s - s % HOUR_NS
    while h < e:
        yield max(h, s), min(h + HOUR_NS, e)
        h += HOUR_NS


@dataclass
class Verification:
    checked: int = 0  # values compared
    problems: list[str] = field(default_factory=list)
    month_ms: list[float] = field(default_factory=list)  # usage-summary latencies, month to date

    def compare(self, what: str, got: Decimal | None, want: Decimal | None) -> None:
        self.checked += 1
        if got != want and len(self.problems) < 1000:
            self.problems.append(f"{what}: got {got}, want {want}")


def _dec(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


def verify(
    gw: GatewayProcess, plan: MixPlan, ok_batches: list[int], to_ns: int | None = None
) -> Verification:
    """Compare every hour window of every dimension and every customer's summary for the month
    up to ``to_ns`` (default: now; a past instant, so nothing depends on the gateway's clock)
    with what the accepted batches must add up to."""
    to_ns = to_ns if to_ns is not None else time.time_ns() // MS * MS
    exp = Expected(plan, ok_batches, to_ns)
    out = Verification()
    from_ns = plan.start_ms * MS - plan.start_ms * MS % HOUR_NS
    with gw.client(ADMIN_KEY) as http:
        for dim, dim_id in enumerate(DIM_IDS):
            r = http.get(
                "/v1/usage",
                params={
                    "window": "hour",
                    "dimensionId": dim_id,
                    "from": _iso_ns(from_ns),
                    "to": _iso_ns(to_ns),
                },
                timeout=300,
            )
            if r.status_code != 200:
                out.problems.append(f"GET /v1/usage {dim_id}: HTTP {r.status_code} {r.text[:200]}")
                continue
            got: dict[tuple[int, int], Decimal | None] = {}
            for w in r.json()["data"]:
                c = int(w["customerId"].removeprefix("cust-"))
                got[(c, _parse_ns(w["start"]))] = _dec(w["value"])
            seen = {c for c, _ in got}
            for c in sorted(exp.customers(dim) | seen):
                if c not in seen:
                    out.problems.append(f"{dim_id} of {customer_id(c)}: missing from the answer")
                    continue
                for s, e in hour_windows(from_ns, to_ns):
                    out.compare(
                        f"{dim_id} of {customer_id(c)} in the hour from {_iso_ns(s)}",
                        got.get((c, s)),
                        exp.value(dim, c, s, e),
                    )
        month_ns = _month_start(to_ns)
        for c in range(plan.customers):
            t = time.monotonic()
            r = http.get(
                f"/v1/customers/{customer_id(c)}/usage-summary",
                params={"from": _iso_ns(month_ns), "to": _iso_ns(to_ns)},
                timeout=300,
            )
            out.month_ms.append(1000 * (time.monotonic() - t))
            if r.status_code != 200:
                out.problems.append(f"usage-summary {customer_id(c)}: HTTP {r.status_code}")
                continue
            lines = {ln["dimensionId"]: Decimal(ln["quantity"]) for ln in r.json()["dimensions"]}
            for dim, dim_id in enumerate(DIM_IDS):
                want = exp.quantity(dim, c, month_ns, to_ns)
                have = lines.get(dim_id)
                if have is None and (dim, c) not in exp.points and "price" not in DIMENSIONS[dim]:
                    continue  # unused and not charged: not listed
                if want < 0 and have == 0:
                    want = Decimal(0)  # a negative quantity may be billed as 0 (SPEC §9)
                out.compare(f"usage-summary {dim_id} of {customer_id(c)}", have, want)
    return out


def _month_start(ns: int) -> int:
    d = datetime.fromtimestamp(ns // NS, tz=UTC)
    return int(datetime(d.year, d.month, 1, tzinfo=UTC).timestamp()) * NS


def duplicates_ok(gw: GatewayProcess, body: bytes, n: int) -> bool:
    with gw.client(INGEST_KEY) as http:
        r = http.post("/v1/usage", content=body, headers={"Content-Type": "application/x-ndjson"})
    return r.status_code == 200 and r.json()["duplicates"] == n and r.json()["accepted"] == 0


def seeded_body(plan: MixPlan, known: list[str]) -> bytes:
    ts = _iso_ms(plan.start_ms).encode()
    return b"".join(
        b'{"id":"%s","timestamp":"%s","customerId":"%s","dimensionId":"api-calls",'
        b'"recordValue":1}\n' % (rid.encode(), ts, customer_id(0).encode())
        for rid in known
    )


def read_latency(gw: GatewayProcess, customers: list[int], params: dict[str, str]) -> list[float]:
    out = []
    with gw.client(ADMIN_KEY) as http:
        for c in customers:
            t = time.monotonic()
            r = http.get(
                f"/v1/customers/{customer_id(c)}/usage-summary", params=params, timeout=300
            )
            out.append(1000 * (time.monotonic() - t))
            r.raise_for_status()
    return out


def scrape_stats(gw: GatewayProcess) -> str:
    """The gateway's group-commit figures and how long its /metrics took to answer (per-customer
    series make it grow with the customers)."""
    t = time.monotonic()
    try:
        text = commit_stats(gw)
    except httpx.HTTPError as exc:
        text = f"/metrics failed: {type(exc).__name__} {exc}"
    return f"{text}; /metrics answered in {time.monotonic() - t:.1f}s"


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * q))]


def vm_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


# --- phases ------------------------------------------------------------------------------------


@contextmanager
def fresh_store(kind: str, workdir: Path, seed_ids: int) -> Iterator[tuple[str, list[str], float]]:
    """A fresh database for one phase: its store URL, the real ids among the seeded dedup keys
    and the seconds seeding took. PostgreSQL databases are dropped afterwards."""
    if kind == "sqlite":
        db = workdir / "gateway.db"
        t = time.monotonic()
        known: list[str] = []
        if seed_ids:
            create_schema(db)
            known = seed_dedup(db, seed_ids)
        yield f"sqlite:///{db}", known, time.monotonic() - t
        return
    name = f"mgbench_mix_{uuid.uuid4().hex[:12]}"
    url = pgdb.create_database(name)
    try:
        migrate(url)
        t = time.monotonic()
        known = seed_pg(url, seed_ids) if seed_ids else []
        yield url, known, time.monotonic() - t
    finally:
        pgdb.drop_database(name)


@dataclass
class MixResult:
    store: str
    order: str
    records: int
    accepted: int = 0
    wall_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    retries_429: int = 0
    server_cpu_s: float = 0.0
    machine_cpu_s: float = 0.0
    pg_cpu_s: float = 0.0  # the bench database's PostgreSQL backends (PostgreSQL phases)
    seed_s: float = 0.0
    startup_s: float = 0.0
    start_rss_mb: float = 0.0
    peak_rss_mb: float = 0.0
    month_ms: list[float] = field(default_factory=list)
    year_ms: list[float] = field(default_factory=list)
    verified_month_ms: list[float] = field(default_factory=list)
    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.accepted / self.wall_s if self.wall_s else 0.0

    @property
    def cpu_us(self) -> float:
        """Gateway CPU per accepted record: steadier than records/s on a shared machine."""
        return 1e6 * self.server_cpu_s / self.accepted if self.accepted else 0.0

    @property
    def pg_cpu_us(self) -> float:
        return 1e6 * self.pg_cpu_s / self.accepted if self.accepted else 0.0

    @property
    def ok(self) -> bool:
        return not self.problems and self.checked > 0


def pg_backends_cpu(url: str) -> dict[int, float]:
    """CPU seconds so far of each PostgreSQL process serving the bench database (its
    backends, autovacuum included) or the whole server (WAL writer, checkpointer, background
    writer), read from /proc: PostgreSQL must run on this machine (else: empty)."""
    with psycopg.connect(url, autocommit=True) as conn:
        pids = [
            int(r[0])
            for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                "AND (datname = current_database() OR backend_type IN "
                "('walwriter', 'checkpointer', 'background writer'))"
            ).fetchall()
        ]
    out = {}
    for pid in pids:
        with suppress(OSError):  # gone, or not on this machine
            out[pid] = proc_cpu_s(pid)
    return out


def start_perf(out: str) -> subprocess.Popen[bytes] | None:
    """``perf record`` of the whole machine (PostgreSQL's backends among it) to ``out``."""
    exe = shutil.which("perf")
    if exe is None:
        print("perf not found; profiling skipped")
        return None
    return subprocess.Popen(
        [exe, "record", "-a", "-F", "499", "-g", "-o", out],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start(workdir: Path, url: str, customers: int) -> tuple[GatewayProcess, float]:
    config = mix_config(customers)
    config["store"] = {"url": url}
    gw = GatewayProcess(workdir, config)
    t = time.monotonic()
    gw.start(timeout=600)
    return gw, time.monotonic() - t


def check_after_load(
    gw: GatewayProcess, plan: MixPlan, ok_batches: list[int], known: list[str], res: MixResult
) -> None:
    ver = verify(gw, plan, ok_batches)
    res.checked, res.verified_month_ms = ver.checked, ver.month_ms
    res.problems.extend(ver.problems)
    if ok_batches and not duplicates_ok(gw, plan.body(ok_batches[0]), plan.batch):
        res.problems.append("a re-posted batch did not come back all duplicates")
    if known and not duplicates_ok(gw, seeded_body(plan, known), len(known)):
        res.problems.append("ids seeded before start-up did not come back all duplicates")


def pg_wal(url: str) -> tuple[int, int, int]:
    """The server's WAL bytes, full-page images and checkpoints so far (``pg_stat_wal``,
    PostgreSQL 14+; zeros before)."""
    with psycopg.connect(url, autocommit=True) as conn:
        try:
            row = conn.execute(
                "SELECT w.wal_bytes, w.wal_fpi, b.checkpoints_timed + b.checkpoints_req "
                "FROM pg_stat_wal w, pg_stat_bgwriter b"
            ).fetchone()
        except psycopg.Error:
            return 0, 0, 0
    return (int(row[0]), int(row[1]), int(row[2])) if row else (0, 0, 0)


def wal_line(before: tuple[int, int, int], after: tuple[int, int, int], records: int) -> str:
    """What the load wrote to PostgreSQL's WAL, per record: a B-tree page first written
    after a checkpoint goes to the WAL whole (a full-page image), so an index on random keys
    (dedup keys) writes about a page per record until the next checkpoint."""
    wal, fpi, ckpt = (a - b for a, b in zip(after, before, strict=True))
    n = max(records, 1)
    return (
        f"WAL {wal / n:,.0f} bytes/record, {1000 * fpi / n:,.0f} full-page images per 1,000 "
        f"records, {ckpt} checkpoints during the load"
    )


def run_phase(kind: str, order: str, args: argparse.Namespace, root: Path) -> MixResult:
    tag = f"[{kind} {order}-of-order]" if order == "out" else f"[{kind} in-order]"
    workdir = root / f"{kind}-{order}"
    workdir.mkdir()
    plan = MixPlan.new(args.records, args.batch, args.customers, args.users, order == "in")
    res = MixResult(kind, order, plan.records_total)
    with fresh_store(kind, workdir, args.seed_ids) as (url, known, res.seed_s):
        if args.seed_ids:
            print(f"{tag} seeded {args.seed_ids:,} dedup keys in {res.seed_s:.1f}s")
        gw, res.startup_s = start(workdir, url, args.customers)
        assert gw.proc is not None
        pid = gw.proc.pid
        res.start_rss_mb = vm_kb(pid, "VmRSS") / 1024
        print(f"{tag} gateway ready in {res.startup_s:.1f}s, RSS {res.start_rss_mb:.0f} MB")
        try:
            spy = None
            if args.py_spy:
                spy = start_py_spy(pid, f"{args.py_spy}-{kind}-{order}.txt", gil=args.py_spy_gil)
                time.sleep(0.5)
            perf = start_perf(f"{args.perf}-{kind}-{order}.data") if args.perf else None
            pg0 = pg_backends_cpu(url) if kind == "postgres" else {}
            wal0 = pg_wal(url) if kind == "postgres" else (0, 0, 0)
            results, res.server_cpu_s, res.machine_cpu_s = run_load(
                gw, plan, args.procs, args.connections
            )
            wal = ""
            if kind == "postgres":
                pg1 = pg_backends_cpu(url)
                res.pg_cpu_s = sum(t - pg0.get(pid, 0.0) for pid, t in pg1.items())
                wal = wal_line(wal0, pg_wal(url), sum(r.accepted for r in results))
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
                print(f"{tag} py-spy profile (raw): {args.py_spy}-{kind}-{order}.txt")
            if perf is not None:
                perf.send_signal(signal.SIGINT)
                perf.wait(120)
                print(f"{tag} perf profile: {args.perf}-{kind}-{order}.data")
            res.wall_s = max(r.t1 for r in results) - min(r.t0 for r in results)
            res.latencies_ms = [1000 * x for r in results for x in r.latencies]
            res.accepted = sum(r.accepted for r in results)
            res.retries_429 = sum(r.retries_429 for r in results)
            bad = [m for r in results for m in r.bad]
            res.problems.extend(f"client: {m}" for m in bad[:20])
            res.peak_rss_mb = vm_kb(pid, "VmHWM") / 1024
            lat = res.latencies_ms
            print(
                f"{tag} durable records/s {res.rate:,.0f} ({res.accepted:,} of {res.records:,} "
                f"in {res.wall_s:.1f}s); request ms p50 {pct(lat, 0.5):.0f} "
                f"p99 {pct(lat, 0.99):.0f} max {max(lat, default=0):.0f}; "
                f"{res.retries_429} x 429; gateway CPU {res.server_cpu_s:.1f}s "
                f"({res.cpu_us:.0f} us/record), "
                + (
                    f"PostgreSQL {res.pg_cpu_s:.1f}s ({res.pg_cpu_us:.0f} us/record), "
                    if kind == "postgres"
                    else ""
                )
                + f"machine {res.machine_cpu_s:.1f}s; peak RSS {res.peak_rss_mb:.0f} MB"
            )
            if wal:
                print(f"{tag} {wal}")
            print(f"{tag} {scrape_stats(gw)}")
            ok_batches = sorted(b for r in results for b in r.ok_batches)
            check_after_load(gw, plan, ok_batches, known, res)
            print(
                f"{tag} verify: {res.checked:,} values compared, "
                f"{'all exact' if res.ok else f'{len(res.problems)} PROBLEMS'}"
            )
            for p in res.problems[:10]:
                print(f"{tag}   {p}")
            n = args.read_customers
            sample = [i * args.customers // n for i in range(n)]
            res.month_ms = read_latency(gw, sample, {})
            now_ns = time.time_ns()
            res.year_ms = read_latency(
                gw, sample, {"from": _iso_ns(now_ns - 365 * 86400 * NS), "to": _iso_ns(now_ns)}
            )
            res.peak_rss_mb = vm_kb(pid, "VmHWM") / 1024
            print(
                f"{tag} usage-summary ms over {len(sample)} customers: current month "
                f"p50 {pct(res.month_ms, 0.5):.1f} p99 {pct(res.month_ms, 0.99):.1f}; "
                f"a year p50 {pct(res.year_ms, 0.5):.1f} p99 {pct(res.year_ms, 0.99):.1f}"
            )
        finally:
            code = gw.stop()
            if code != 0:
                res.problems.append(f"gateway exited {code}")
                print(f"{tag} gateway exited {code}; log:\n{gw.log()[-3000:]}")
    return res


# --- overload ----------------------------------------------------------------------------------


@dataclass
class OverloadClient:
    sent: int = 0
    unsent: int = 0  # due within the duration but not sent before it ended
    statuses: dict[int, int] = field(default_factory=dict)
    retry_after: int = 0  # 429 answers that carried Retry-After
    errors: int = 0
    accepted: int = 0
    ok_batches: list[int] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    t0: float = 0.0
    t1: float = 0.0


def overload_client(
    port: int,
    plan: MixPlan,
    connections: int,
    interval_s: float,
    duration_s: float,
    barrier: Any,
    out: Any,
) -> None:
    """Open loop: batch k is due at start + k × interval; nothing is retried. A batch is sent
    late only when every connection is waiting for an answer, and not at all once
    ``duration_s`` has passed (the rest are counted as unsent)."""
    bodies = [plan.body(b) for b in range(plan.batches)]
    res = OverloadClient()
    nxt = itertools.count()
    lock = threading.Lock()

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        while (k := next(nxt)) < len(bodies):
            delay = res.t0 + k * interval_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if time.monotonic() - res.t0 > duration_s:
                with lock:
                    res.unsent += 1
                continue
            t = time.monotonic()
            try:
                conn.request(
                    "POST",
                    "/v1/usage",
                    body=bodies[k],
                    headers={
                        "Content-Type": "application/x-ndjson",
                        "Authorization": f"Bearer {INGEST_KEY}",
                    },
                )
                resp = conn.getresponse()
                raw = resp.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                with lock:
                    res.errors += 1
                continue
            ms = 1000 * (time.monotonic() - t)
            with lock:
                res.sent += 1
                res.latencies_ms.append(ms)
                res.statuses[resp.status] = res.statuses.get(resp.status, 0) + 1
                if resp.status == 429 and resp.getheader("Retry-After"):
                    res.retry_after += 1
                if resp.status == 200:
                    n = orjson.loads(raw)["accepted"]
                    res.accepted += n
                    if n == plan.batch:
                        res.ok_batches.append(k)
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    barrier.wait()
    res.t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res.t1 = time.monotonic()
    out.put(res)


class Sampler:
    """``/healthz`` latency every ``period`` seconds and the gateway's RSS, until stopped."""

    def __init__(self, gw: GatewayProcess, period: float = 0.1) -> None:
        assert gw.proc is not None
        self.gw, self.pid, self.period = gw, gw.proc.pid, period
        self.healthz_ms: list[float] = []
        self.healthz_failed = 0
        self.rss_mb: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with httpx.Client(base_url=self.gw.url, timeout=60) as http:
            while not self._stop.is_set():
                t = time.monotonic()
                try:
                    ok = http.get("/healthz").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.healthz_ms.append(1000 * (time.monotonic() - t))
                self.healthz_failed += not ok
                self.rss_mb.append(vm_kb(self.pid, "VmRSS") / 1024)
                self._stop.wait(self.period)


def run_overload(kind: str, rate: float, args: argparse.Namespace, root: Path) -> bool:
    """Offer 2 × ``rate`` records/s for ``args.overload_s`` seconds; report and verify."""
    tag = f"[{kind} overload]"
    workdir = root / f"{kind}-overload"
    workdir.mkdir()
    offered = 2 * rate
    records = int(offered * args.overload_s)
    plan = MixPlan.new(records, args.batch, args.customers, args.users, False)
    interval = args.batch / offered
    with fresh_store(kind, workdir, args.seed_ids) as (url, _known, _seed_s):
        gw, _ = start(workdir, url, args.customers)
        assert gw.proc is not None
        pid = gw.proc.pid
        try:
            ctx = mp.get_context("fork")
            barrier, out = ctx.Barrier(2), ctx.Queue()
            child = ctx.Process(
                target=overload_client,
                args=(
                    gw.port,
                    plan,
                    args.overload_connections,
                    interval,
                    args.overload_s,
                    barrier,
                    out,
                ),
            )
            child.start()
            barrier.wait(timeout=1200)
            with Sampler(gw) as sampler:
                res: OverloadClient = out.get(timeout=7200)
            child.join()
            wall = res.t1 - res.t0
            n429 = res.statuses.get(429, 0)
            lat, hz = res.latencies_ms, sampler.healthz_ms
            print(
                f"{tag} offered {offered:,.0f} records/s (2 x {rate:,.0f}) over "
                f"{args.overload_connections} connections for {args.overload_s:.0f}s: "
                f"{res.sent} answers in {wall:.1f}s (sent {res.sent * plan.batch / wall:,.0f} "
                f"records/s; {res.unsent} batches still unsent when the time was up), "
                f"statuses {res.statuses}, {res.errors} connection errors"
            )
            print(
                f"{tag} 429 share {n429 / max(1, res.sent):.1%} ({res.retry_after} with "
                f"Retry-After); durable records/s {res.accepted / wall:,.0f}; request ms "
                f"p50 {pct(lat, 0.5):.0f} p99 {pct(lat, 0.99):.0f} max {max(lat, default=0):.0f}"
            )
            print(
                f"{tag} /healthz ms p50 {pct(hz, 0.5):.1f} p99 {pct(hz, 0.99):.1f} "
                f"max {max(hz, default=0):.1f} ({len(hz)} probes, {sampler.healthz_failed} "
                f"failed); RSS max {max(sampler.rss_mb, default=0):.0f} MB, "
                f"peak (VmHWM) {vm_kb(pid, 'VmHWM') / 1024:.0f} MB"
            )
            ver = verify(gw, plan, sorted(res.ok_batches))
            print(
                f"{tag} verify accepted batches: {ver.checked:,} values compared, "
                f"{'all exact' if not ver.problems else f'{len(ver.problems)} PROBLEMS'}"
            )
            for p in ver.problems[:10]:
                print(f"{tag}   {p}")
            return not ver.problems
        finally:
            gw.stop()


# --- best case ---------------------------------------------------------------------------------


def best_case(kind: str, records: int, root: Path) -> tuple[float, float]:
    """bench.ingest's fresh phase (2 customers, one ``sum`` dimension, in order) on ``kind``:
    its durable records/s (0 when it failed) and gateway CPU microseconds per record."""
    workdir = root / f"best-{kind}"
    workdir.mkdir()
    ns = argparse.Namespace(
        records=records,
        batch=1000,
        seed_ids=0,
        ids="uuid",
        ts_order="live",
        procs=1,
        connections=8,
        py_spy=None,
        py_spy_format="svg",
        py_spy_gil=False,
    )
    before = os.environ.get("METER_TEST_STORE")
    os.environ["METER_TEST_STORE"] = "postgres" if kind == "postgres" else "sqlite"
    try:
        res = best_case_phase("fresh", ns, workdir, 0)
    finally:
        if before is None:
            del os.environ["METER_TEST_STORE"]
        else:
            os.environ["METER_TEST_STORE"] = before
        pgdb.drop_all()  # the database tests.pgdb made for a PostgreSQL best case
    cpu_us = 1e6 * res.server_cpu_s / res.accepted if res.accepted else 0.0
    return (res.rate if res.ok else 0.0), cpu_us


# --- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.mix",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--store", choices=["sqlite", "postgres", "both"], default="both")
    ap.add_argument("--order", choices=["out", "in", "both"], default="both")
    ap.add_argument("--records", type=int, default=300_000, help="records per phase")
    ap.add_argument("--batch", type=int, default=1000, help="records per request")
    ap.add_argument("--connections", type=int, default=8, help="keep-alive connections")
    ap.add_argument("--procs", type=int, default=1, help="client processes")
    ap.add_argument("--customers", type=int, default=1000)
    ap.add_argument("--users", type=int, default=5000, help="distinct user_id values")
    ap.add_argument("--seed-ids", type=int, default=0, help="dedup keys already in the window")
    ap.add_argument(
        "--read-customers", type=int, default=100, help="customers whose summaries are timed"
    )
    ap.add_argument("--with-best-case", action="store_true", help="a short bench.ingest run too")
    ap.add_argument("--best-case-records", type=int, default=100_000)
    ap.add_argument("--overload", action="store_true", help="2 x the sustained rate, open loop")
    ap.add_argument("--overload-s", type=float, default=30.0)
    ap.add_argument("--overload-connections", type=int, default=64)
    ap.add_argument(
        "--py-spy", metavar="PREFIX", help="py-spy record the server's load to PREFIX-<phase>.txt"
    )
    ap.add_argument(
        "--py-spy-gil", action="store_true", help="only samples holding the GIL (its consumers)"
    )
    ap.add_argument(
        "--perf",
        metavar="PREFIX",
        help="perf record the machine during the load to PREFIX-<phase>.data (then: perf "
        "report -i FILE --comm postgres --no-children)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    args.procs = max(1, min(args.procs, args.connections))
    args.read_customers = max(1, min(args.read_customers, args.customers))
    stores = ["sqlite", "postgres"] if args.store == "both" else [args.store]
    orders = ["out", "in"] if args.order == "both" else [args.order]
    print(
        f"meter-gateway mix bench: {args.records:,} records per phase in batches of "
        f"{args.batch}, {args.connections} connections, {args.customers:,} customers, "
        f"6 dimensions, {args.users:,} users, {args.seed_ids:,} seeded ids; "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
    )
    root = Path(tempfile.mkdtemp(prefix="meter-gateway-mix-"))
    results: list[MixResult] = []
    best: dict[str, tuple[float, float]] = {}
    ok = True
    try:
        for kind in stores:
            for order in orders:
                results.append(run_phase(kind, order, args, root))
            if args.with_best_case:
                best[kind] = best_case(kind, args.best_case_records, root)
                ok = ok and best[kind][0] > 0
            if args.overload:
                out = [r for r in results if r.store == kind and r.order == "out"]
                rate = (out or [r for r in results if r.store == kind])[0].rate
                ok = run_overload(kind, rate, args, root) and ok
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print("\nsummary (the machine may be shared: compare ratios within this run, not absolutes):")
    print(
        f"  {'store':<9}{'order':<6}{'rec/s':>9}{'us/rec':>8}{'pg us':>7}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'max ms':>8}{'peak MB':>9}{'month p50/p99 ms':>18}{'year p50/p99 ms':>17}  verify"
    )
    for r in results:
        lat = r.latencies_ms
        print(
            f"  {r.store:<9}{r.order:<6}{r.rate:>9,.0f}{r.cpu_us:>8.1f}{r.pg_cpu_us:>7.1f}"
            f"{pct(lat, 0.5):>8.0f}"
            f"{pct(lat, 0.99):>8.0f}{max(lat, default=0):>8.0f}{r.peak_rss_mb:>9.0f}"
            f"{pct(r.month_ms, 0.5):>9.1f}/{pct(r.month_ms, 0.99):<8.1f}"
            f"{pct(r.year_ms, 0.5):>8.1f}/{pct(r.year_ms, 0.99):<8.1f}"
            f"  {'ok' if r.ok else 'FAILED'}"
        )
    for kind in stores:
        by = {r.order: r for r in results if r.store == kind}
        if "out" in by and "in" in by and by["in"].rate and by["in"].cpu_us:
            o, i = by["out"], by["in"]
            print(
                f"  {kind}: out-of-order / in-order: records/s {o.rate / i.rate:.2f}, "
                f"gateway CPU per record {o.cpu_us / i.cpu_us:.2f}"
            )
        mixed = next((r for r in results if r.store == kind), None)
        if kind in best and best[kind][0] and mixed is not None:
            rate, cpu_us = best[kind]
            print(
                f"  {kind}: mix ({mixed.order}-of-order) / best case (bench.ingest): records/s "
                f"{mixed.rate:,.0f} / {rate:,.0f} = {mixed.rate / rate:.2f}; gateway CPU per "
                f"record {mixed.cpu_us:.1f} / {cpu_us:.1f} us = {mixed.cpu_us / cpu_us:.2f}"
            )
    return 0 if ok and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
