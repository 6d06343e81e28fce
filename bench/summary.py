"""usage-summary over a large store (issue 17): 10M records, 1,000 customers, a year of history.

Seeds a SQLite store the fast way -- rows written straight into ``records``, ``metadata``,
``rollups`` and ``rollup_distinct`` as the store lays them out (store/sqlite.py's schema,
created by the store's own migrations; the record indexes are dropped while seeding and made
again with the store's definitions) -- then starts a real gateway (tests/gatewayproc.py with
bench/mix.py's configuration: six dimensions, ``sum``, ``count``, ``max``, ``unique_count`` of
``user_id`` out of ``--users``, ``weighted_sum`` changes and an hourly ``sum`` billed in
increments of 60 rounded up) and times ``GET /v1/customers/{id}/usage-summary`` for the current
month and for a year (``from``/``to`` spanning 365 days up to now) over ``--read-customers``
customers: p50, p99, max, and the gateway's CPU per request (steadier than latency on a
shared machine). Timing starts once the period gauges' first background refresh (every customer
rated for the current month, right after start-up) is done; its duration is printed too.

The workload: ``--records`` records (default 10,000,000) over 370 days up to the seed time,
``--month-share`` of them (default 0.6) in the current month so far (every hour of it is
dense), each customer's count drawn between half and one and a half times the mean; a record
is one of the six dimensions at random, with ``user_id`` and ``region`` metadata (shared
bodies: ``records.meta_id``), timestamps in milliseconds, values with up to 3 places (storage
changes include negative ones). Records before the year's ``from`` carry the storage level in.

Before timing, the year summary (and the month to the seed time, and 40 days that end inside an
hour with later records) of ``--verify-customers`` customers is compared exactly with an
independent ``Decimal`` computation over the records the generator made for them (regenerated
from the seed), so a fast wrong answer fails (exit 1).

``--db PATH`` keeps the seeded database (and its parameters beside it, ``PATH.json``) and
reuses it on the next run with the same parameters: seeding 10M records takes a few minutes.

    python -m bench.summary                                  # 10M records, 1,000 customers
    python -m bench.summary --db /tmp/summary.db              # seed once, time again later
    python -m bench.summary --records 1000000 --customers 100 --read-customers 50
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sqlite3
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

import numpy as np
import orjson

if __package__ in (None, ""):  # run as ``python bench/summary.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client.parser import text_string_to_metric_families

from bench.ingest import create_schema, proc_cpu_s
from bench.mix import (
    _EXACT,
    COMPUTE,
    COUNT,
    DIM_IDS,
    DIMENSIONS,
    MAX,
    REGIONS,
    STORAGE,
    SUM,
    USERS,
    _iso_ns,
    customer_id,
    divide,
    mix_config,
    pct,
    read_latency,
)
from tests.gatewayproc import ADMIN_KEY, GatewayProcess
from tests.scrape import metrics_computed_since

NS = 1_000_000_000
MS = 1_000_000
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
HISTORY_MS = 370 * DAY_MS  # records this far back: the year read carries a storage level in
YEAR_NS = 365 * 86_400 * NS


@dataclass(frozen=True)
class Params:
    records: int
    customers: int
    users: int
    month_share: float
    seed: int
    end_ms: int  # records lie before this instant (the seed time, to the millisecond)

    @property
    def month_ms(self) -> int:
        d = datetime.fromtimestamp(self.end_ms // 1000, tz=UTC)
        return int(datetime(d.year, d.month, 1, tzinfo=UTC).timestamp()) * 1000


def _milli(m: int) -> str:
    """``m`` thousandths as exact decimal text (no trailing zeros)."""
    sign, a = ("-", -m) if m < 0 else ("", m)
    q, r = divmod(a, 1000)
    return f"{sign}{q}" if r == 0 else f"{sign}{q}.{r:03d}".rstrip("0")


@dataclass
class Records:
    """One customer's records, sorted by (dimension, ts): numpy columns."""

    ts_ms: np.ndarray
    dim: np.ndarray
    milli: np.ndarray  # value in thousandths
    user: np.ndarray
    region: np.ndarray


def generate(p: Params, c: int) -> Records:
    """Customer ``c``'s records: deterministic in (seed, c), so the check can regenerate them."""
    rng = np.random.default_rng([p.seed, c])
    mean = p.records / p.customers
    n = int(mean * (0.5 + rng.random()))
    start_ms, month_ms, end_ms = p.end_ms - HISTORY_MS, p.month_ms, p.end_ms
    dense = int(n * p.month_share) if month_ms < end_ms else 0
    ts = np.concatenate(
        [rng.integers(month_ms, end_ms, dense), rng.integers(start_ms, month_ms, n - dense)]
    )
    dim = rng.integers(0, len(DIMENSIONS), n)
    milli = np.empty(n, dtype=np.int64)
    for d, (lo, hi, step) in {
        SUM: (1, 5001, 1),  # up to 5 GB
        COUNT: (1, 2, 1),
        MAX: (1, 501, 1),  # whole connections
        USERS: (1, 2, 1),
        STORAGE: (-2000, 5001, 1),  # GB changes, some negative
        COMPUTE: (1, 90_001, 1),  # up to 90 minutes
    }.items():
        sel = dim == d
        milli[sel] = rng.integers(lo, hi, int(sel.sum())) * step
    milli[dim == COUNT] = 1000
    milli[dim == USERS] = 1000
    milli[dim == MAX] *= 1000
    user = rng.integers(0, p.users, n)
    region = rng.integers(0, len(REGIONS), n)
    order = np.lexsort((ts, dim))
    return Records(ts[order], dim[order], milli[order], user[order], region[order])


def user_text(u: int) -> str:
    return f"u-{u:05d}"


def meta_id(user: int, region: int) -> int:
    return 1 + user * len(REGIONS) + region


def seed(db: Path, p: Params) -> None:
    """Write ``p``'s records, their metadata, rollups and distinct values into a new store."""
    create_schema(db)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-1000000")
    indexes = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type='index' AND tbl_name='records' "
        "AND sql IS NOT NULL"
    ).fetchall()
    for name, _ in indexes:
        conn.execute(f"DROP INDEX {name}")
    conn.execute("BEGIN")
    bodies = []
    for u in range(p.users):
        for r, region in enumerate(REGIONS):
            body = orjson.dumps({"user_id": user_text(u), "region": region})
            bodies.append((meta_id(u, r), _digest(body), body))
    conn.executemany("INSERT INTO metadata (id, digest, body) VALUES (?, ?, ?)", bodies)
    seq = 0
    t = time.monotonic()
    for c in range(p.customers):
        recs = generate(p, c)
        cust = customer_id(c)
        n = len(recs.ts_ms)
        ts_ns = (recs.ts_ms * MS).tolist()
        dims = recs.dim.tolist()
        values = [_milli(m) for m in recs.milli.tolist()]
        pairs_ur = zip(recs.user.tolist(), recs.region.tolist(), strict=True)
        metas = [meta_id(u, r) for u, r in pairs_ur]
        # the store's series numbers (one per customer and dimension)
        series = [c * len(DIM_IDS) + k + 1 for k in range(len(DIM_IDS))]
        conn.executemany(
            "INSERT INTO series (id, customer, dimension) VALUES (?, ?, ?)",
            ((i, cust, d) for i, d in zip(series, DIM_IDS, strict=True)),
        )
        conn.executemany(
            "INSERT INTO records (seq, ts, customer, dimension, value, source, received_ns, "
            "meta_id, series) VALUES (?, ?, ?, ?, ?, 'rest', ?, ?, ?)",
            (
                (
                    seq + 1 + i,
                    ts_ns[i],
                    cust,
                    DIM_IDS[dims[i]],
                    values[i],
                    ts_ns[i],
                    metas[i],
                    series[dims[i]],
                )
                for i in range(n)
            ),
        )
        conn.executemany(
            "INSERT INTO rollups VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            _rollups(cust, recs, seq),
        )
        users = recs.dim == USERS
        pairs = np.unique(
            np.stack([recs.ts_ms[users] - recs.ts_ms[users] % HOUR_MS, recs.user[users]]), axis=1
        )
        conn.executemany(
            "INSERT INTO rollup_distinct VALUES (?, ?, ?, ?)",
            (
                (cust, DIM_IDS[USERS], b * MS, user_text(u))
                for b, u in zip(pairs[0].tolist(), pairs[1].tolist(), strict=True)
            ),
        )
        seq += n
        if (c + 1) % max(1, p.customers // 10) == 0:
            print(f"  seeded {c + 1:,} customers, {seq:,} records, {time.monotonic() - t:.0f}s")
    conn.execute("COMMIT")
    for name, sql in indexes:
        t = time.monotonic()
        conn.execute(sql)
        print(f"  index {name} in {time.monotonic() - t:.0f}s")
    # what the store indexes behind its commits (record times; these records carry no ids),
    # up to the mark it keeps: every record indexed, as in a store at rest
    t = time.monotonic()
    conn.execute("INSERT INTO record_times SELECT ts, seq FROM records ORDER BY ts, seq")
    conn.execute("UPDATE record_ids_upto SET seq = ?", (seq,))
    print(f"  record_times in {time.monotonic() - t:.0f}s")
    conn.execute("ANALYZE")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def _digest(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=16).digest()


def _rollups(cust: str, r: Records, first_seq: int) -> list[tuple[Any, ...]]:
    """RollupRow per (dimension, UTC hour): count, sum, min, max, last (ts, seq, value) and
    wsum = Σ value × (bucket end − ts) in value·ns (exact: thousandths × ms × 1000)."""
    bucket = r.ts_ms - r.ts_ms % HOUR_MS
    n = len(bucket)
    if n == 0:
        return []
    new = np.ones(n, dtype=bool)
    new[1:] = (bucket[1:] != bucket[:-1]) | (r.dim[1:] != r.dim[:-1])
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], n) - 1
    count = np.diff(np.append(starts, n))
    total = np.add.reduceat(r.milli, starts)
    mn = np.minimum.reduceat(r.milli, starts)
    mx = np.maximum.reduceat(r.milli, starts)
    wsum = np.add.reduceat(r.milli * (bucket + HOUR_MS - r.ts_ms), starts) * 1000
    return [
        (
            cust,
            DIM_IDS[d],
            b * MS,
            k,
            _milli(s),
            _milli(lo),
            _milli(hi),
            lts * MS,
            first_seq + 1 + e,
            _milli(lv),
            str(w),
        )
        for d, b, k, s, lo, hi, lts, e, lv, w in zip(
            r.dim[starts].tolist(),
            bucket[starts].tolist(),
            count.tolist(),
            total.tolist(),
            mn.tolist(),
            mx.tolist(),
            r.ts_ms[ends].tolist(),
            ends.tolist(),
            r.milli[ends].tolist(),
            wsum.tolist(),
            strict=True,
        )
    ]


# --- the check: an independent Decimal computation over the generated records ----------------


def expected(p: Params, c: int, from_ns: int, to_ns: int) -> dict[str, Decimal]:
    """The quantity every line of customer ``c``'s usage-summary for ``[from, to)`` must show
    (asOf = to: ``to`` is in the past), computed plainly from the records."""
    recs = generate(p, c)
    by_dim: dict[int, list[tuple[int, Decimal, int]]] = defaultdict(list)
    for t, d, m, u in zip(
        recs.ts_ms.tolist(), recs.dim.tolist(), recs.milli.tolist(), recs.user.tolist(), strict=True
    ):
        by_dim[d].append((t * MS, Decimal(m).scaleb(-3), u))
    out: dict[str, Decimal] = {}
    for d, dim_id in enumerate(DIM_IDS):
        points = by_dim[d]
        inside = [(t, v, u) for t, v, u in points if from_ns <= t < to_ns]
        q: Decimal
        if d == SUM:
            q = sum((v for _, v, _ in inside), Decimal(0))
        elif d in (COUNT,):
            q = Decimal(len(inside))
        elif d == MAX:
            q = max((v for _, v, _ in inside), default=Decimal(0))
        elif d == USERS:
            q = Decimal(len({u for _, _, u in inside}))
        elif d == STORAGE:
            level = sum((v for t, v, _ in points if t < from_ns), Decimal(0))
            integral = _EXACT.multiply(level, to_ns - from_ns)
            for t, v, _ in inside:
                integral = _EXACT.add(integral, _EXACT.multiply(v, to_ns - t))
            q = max(divide(integral, to_ns - from_ns), Decimal(0))
        else:  # COMPUTE: per UTC hour, rounded up to whole hours of 60 minutes
            hours: dict[int, Decimal] = defaultdict(Decimal)
            for t, v, _ in inside:
                hours[t - t % (3600 * NS)] += v
            q = sum(
                (divide(v, 60).quantize(Decimal(1), ROUND_CEILING, _EXACT) for v in hours.values()),
                Decimal(0),
            )
        out[dim_id] = q
    return out


def check(gw: GatewayProcess, p: Params, customers: list[int]) -> tuple[int, list[str]]:
    """Compare the year (to the seed time), the month so far and 40 days that end inside an
    hour of ``customers`` exactly."""
    to_ns = p.end_ms * MS
    # ... and 40 days ending in the middle of an hour that has records after it (asOf cuts it)
    mid_ns = to_ns - 60 * HOUR_MS * MS - 1_234_567 * MS  # to the ms, as the query carries it
    periods = [
        (to_ns - YEAR_NS, to_ns),
        (p.month_ms * MS, to_ns),
        (mid_ns - 40 * 86_400 * NS, mid_ns),
    ]
    checked, problems = 0, []
    with gw.client(ADMIN_KEY) as http:
        for c in customers:
            for from_ns, until in periods:
                if until <= from_ns:
                    continue
                r = http.get(
                    f"/v1/customers/{customer_id(c)}/usage-summary",
                    params={"from": _iso_ns(from_ns), "to": _iso_ns(until)},
                    timeout=300,
                )
                if r.status_code != 200:
                    problems.append(f"{customer_id(c)}: HTTP {r.status_code} {r.text[:200]}")
                    continue
                got = {ln["dimensionId"]: Decimal(ln["quantity"]) for ln in r.json()["dimensions"]}
                for dim_id, want in expected(p, c, from_ns, until).items():
                    checked += 1
                    if got.get(dim_id) != want:
                        problems.append(
                            f"{customer_id(c)} {dim_id} from {_iso_ns(from_ns)}: "
                            f"got {got.get(dim_id)}, want {want}"
                        )
    return checked, problems


# --- the run -----------------------------------------------------------------------------------


def prepare(args: argparse.Namespace, root: Path) -> tuple[Path, Params]:
    db = Path(args.db) if args.db else root / "gateway.db"
    meta = db.with_name(db.name + ".json")
    fresh = Params(
        args.records, args.customers, args.users, args.month_share, args.seed, time.time_ns() // MS
    )
    if db.exists() and meta.exists():
        p = Params(**json.loads(meta.read_text()))
        if asdict(p) | {"end_ms": 0} == asdict(fresh) | {"end_ms": 0}:
            age_h = (fresh.end_ms - p.end_ms) / HOUR_MS
            print(f"reusing {db} (seeded {age_h:.1f} h ago)")
            return db, p
        print(f"{db} was seeded with other parameters: seeding again")
    for f in (db, meta, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        f.unlink(missing_ok=True)
    t = time.monotonic()
    print(f"seeding {fresh.records:,} records for {fresh.customers:,} customers into {db}")
    seed(db, fresh)
    print(f"seeded in {time.monotonic() - t:.0f}s, {db.stat().st_size / 2**30:.1f} GiB")
    meta.write_text(json.dumps(asdict(fresh)))
    return db, fresh


def run(args: argparse.Namespace, root: Path) -> int:
    db, p = prepare(args, root)
    config = mix_config(p.customers)
    config["store"] = {"url": f"sqlite:///{db}"}
    (root / "gateway").mkdir(exist_ok=True)
    gw = GatewayProcess(root / "gateway", config)
    t = time.monotonic()
    gw.start(timeout=600)
    print(f"gateway ready in {time.monotonic() - t:.1f}s")
    try:
        # The period gauges rate every customer in the background, right after start-up and
        # then at most a tenth of the time: time the reads after that first refresh.
        t = time.monotonic()
        with gw.client(ADMIN_KEY) as http:
            text = metrics_computed_since(http, 0, timeout_s=1800)
        took = next(
            (
                s.value
                for fam in text_string_to_metric_families(text)
                for s in fam.samples
                if s.name == "meter_gateway_period_refresh_duration_seconds"
            ),
            float("nan"),
        )
        print(
            f"period gauges: first refresh (every customer rated for the month) took {took:.1f}s, "
            f"done {time.monotonic() - t:.0f}s after ready"
        )
        n = min(args.verify_customers, p.customers)
        verify = [i * p.customers // n for i in range(n)] if n else []
        t = time.monotonic()
        checked, problems = check(gw, p, verify)
        print(
            f"verify: {checked} quantities of {len(verify)} customers (a year, the month so far, "
            f"40 days) in {time.monotonic() - t:.1f}s: "
            + ("all exact" if not problems else f"{len(problems)} PROBLEMS")
        )
        for m in problems[:20]:
            print(f"  {m}")
        k = min(args.read_customers, p.customers)
        sample = [i * p.customers // k + 1 for i in range(k)]
        sample = [c % p.customers for c in sample]
        read_latency(gw, [0] * 3, {})  # warm-up on one customer (imports, connections)
        assert gw.proc is not None
        pid = gw.proc.pid
        for _ in range(args.repeat):
            cpu0 = proc_cpu_s(pid)
            month = read_latency(gw, sample, {})
            cpu1 = proc_cpu_s(pid)
            now_ns = time.time_ns()
            year = read_latency(
                gw, sample, {"from": _iso_ns(now_ns - YEAR_NS), "to": _iso_ns(now_ns)}
            )
            cpu2 = proc_cpu_s(pid)
            print(
                f"usage-summary ms over {len(sample)} customers: current month "
                f"p50 {pct(month, 0.5):.1f} p99 {pct(month, 0.99):.1f} max {max(month):.1f} "
                f"(gateway CPU {1000 * (cpu1 - cpu0) / len(sample):.1f} ms/request); "
                f"a year p50 {pct(year, 0.5):.1f} p99 {pct(year, 0.99):.1f} max {max(year):.1f} "
                f"(CPU {1000 * (cpu2 - cpu1) / len(sample):.1f} ms/request)"
            )
    finally:
        code = gw.stop()
        if code != 0:
            print(f"gateway exited {code}; log:\n{gw.log()[-3000:]}")
    return 1 if problems or code != 0 else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.summary",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--records", type=int, default=10_000_000)
    ap.add_argument("--customers", type=int, default=1000)
    ap.add_argument("--users", type=int, default=5000, help="distinct user_id values")
    ap.add_argument("--month-share", type=float, default=0.6, help="records in this month")
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--read-customers", type=int, default=100, help="customers timed")
    ap.add_argument("--verify-customers", type=int, default=5, help="customers checked")
    ap.add_argument("--repeat", type=int, default=2, help="timed passes")
    ap.add_argument("--db", help="keep the seeded SQLite file here and reuse it")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mg-summary-") as tmp:
        return run(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
