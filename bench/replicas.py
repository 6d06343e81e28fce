"""Replica benchmark: durable, deduplicated records/s for 1, 2 and 3 ``meter-gateway serve``
replicas on one PostgreSQL database, and for one gateway on SQLite, in one run, each with
``--seed-ids`` (default 10 million) ids already in the dedup window.

PostgreSQL: one fresh database, migrated, then the ids are written server-side in one statement
(``INSERT .. SELECT`` from ``generate_series`` with the primary key built afterwards, the fast
way to load a big table) plus ``bench.ingest.KNOWN_SEED_IDS`` digests of real ids that are
re-posted at the end and must all come back duplicates. The 1-, 2- and 3-replica phases run
one after the other on that database (each with fresh ids; the window then holds the seeded ids
plus the earlier phases' ones). Client processes spread their connections over the replicas
round-robin, as a load balancer would. SQLite: ``bench.ingest``'s seeded phase.

Bodies, clients and timing are bench/ingest.py's: only records a 2xx reported as accepted
count, over the wall time from the first send to the last response. After each phase the usage
the gateway reports must have grown by exactly the accepted records, and a re-posted batch must
come back all duplicates.

    python -m bench.replicas                      # 200k records per phase
    python -m bench.replicas --quick              # 20k records, 200k seeded ids
    python -m bench.replicas --replicas 1,3 --records 500000 --connections 12
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

if __package__ in (None, ""):  # run as ``python bench/replicas.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ingest import (
    CUSTOMERS,
    DEDUP_WINDOW_S,
    DIMENSION,
    KNOWN_SEED_IDS,
    VALUE,
    ClientResult,
    Plan,
    client_main,
    machine_busy_s,
    phase,
    proc_cpu_s,
)
from meter_gateway.model import dedup_key
from meter_gateway.store.postgres import migrate
from tests.gatewayproc import ADMIN_KEY, BASE_CONFIG, INGEST_KEY, GatewayProcess

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"


@dataclass
class Row:
    store: str
    replicas: int
    accepted: int
    wall_s: float
    server_cpu_s: float
    machine_cpu_s: float
    ok: bool

    @property
    def rate(self) -> float:
        return self.accepted / self.wall_s if self.wall_s else 0.0


# --- PostgreSQL --------------------------------------------------------------------------------


def seed_pg(url: str, n: int) -> list[str]:
    """``n`` dedup keys seen now; the first ``KNOWN_SEED_IDS`` are digests of real ids."""
    known = [f"seeded-{i:08d}" for i in range(min(KNOWN_SEED_IDS, n))]
    now_s = int(time.time())
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '512MB'")
        conn.execute("ALTER TABLE dedup_keys DROP CONSTRAINT dedup_keys_pkey")
        conn.execute(
            "INSERT INTO dedup_keys SELECT k, %s FROM unnest(%s::bytea[]) AS k",
            (now_s, [dedup_key("id", rid) for rid in known]),
        )
        conn.execute(
            "INSERT INTO dedup_keys SELECT decode(md5(i::text || ':' || %s), 'hex'), %s "
            "FROM generate_series(1, %s) AS i",
            (uuid.uuid4().hex, now_s, n - len(known)),
        )
        conn.execute("ALTER TABLE dedup_keys ADD PRIMARY KEY (prefix)")  # (migration 7)
        conn.execute("VACUUM ANALYZE dedup_keys")
    return known


def run_many(
    gws: list[GatewayProcess], plan: Plan, procs: int, connections: int
) -> tuple[list[ClientResult], float, float]:
    """bench.ingest.run_load over several replicas: client process i talks to replica
    i mod n (so use at least as many client processes as replicas)."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(procs + 1)
    out = ctx.Queue()
    threads = [connections // procs + (1 if i < connections % procs else 0) for i in range(procs)]
    shares = [list(range(plan.batches))[i::procs] for i in range(procs)]
    children = [
        ctx.Process(
            target=client_main,
            args=(gws[i % len(gws)].port, plan, shares[i], threads[i], barrier, out),
        )
        for i in range(procs)
    ]
    for c in children:
        c.start()
    barrier.wait(timeout=600)
    pids = [gw.proc.pid for gw in gws if gw.proc is not None]
    cpu0, busy0 = sum(proc_cpu_s(p) for p in pids), machine_busy_s()
    results = [out.get(timeout=3600) for _ in children]
    server_cpu = sum(proc_cpu_s(p) for p in pids) - cpu0
    busy = machine_busy_s() - busy0
    for c in children:
        c.join()
    return results, server_cpu, busy


def usage_total(gw: GatewayProcess) -> Decimal:
    out = Decimal(0)
    with gw.client(ADMIN_KEY) as http:
        for c in CUSTOMERS:
            r = http.get(
                "/v1/usage",
                params={
                    "window": "month",
                    "customerId": c,
                    "dimensionId": DIMENSION,
                    "from": "2020-01-01T00:00:00Z",
                    "to": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600)),
                },
            )
            r.raise_for_status()
            out += sum((Decimal(w["value"]) for w in r.json()["data"] if w["value"]), Decimal(0))
    return out


def reposted_all_duplicates(gw: GatewayProcess, body: bytes, n: int) -> bool:
    with gw.client(INGEST_KEY) as http:
        r = http.post("/v1/usage", content=body, headers={"Content-Type": "application/x-ndjson"})
    return r.status_code == 200 and r.json()["duplicates"] == n and r.json()["accepted"] == 0


def pg_phase(
    url: str, replicas: int, args: argparse.Namespace, root: Path, known: list[str]
) -> Row:
    config = {**BASE_CONFIG, "store": {"url": url}}
    gws = []
    for i in range(replicas):
        workdir = root / f"pg-{replicas}-{i}"
        workdir.mkdir()
        gws.append(GatewayProcess(workdir, config))
    try:
        for gw in gws:
            gw.start(timeout=120)
        before = usage_total(gws[0])
        nbatches = max(1, args.records // args.batch)
        plan = Plan(
            f"pg{replicas}",
            int.from_bytes(os.urandom(12), "big"),
            "uuid",
            nbatches,
            args.batch,
            int(time.time()),
        )
        procs = max(args.procs, replicas)
        results, server_cpu, busy = run_many(gws, plan, procs, max(args.connections, procs))
        wall = max(r.t1 for r in results) - min(r.t0 for r in results)
        accepted = sum(r.accepted for r in results)
        bad = [m for r in results for m in r.bad]
        for m in bad[:5]:
            print(f"[pg x{replicas}] problem: {m}")
        grown = usage_total(gws[-1]) - before
        ok = not bad and grown == accepted * VALUE
        print(
            f"[pg x{replicas}] usage grew by {grown} for {accepted:,} accepted records x {VALUE}: "
            f"{'ok' if grown == accepted * VALUE else 'MISMATCH'}"
        )
        ok = ok and reposted_all_duplicates(gws[0], plan.body(0), plan.batch)
        if known:
            body = b"\n".join(
                b'{"id":"%s","timestamp":"%s","customerId":"%s","dimensionId":"%s",'
                b'"recordValue":1}'
                % (rid.encode(), plan.stamp(0).encode(), CUSTOMERS[0].encode(), DIMENSION.encode())
                for rid in known
            )
            seeded_ok = reposted_all_duplicates(gws[-1], body, len(known))
            verdict = "all duplicates" if seeded_ok else "WRONG"
            print(f"[pg x{replicas}] seeded ids re-posted: {verdict}")
            ok = ok and seeded_ok
        row = Row("postgresql", replicas, accepted, wall, server_cpu, busy, ok)
        print(
            f"[pg x{replicas}] records/s {row.rate:,.0f} ({accepted:,} in {wall:.2f}s), "
            f"gateway CPU {server_cpu:.1f}s, machine CPU {busy:.1f}s"
        )
        return row
    finally:
        for gw in gws:
            if gw.proc is not None and gw.stop() != 0:
                print(f"replica exited non-zero; log:\n{gw.log()[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.replicas",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--records", type=int, default=200_000, help="records per phase")
    ap.add_argument("--batch", type=int, default=1000, help="records per request")
    ap.add_argument("--connections", type=int, default=8, help="connections in total")
    ap.add_argument("--procs", type=int, default=3, help="client processes (at least replicas)")
    ap.add_argument("--seed-ids", type=int, default=10_000_000, help="ids in the dedup window")
    ap.add_argument("--replicas", default="1,2,3", help="PostgreSQL replica counts to run")
    ap.add_argument("--no-sqlite", action="store_true", help="skip the SQLite phase")
    ap.add_argument("--pg-url", default=DEFAULT_PG, help="a database to create the bench's from")
    ap.add_argument("--quick", action="store_true", help="20,000 records, 200,000 seeded ids")
    args = ap.parse_args(argv)
    if args.quick:
        args.records = min(args.records, 20_000)
        args.seed_ids = min(args.seed_ids, 200_000)
    counts = [int(x) for x in args.replicas.split(",") if x.strip()]
    print(
        f"meter-gateway replica bench: {args.records:,} records per phase in batches of "
        f"{args.batch}, {args.seed_ids:,} ids in the dedup window, {args.connections} "
        f"connections, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
    )
    root = Path(tempfile.mkdtemp(prefix="meter-gateway-replicas-"))
    rows: list[Row] = []
    name = f"mgbench_{uuid.uuid4().hex[:12]}"
    url = urlunsplit(urlsplit(args.pg_url)._replace(path=f"/{name}"))
    try:
        if counts:
            with psycopg.connect(args.pg_url, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            migrate(url)
            t = time.monotonic()
            known = seed_pg(url, args.seed_ids)
            print(f"[pg] seeded {args.seed_ids:,} dedup keys in {time.monotonic() - t:.1f}s")
            for n in counts:
                rows.append(pg_phase(url, n, args, root, known if n == counts[-1] else []))
        if not args.no_sqlite:
            ns = argparse.Namespace(
                records=args.records,
                batch=args.batch,
                seed_ids=args.seed_ids,
                ids="uuid",
                ts_order="live",
                procs=min(args.procs, args.connections),
                connections=args.connections,
                py_spy=None,
                py_spy_format="svg",
                py_spy_gil=False,
            )
            res = phase("seeded", ns, root, 0)
            rows.append(Row("sqlite", 1, res.accepted, res.wall_s, res.server_cpu_s, 0.0, res.ok))
    finally:
        if counts:
            with psycopg.connect(args.pg_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nsummary ({args.seed_ids:,} ids in the dedup window, {DEDUP_WINDOW_S // 86400}d):")
    print(f"  {'store':<11}{'replicas':>8}{'records/s':>12}{'accepted':>11}{'wall s':>8}  verify")
    for r in rows:
        print(
            f"  {r.store:<11}{r.replicas:>8}{r.rate:>12,.0f}{r.accepted:>11,}{r.wall_s:>8.2f}  "
            f"{'ok' if r.ok else 'FAILED'}"
        )
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
