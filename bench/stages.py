"""CPU per record of each ingest stage, in this process, on bench.mix's workload.

A gateway built from bench.mix's config on a temporary SQLite store; bench.mix's request bodies
(1,000 customers, six aggregations, metadata, UUID-shaped ids, out-of-order or in-order time)
go through the stages the REST receiver and the writer run, one thread, no HTTP:

* ``decode+validate`` -- ``receivers.rest._decode``: NDJSON to a validated ``Batch``;
* ``prepare`` -- ``SQLiteStore.prepare`` of a group of ``--group`` batches: dedup decisions,
  rows, the statement's JSON;
* ``apply`` -- ``SQLiteStore.apply``: the one-statement transaction (SQLite's own CPU; the
  fsync's wait is not CPU and is not counted), then the fold of the group's records into the
  rollup partials written behind (their flushes are not counted).

Thread CPU time (``time.thread_time``) per record, so other load on the machine changes it less
than it changes a rate. The whole server spends more per record than the sum (HTTP, asyncio,
admission, the answer, telemetry, indexing record ids and times behind the commits): compare
with bench.mix's "gateway CPU ... us/record". Each stage's result is checked: every record of
every body is accepted, and the store holds them all at the end.

    python -m bench.stages                       # 60k records, out of order, groups of 3
    python -m bench.stages --records 120000 --order in --group 8
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as ``python bench/stages.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml

from bench.mix import MixPlan, mix_config
from meter_gateway.config import parse_config
from meter_gateway.service import Gateway
from receivers.rest import _decode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=60_000)
    ap.add_argument("--batch", type=int, default=1000, help="records per body")
    ap.add_argument("--group", type=int, default=3, help="bodies per commit group")
    ap.add_argument("--order", choices=["out", "in"], default="out")
    ap.add_argument("--customers", type=int, default=1000)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="meter-gateway-stages-") as d:
        config = mix_config(args.customers)
        config["store"] = {"url": f"sqlite:///{d}/gateway.db"}
        gw = Gateway(parse_config(yaml.safe_dump(config)))
        try:
            plan = MixPlan.new(args.records, args.batch, args.customers, 5000, args.order == "in")
            bodies = [plan.body(b) for b in range(plan.batches)]
            # as the server runs: what start-up built frozen, cycles collected rarely
            gc.freeze()
            gc.set_threshold(50_000, 50, 100)
            cpu = {"decode+validate": 0.0, "prepare": 0.0, "apply": 0.0}
            store, now, accepted = gw.store, time.time_ns(), 0
            for i in range(0, len(bodies), args.group):
                t0 = time.thread_time()
                batches = [
                    _decode(gw, body, None, "application/x-ndjson", None)[0]
                    for body in bodies[i : i + args.group]
                ]
                t1 = time.thread_time()
                prepared = store.prepare(batches, now)  # type: ignore[attr-defined]
                t2 = time.thread_time()
                results = store.apply(prepared)  # type: ignore[attr-defined]
                t3 = time.thread_time()
                cpu["decode+validate"] += t1 - t0
                cpu["prepare"] += t2 - t1
                cpu["apply"] += t3 - t2
                accepted += sum(r.accepted for r in results)
            n = plan.records_total
            stored = gw.store.stats().get("records")
            ok = accepted == n and stored == n
            order = "out of order" if args.order == "out" else "in order"
            print(
                f"bench.stages: {n:,} records ({order}), bodies of {args.batch}, "
                f"groups of {args.group}; Python {sys.version.split()[0]}"
            )
            for stage, seconds in cpu.items():
                print(f"  {stage:16s} {seconds / n * 1e6:6.2f} us/record")
            print(f"  {'total':16s} {sum(cpu.values()) / n * 1e6:6.2f} us/record")
            print(f"  verify: {accepted:,} accepted, {stored:,} stored: {'ok' if ok else 'FAILED'}")
            return 0 if ok else 1
        finally:
            gw.store.close()


if __name__ == "__main__":
    sys.exit(main())
