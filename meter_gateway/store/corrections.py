"""Usage corrections written once over the dialect (SPEC 11): cancelling records by id.

A cancelled record leaves ``records`` for ``cancelled_records`` (its audit copy, with when and
why) in ONE transaction that also recomputes every rollup bucket it was in from the records
that remain there, so each aggregate (sum, count, min, max, avg, last, unique_count,
weighted_sum, time_weighted_avg) reads exactly as if it had never been sent. Recomputing the
bucket, rather than subtracting, is one rule for every kind: min, max, last and distinct
values cannot be decremented. Its dedup key stays marked, so the id sent again is a duplicate.
A record whose time falls in a finalized invoice's period of its customer is not touched: it is
answered ``invoiced`` with that invoice (its usage stays as billed).

The stores wrap ``cancel`` in their own write path (``SQLiteStore.cancel_records`` keeps its
in-memory rollup cache in step; PostgreSQL locks the rollup rows, as its ingest does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from meter_gateway.model import UsageRecord
from meter_gateway.store.base import (
    CancelledRecord,
    CancelResult,
    RollupKey,
    read_metadata,
    rollup_partials,
    unique_of,
)
from meter_gateway.store.dialect import Dialect, Tx
from meter_gateway.timebuckets import BUCKET_NS, floor_bucket

__all__ = ["cancel", "cancelled_page"]

_COPY = (
    "INSERT INTO cancelled_records (record_seq, record_id, ts, customer, dimension, value, "
    "metadata, source, received_ns, cancelled_ns, reason) "
    "SELECT seq, record_id, ts, customer, dimension, value, {meta}, source, received_ns, ?, ? "
    "FROM records r WHERE {match}"
)
_UPSERT_ROLLUP = (
    "INSERT INTO rollups (customer, dimension, bucket, count, sum, min, max, last_ts, last_seq, "
    "last_value, wsum) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (customer, dimension, bucket) DO UPDATE SET count = excluded.count, "
    "sum = excluded.sum, min = excluded.min, max = excluded.max, last_ts = excluded.last_ts, "
    "last_seq = excluded.last_seq, last_value = excluded.last_value, wsum = excluded.wsum"
)
_LIST_COLS = (
    "seq, record_seq, record_id, ts, customer, dimension, value, metadata, source, "
    "received_ns, cancelled_ns, reason"
)


def cancel(
    tx: Tx,
    dialect: Dialect,
    ids: Sequence[str],
    reason: str | None,
    now_ns: int,
    unique_keys: Mapping[str, str],
    metadata_sql: str,
) -> tuple[list[CancelResult], set[RollupKey]]:
    """Cancel the records with these ids inside ``tx``: (a result per id, in order; the rollup
    buckets recomputed). ``unique_keys``: each dimension's ``unique_key`` (its distinct-value
    rollup is rebuilt with it); ``metadata_sql``: the store's expression for a record's
    metadata in ``records r``. Ids are taken in sorted order, so concurrent cancellations lock
    records in one order."""
    done: dict[str, CancelResult] = {}
    touched: set[RollupKey] = set()
    match = dialect.record_id_match
    copy = _COPY.format(meta=metadata_sql, match=match)
    why = None if reason is None else dialect.text(reason)
    for rid in sorted(set(ids)):
        if "\x00" in rid:  # no stored id holds NUL (and PostgreSQL text cannot bind it)
            done[rid] = CancelResult(rid, "not_found")
            continue
        by_id = (rid,) * match.count("?")
        rows = tx.all(
            f"SELECT ts, customer, dimension FROM records WHERE {match}{dialect.for_update}", by_id
        )
        if not rows:
            gone = tx.one("SELECT 1 FROM cancelled_records WHERE record_id = ? LIMIT 1", (rid,))
            done[rid] = CancelResult(rid, "not_found" if gone is None else "already_cancelled")
            continue
        invoice = _invoiced(tx, rows)
        if invoice is not None:
            done[rid] = CancelResult(rid, "invoiced", invoice)
            continue
        tx.run(copy, (now_ns, why, *by_id))
        tx.run(f"DELETE FROM records WHERE {match}", by_id)
        touched.update((str(c), str(d), floor_bucket(int(t))) for t, c, d in rows)
        done[rid] = CancelResult(rid, "cancelled")
    for key in sorted(touched):
        _recompute(tx, dialect, key, unique_keys.get(key[1]), metadata_sql)
    return [done[rid] for rid in ids], touched


def _invoiced(tx: Tx, rows: Sequence[Sequence[Any]]) -> str | None:
    """The finalized invoice whose period holds one of these records (ts, customer, ...)."""
    for t, c, _ in rows:
        hit = tx.one(
            "SELECT id FROM invoices WHERE customer = ? AND status = 'finalized' "
            "AND from_ns <= ? AND to_ns > ? ORDER BY finalized_ns, id LIMIT 1",
            (c, t, t),
        )
        if hit is not None:
            return str(hit[0])
    return None


def _recompute(
    tx: Tx, dialect: Dialect, key: RollupKey, unique_key: str | None, metadata_sql: str
) -> None:
    """Rebuild one rollup bucket (and its distinct values) from the records left in it.

    The row is locked first: a commit that wrote records into the bucket and has yet to add
    them to the row waits, then adds them to the rebuilt row; one that added them already has
    committed them before the lock is granted, so the rebuild reads them."""
    customer, dimension, bucket = key
    where = "customer = ? AND dimension = ? AND bucket = ?"
    tx.one(f"SELECT 1 FROM rollups WHERE {where}{dialect.for_update}", key)
    meta = metadata_sql if unique_key is not None else "NULL"
    rows = tx.all(
        f"SELECT seq, ts, value, {meta} FROM records r WHERE {dialect.series_match} "
        "AND ts >= ? AND ts < ? ORDER BY ts, seq",
        (customer, dimension, bucket, bucket + BUCKET_NS),
    )
    if not rows:
        tx.run(f"DELETE FROM rollups WHERE {where}", key)
    else:
        values = [Decimal(r[2]) for r in rows]
        records = [
            UsageRecord(int(r[1]), customer, dimension, v)
            for r, v in zip(rows, values, strict=True)
        ]
        [(n, total, lo, hi, last_ts, last_seq, last, wsum)] = rollup_partials(
            records, values, [int(r[0]) for r in rows]
        ).values()
        d = dialect.decimal
        tx.run(
            _UPSERT_ROLLUP,
            (*key, n, d(total), d(lo), d(hi), last_ts, last_seq, d(last), d(wsum)),
        )
    tx.run(f"DELETE FROM rollup_distinct WHERE {where}", key)
    if unique_key is not None:
        uniques = {unique_of(read_metadata(r[3]), unique_key) for r in rows}
        tx.many(
            "INSERT INTO rollup_distinct VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [(*key, u) for u in sorted(u for u in uniques if u is not None)],
        )


def cancelled_page(tx: Tx, after_seq: int | None, limit: int) -> list[CancelledRecord]:
    """The audit list, oldest cancellation first, those after ``after_seq`` only."""
    rows = tx.all(
        f"SELECT {_LIST_COLS} FROM cancelled_records WHERE seq > ? ORDER BY seq LIMIT ?",
        (after_seq or 0, limit),
    )
    return [
        CancelledRecord(
            int(r[0]),
            int(r[1]),
            str(r[2]),
            int(r[3]),
            str(r[4]),
            str(r[5]),
            Decimal(r[6]),
            read_metadata(r[7]),
            str(r[8]),
            int(r[9]),
            int(r[10]),
            r[11],
        )
        for r in rows
    ]
