"""The PostgreSQL store: several gateway replicas on one database, exact together.

Everything that must be exact across replicas is decided by the database inside the commit
transaction, never by a replica's memory: dedup keys are inserted with ``ON CONFLICT`` (the same
id committed by two replicas at once is inserted by one and waits for, then loses to, the other),
rollups are merged by an upsert that adds counts, sums and ``wsum``, keeps min/max and the last
record by (timestamp, seq), and receiver state is written compare-and-set: a batch whose state
expectations no longer hold is left out of the commit (``CommitResult.conflict``) so its receiver
reloads and converts again. Numbers are ``numeric``: exact. Record seqs come from a sequence.

Bulk path, one transaction per group commit: dedup keys as one sorted ``bytea[]`` through
``INSERT .. ON CONFLICT .. RETURNING``, the fresh records by ``COPY`` straight into ``records``,
rollup deltas (merged per bucket in Python) as arrays through one sorted upsert. Every phase
takes its row locks in key order, so concurrent commits wait for each other but never deadlock
(a deadlock or serialization failure is retried anyway). Migrations are versioned and run under
an advisory lock, so replicas that start together migrate once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import compress
from typing import Any

import orjson
import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool

from meter_gateway.aggregation.windows import BUCKET_NS
from meter_gateway.model import Batch, CommitResult, UsageRecord
from meter_gateway.store.base import (
    ConflictError,
    InvoiceRow,
    LeaseLostError,
    LedgerEntry,
    OutboxEvent,
    OutboxItem,
    OutboxStats,
    RawPoint,
    RejectedRow,
    RollupRow,
    StoredRecord,
    Unstorable,
    encode_metadata,
    printable_text,
    read_metadata,
    rollup_partials,
)
from meter_gateway.store.sqlite import unique_of

log = logging.getLogger(__name__)

NS = 1_000_000_000
# Advisory lock ids (pg_advisory_lock's bigint space is shared by everything on the database).
MIGRATION_LOCK = 0x6D67_0001  # "mg" 1
PURGE_LOCK = 0x6D67_0002
CATALOG_LOCK = 0x6D67_0003  # held around one catalog change (Store.catalog_lock)
STATE_LOCK_CLASS = 0x6D67  # pg_advisory_xact_lock(class, hashtext(key)) per receiver-state key
PURGE_EVERY_S = 600
PURGE_CHUNK = 50_000
COMMIT_ATTEMPTS = 5

MIGRATIONS: tuple[str, ...] = (
    # 1: the initial schema. Text keys are COLLATE "C": byte order, as in SQLite, and faster.
    """
    CREATE TABLE catalog (
        kind text COLLATE "C" NOT NULL, id text COLLATE "C" NOT NULL, body text NOT NULL,
        updated_ns bigint NOT NULL, PRIMARY KEY (kind, id));
    CREATE SEQUENCE records_seq;
    CREATE TABLE records (
        seq bigint NOT NULL, ts bigint NOT NULL, customer text COLLATE "C" NOT NULL,
        dimension text COLLATE "C" NOT NULL, value numeric NOT NULL, record_id text,
        metadata text, source text NOT NULL, received_ns bigint NOT NULL);
    CREATE INDEX records_cdt ON records (customer, dimension, ts, seq);
    CREATE INDEX records_ts ON records (ts, seq);
    CREATE TABLE dedup_keys (key bytea PRIMARY KEY, seen_s bigint NOT NULL);
    CREATE INDEX dedup_keys_seen ON dedup_keys USING brin (seen_s);
    CREATE TABLE rollups (
        customer text COLLATE "C" NOT NULL, dimension text COLLATE "C" NOT NULL,
        bucket bigint NOT NULL, count bigint NOT NULL, sum numeric NOT NULL,
        min numeric NOT NULL, max numeric NOT NULL, last_ts bigint NOT NULL,
        last_seq bigint NOT NULL, last_value numeric NOT NULL, wsum numeric NOT NULL,
        PRIMARY KEY (customer, dimension, bucket));
    CREATE TABLE rollup_distinct (
        customer text COLLATE "C" NOT NULL, dimension text COLLATE "C" NOT NULL,
        bucket bigint NOT NULL, value text COLLATE "C" NOT NULL,
        PRIMARY KEY (customer, dimension, bucket, value));
    CREATE TABLE rejected (
        seq bigserial PRIMARY KEY, received_ns bigint NOT NULL, source text NOT NULL,
        reason text COLLATE "C" NOT NULL, field text, error text NOT NULL, raw text);
    CREATE INDEX rejected_reason ON rejected (reason, seq);
    CREATE TABLE receiver_state (key text COLLATE "C" PRIMARY KEY, value bytea NOT NULL);
    CREATE TABLE leases (
        name text COLLATE "C" PRIMARY KEY, holder text NOT NULL, expires_ns bigint NOT NULL);
    """,
    # 2: billing: invoices (finalized ones as exact bytes), wallet ledger, job state, outbox
    """
    CREATE TABLE invoices (
        id text COLLATE "C" PRIMARY KEY, customer text COLLATE "C" NOT NULL,
        status text NOT NULL, created_ns bigint NOT NULL, finalized_ns bigint,
        document text NOT NULL);
    CREATE INDEX invoices_customer ON invoices (customer, created_ns, id);
    CREATE INDEX invoices_created ON invoices (created_ns, id);
    CREATE TABLE invoice_renditions (
        invoice_id text COLLATE "C" NOT NULL, format text COLLATE "C" NOT NULL,
        body bytea NOT NULL, PRIMARY KEY (invoice_id, format));
    CREATE TABLE wallet_ledger (
        customer text COLLATE "C" NOT NULL, currency text COLLATE "C" NOT NULL,
        seq bigint NOT NULL, entry_id text COLLATE "C" NOT NULL, kind text NOT NULL,
        amount numeric NOT NULL, balance numeric NOT NULL, created_ns bigint NOT NULL,
        reference text,
        CONSTRAINT wallet_ledger_seq PRIMARY KEY (customer, currency, seq),
        CONSTRAINT wallet_ledger_entry UNIQUE (customer, currency, entry_id));
    CREATE TABLE job_state (key text COLLATE "C" PRIMARY KEY, body text NOT NULL);
    CREATE TABLE outbox (
        seq bigserial PRIMARY KEY, exporter text COLLATE "C" NOT NULL,
        event_id text COLLATE "C" NOT NULL, type text NOT NULL, payload bytea NOT NULL,
        created_ns bigint NOT NULL, status text NOT NULL, attempts int NOT NULL,
        next_attempt_ns bigint NOT NULL, last_error text, delivered_ns bigint,
        UNIQUE (exporter, event_id));
    CREATE INDEX outbox_pending ON outbox (exporter, status, seq);
    """,
    # 3: the catalog version, moved in the transaction of every catalog change, so replicas
    # see another's API changes (one row: catalog writers lock it first, so they queue there)
    """
    CREATE TABLE catalog_version (
        one boolean PRIMARY KEY DEFAULT true CHECK (one), version bigint NOT NULL);
    INSERT INTO catalog_version VALUES (true, 0);
    """,
)


_ROLLUP_UPSERT = """
INSERT INTO rollups AS r
    (customer, dimension, bucket, count, sum, min, max, last_ts, last_seq, last_value, wsum)
SELECT * FROM unnest(%s::text[], %s::text[], %s::int8[], %s::int8[], %s::numeric[],
                     %s::numeric[], %s::numeric[], %s::int8[], %s::int8[], %s::numeric[],
                     %s::numeric[])
ON CONFLICT (customer, dimension, bucket) DO UPDATE SET
    count = r.count + excluded.count,
    sum = r.sum + excluded.sum,
    min = least(r.min, excluded.min),
    max = greatest(r.max, excluded.max),
    last_ts = CASE WHEN (excluded.last_ts, excluded.last_seq) > (r.last_ts, r.last_seq)
                   THEN excluded.last_ts ELSE r.last_ts END,
    last_seq = CASE WHEN (excluded.last_ts, excluded.last_seq) > (r.last_ts, r.last_seq)
                    THEN excluded.last_seq ELSE r.last_seq END,
    last_value = CASE WHEN (excluded.last_ts, excluded.last_seq) > (r.last_ts, r.last_seq)
                      THEN excluded.last_value ELSE r.last_value END,
    wsum = r.wsum + excluded.wsum
"""

# A key not seen within the window (expired, not yet purged) counts as new: it is re-marked.
_DEDUP_INSERT = """
INSERT INTO dedup_keys AS d (key, seen_s)
SELECT k, %(now)s FROM unnest(%(keys)s::bytea[]) AS k
ON CONFLICT (key) DO UPDATE SET seen_s = excluded.seen_s WHERE d.seen_s < %(cutoff)s
RETURNING key
"""


class SchemaTooNewError(RuntimeError):
    """The database was migrated by a newer meter-gateway than this one."""


def _lock_catalog_version(conn: psycopg.Connection[Any], expect: int | None) -> None:
    """A catalog writer's first step: lock the version row (writers queue here, so they never
    deadlock on catalog rows) and, with ``expect``, check it has not moved (FOR UPDATE reads
    the version last committed by whoever held the lock before)."""
    row = conn.execute("SELECT version FROM catalog_version FOR UPDATE").fetchone()
    assert row is not None  # migration 3 inserts the one row
    if expect is not None and int(row[0]) != expect:
        raise ConflictError(f"the catalog changed (version {row[0]}, expected {expect})")


def _text(s: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL; SQLite can. Keep the rest of the string."""
    if s is None or "\x00" not in s:
        return s
    return s.replace("\x00", "\ufffd")


class PostgresStore:
    """``Store`` on PostgreSQL. Any number of processes may open the same database."""

    def __init__(
        self,
        url: str,
        dedup_window_s: int,
        now_ns: int,
        pool_min: int = 1,
        pool_max: int = 8,
        connect_timeout_s: float = 30.0,
    ) -> None:
        self.url = url
        self.dedup_window_s = dedup_window_s
        migrate(url)
        self._pool = ConnectionPool(
            url,
            min_size=pool_min,
            max_size=pool_max,
            kwargs={"autocommit": True},
            open=False,
            name="meter-gateway",
        )
        self._pool.open(wait=True, timeout=connect_timeout_s)
        self._last_purge_s = now_ns // NS
        self._purge_lock = threading.Lock()

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection[Any]]:
        with self._pool.connection() as conn:
            yield conn

    # --- commit ------------------------------------------------------------------------------

    def commit(self, batches: Sequence[Batch], now_ns: int) -> list[CommitResult]:
        """One transaction (retried on deadlock); ``Unstorable`` when a value of the group is
        refused (by the encoders or as data by PostgreSQL), anything else is an outage."""
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            try:
                with self._conn() as conn, conn.transaction():
                    results = self._commit(conn, batches, now_ns)
                break
            except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure):
                if attempt == COMMIT_ATTEMPTS:
                    raise
                log.warning("commit hit a deadlock or serialization failure; retrying")
            except (
                psycopg.DataError,  # NUL in text, numbers out of a column's range, ...
                pg_errors.ProgramLimitExceeded,  # a key too long for its index
                ValueError,  # UnicodeEncodeError: unpaired surrogates
                TypeError,  # orjson: metadata nested too deep, integers past 64 bits
                OverflowError,
                ArithmeticError,
                RecursionError,
            ) as exc:
                raise Unstorable(f"PostgreSQL cannot store a value of the group: {exc}") from exc
        if now_ns // NS - self._last_purge_s >= PURGE_EVERY_S:
            self.purge_dedup(now_ns)
        return results

    def _commit(
        self, conn: psycopg.Connection[Any], batches: Sequence[Batch], now_ns: int
    ) -> list[CommitResult]:
        now_s = now_ns // NS
        cur = conn.cursor()
        conflicted = self._write_state(cur, batches)
        live = [b for i, b in enumerate(batches) if i not in conflicted]

        flat: list[UsageRecord] = [r for b in live for r in b.records]
        in_group: set[bytes] = set()
        firsts: list[bool] = []
        for r in flat:
            k = r.dedup_key
            if k is None:
                firsts.append(True)
            elif k in in_group:
                firsts.append(False)
            else:
                in_group.add(k)
                firsts.append(True)
        fresh: set[bytes] = set()
        if in_group:
            cur.execute(
                _DEDUP_INSERT,
                {"now": now_s, "keys": sorted(in_group), "cutoff": now_s - self.dedup_window_s},
            )
            fresh = {bytes(row[0]) for row in cur.fetchall()}
        new_flags = [
            first and (r.dedup_key is None or r.dedup_key in fresh)
            for r, first in zip(flat, firsts, strict=True)
        ]

        n_new = sum(new_flags)
        if n_new:
            cur.execute(
                "SELECT nextval('records_seq') FROM generate_series(1, %s)", (n_new,), prepare=True
            )
            seqs = sorted(int(row[0]) for row in cur.fetchall())
            self._write_records(cur, flat, new_flags, seqs, now_ns)

        rejected_rows = [
            (
                now_ns,
                b.source.value,
                e.reason.value,
                printable_text(e.field),
                printable_text(e.error),
                printable_text(e.raw),
            )
            for b in live
            for e in b.errors
        ]
        if rejected_rows:
            with cur.copy(
                "COPY rejected (received_ns, source, reason, field, error, raw) FROM STDIN"
            ) as cp:
                for row in rejected_rows:
                    cp.write_row(row)

        results: list[CommitResult] = []
        flags = iter(new_flags)
        for i, b in enumerate(batches):
            if i in conflicted:
                results.append(CommitResult(0, 0, 0, conflict=True))
                continue
            accepted = sum(1 for _ in b.records if next(flags))
            results.append(CommitResult(accepted, len(b.records) - accepted, len(b.errors)))
        return results

    def _write_records(
        self,
        cur: psycopg.Cursor[Any],
        flat: Sequence[UsageRecord],
        new_flags: Sequence[bool],
        seqs: Sequence[int],
        now_ns: int,
    ) -> None:
        fresh = list(compress(flat, new_flags))
        distinct = {
            (r.customer_id, r.dimension_id, r.timestamp_ns - r.timestamp_ns % BUCKET_NS, u)
            for r in fresh
            if (u := r.unique_value) is not None
        }
        with cur.copy(
            "COPY records (seq, ts, customer, dimension, value, record_id, metadata, source, "
            "received_ns) FROM STDIN"
        ) as cp:
            for r, seq in zip(fresh, seqs, strict=True):
                cp.write_row(
                    (
                        seq,
                        r.timestamp_ns,
                        r.customer_id,
                        r.dimension_id,
                        r.value,
                        # never altered: a NUL fails the commit (Unstorable), the record alone
                        r.record_id,
                        encode_metadata(r.metadata).decode() if r.metadata else None,
                        r.source.value,
                        now_ns,
                    )
                )
        acc = rollup_partials(fresh, [r.value for r in fresh], seqs)
        # Sorted, so that concurrent commits lock rollup rows in one order.
        keys = sorted(acc)
        cols: list[list[Any]] = [[k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]]
        for j in range(8):
            cols.append([acc[k][j] for k in keys])
        cur.execute(_ROLLUP_UPSERT, cols)
        if distinct:
            rows = sorted(distinct)
            cur.execute(
                "INSERT INTO rollup_distinct "
                "SELECT * FROM unnest(%s::text[], %s::text[], %s::int8[], %s::text[]) "
                "ON CONFLICT DO NOTHING",
                [[r[i] for r in rows] for i in range(4)],
            )

    def _write_state(self, cur: psycopg.Cursor[Any], batches: Sequence[Batch]) -> set[int]:
        """Write receiver state compare-and-set; the indexes of batches left out (conflicts).

        Every state key of the group is locked first (an advisory transaction lock per key, in
        one order), so the values read next are the latest committed ones and stay so until
        this transaction ends, whether or not the key exists yet.
        """
        touched = sorted({k for b in batches for k in (*b.state, *b.state_expect)})
        if not touched:
            return set()
        cur.execute(
            "SELECT pg_advisory_xact_lock(%s, h) FROM "
            "(SELECT DISTINCT hashtext(k) AS h FROM unnest(%s::text[]) AS k ORDER BY 1) AS s",
            (STATE_LOCK_CLASS, touched),
        )
        current: dict[str, bytes | None] = dict.fromkeys(touched)
        if any(b.state_expect for b in batches):
            cur.execute("SELECT key, value FROM receiver_state WHERE key = ANY(%s)", (touched,))
            current.update({k: bytes(v) for k, v in cur.fetchall()})
            original = dict(current)
        else:
            original = {}
        conflicted: set[int] = set()
        writes: dict[str, bytes | None] = {}
        for i, b in enumerate(batches):
            if any(current.get(k) != v for k, v in b.state_expect.items()):
                conflicted.add(i)
                continue
            current.update(b.state)
            writes.update(b.state)
        upserts = sorted((k, v) for k, v in writes.items() if v is not None)
        deletes = sorted(k for k, v in writes.items() if v is None)
        if original:  # skip writes that change nothing
            upserts = [(k, v) for k, v in upserts if original.get(k) != v]
        if upserts:
            cur.execute(
                "INSERT INTO receiver_state AS s (key, value) "
                "SELECT * FROM unnest(%s::text[], %s::bytea[]) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                ([k for k, _ in upserts], [v for _, v in upserts]),
            )
        if deletes:
            cur.execute("DELETE FROM receiver_state WHERE key = ANY(%s)", (deletes,))
        return conflicted

    def purge_dedup(self, now_ns: int) -> int:
        """Delete dedup keys older than the window (one replica at a time); how many."""
        now_s = now_ns // NS
        if not self._purge_lock.acquire(blocking=False):
            return 0
        deleted = 0
        try:
            self._last_purge_s = now_s
            with self._conn() as conn:
                got = conn.execute("SELECT pg_try_advisory_lock(%s)", (PURGE_LOCK,)).fetchone()
                if not (got and got[0]):
                    return 0
                try:
                    while True:
                        cur = conn.execute(
                            "DELETE FROM dedup_keys WHERE ctid = ANY(ARRAY("
                            "SELECT ctid FROM dedup_keys WHERE seen_s < %s LIMIT %s))",
                            (now_s - self.dedup_window_s, PURGE_CHUNK),
                        )
                        deleted += cur.rowcount
                        if cur.rowcount < PURGE_CHUNK:
                            break
                finally:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (PURGE_LOCK,))
        finally:
            self._purge_lock.release()
        return deleted

    # --- receiver state ----------------------------------------------------------------------

    def state_get(self, keys: Sequence[str]) -> dict[str, bytes]:
        if not keys:
            return {}
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT key, value FROM receiver_state WHERE key = ANY(%s)", (list(keys),)
            ).fetchall()
        return {k: bytes(v) for k, v in rows}

    def state_scan(self, prefix: str) -> dict[str, bytes]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT key, value FROM receiver_state WHERE key >= %s AND key < %s ORDER BY key",
                (prefix, prefix + "\U0010ffff"),
            ).fetchall()
        return {k: bytes(v) for k, v in rows}

    # --- leases ------------------------------------------------------------------------------

    def lease(self, name: str, holder: str, ttl_ns: int, now_ns: int) -> bool:
        with self._conn() as conn:
            row = conn.execute(
                "INSERT INTO leases AS l (name, holder, expires_ns) VALUES (%s, %s, %s) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
                "expires_ns = excluded.expires_ns "
                "WHERE l.holder = excluded.holder OR l.expires_ns <= %s RETURNING holder",
                (name, holder, now_ns + ttl_ns, now_ns),
            ).fetchone()
        return row is not None

    def release(self, name: str, holder: str) -> None:
        with self._conn() as conn:
            conn.execute("DELETE FROM leases WHERE name = %s AND holder = %s", (name, holder))

    # --- catalog -----------------------------------------------------------------------------

    def catalog_load(self) -> dict[str, dict[str, dict[str, Any]]]:
        out: dict[str, dict[str, dict[str, Any]]] = {}
        with self._conn() as conn:
            rows = conn.execute("SELECT kind, id, body FROM catalog ORDER BY kind, id").fetchall()
        for kind, id_, body in rows:
            out.setdefault(kind, {})[id_] = orjson.loads(body)
        return out

    def catalog_put(
        self, kind: str, id: str, body: Mapping[str, Any], expect_version: int | None = None
    ) -> None:
        with self._conn() as conn, conn.transaction():
            _lock_catalog_version(conn, expect_version)
            conn.execute(
                "INSERT INTO catalog VALUES (%s, %s, %s, %s) ON CONFLICT (kind, id) "
                "DO UPDATE SET body = excluded.body, updated_ns = excluded.updated_ns",
                (kind, id, orjson.dumps(dict(body)).decode(), time.time_ns()),
            )
            conn.execute("UPDATE catalog_version SET version = version + 1")

    def catalog_delete(self, kind: str, id: str, expect_version: int | None = None) -> bool:
        with self._conn() as conn, conn.transaction():
            _lock_catalog_version(conn, expect_version)
            cur = conn.execute("DELETE FROM catalog WHERE kind = %s AND id = %s", (kind, id))
            if cur.rowcount > 0:
                conn.execute("UPDATE catalog_version SET version = version + 1")
        return cur.rowcount > 0

    def catalog_version(self) -> int:
        with self._conn() as conn:
            row = conn.execute("SELECT version FROM catalog_version", prepare=True).fetchone()
        assert row is not None  # migration 3 inserts the one row
        return int(row[0])

    @contextmanager
    def catalog_lock(self) -> Iterator[None]:
        # A transaction lock: it goes with the transaction, whatever happens to the caller or
        # the connection; the change itself is written on other connections meanwhile.
        with self._conn() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (CATALOG_LOCK,))
            yield

    # --- reads -------------------------------------------------------------------------------

    def rollups(
        self, customer: str, dimension: str, from_bucket: int, to_bucket: int
    ) -> list[RollupRow]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT bucket, count, sum, min, max, last_ts, last_seq, last_value, wsum "
                "FROM rollups WHERE customer = %s AND dimension = %s AND bucket >= %s "
                "AND bucket < %s ORDER BY bucket",
                (customer, dimension, from_bucket, to_bucket),
            ).fetchall()
        return [RollupRow(*r) for r in rows]

    def raw(
        self, customer: str, dimension: str, from_ns: int, to_ns: int, unique_key: str | None = None
    ) -> list[RawPoint]:
        cols = "ts, seq, value, metadata" if unique_key else "ts, seq, value, NULL"
        with self._conn() as conn:
            rows = conn.execute(
                f"SELECT {cols} FROM records WHERE customer = %s AND dimension = %s "
                "AND ts >= %s AND ts < %s ORDER BY ts, seq",
                (customer, dimension, from_ns, to_ns),
            ).fetchall()
        return [
            RawPoint(ts, seq, v, unique_of(read_metadata(m), unique_key) if m else None)
            for ts, seq, v, m in rows
        ]

    def distinct(
        self, customer: str, dimension: str, from_bucket: int, to_bucket: int
    ) -> list[tuple[int, str]]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT bucket, value FROM rollup_distinct WHERE customer = %s "
                "AND dimension = %s AND bucket >= %s AND bucket < %s",
                (customer, dimension, from_bucket, to_bucket),
            ).fetchall()
        return [(int(b), str(v)) for b, v in rows]

    def last_before(self, customer: str, dimension: str, ts_ns: int) -> RawPoint | None:
        with self._conn() as conn:
            row = conn.execute(
                "SELECT ts, seq, value FROM records WHERE customer = %s AND dimension = %s "
                "AND ts < %s ORDER BY ts DESC, seq DESC LIMIT 1",
                (customer, dimension, ts_ns),
            ).fetchone()
        return None if row is None else RawPoint(row[0], row[1], row[2], None)

    def pairs(
        self, customer: str | None, dimension: str | None, before_ns: int
    ) -> list[tuple[str, str]]:
        sql = "SELECT DISTINCT customer, dimension FROM rollups WHERE bucket < %s"
        args: list[Any] = [before_ns]
        sql += _pair_filter(customer, dimension, args)
        with self._conn() as conn:
            rows = conn.execute(sql + " ORDER BY 1, 2", args).fetchall()
        return [(c, d) for c, d in rows]

    def records(
        self,
        customer: str | None,
        dimension: str | None,
        from_ns: int,
        to_ns: int,
        after: tuple[int, int] | None,
        limit: int,
    ) -> list[StoredRecord]:
        sql = (
            "SELECT seq, ts, customer, dimension, value, record_id, metadata, source, "
            "received_ns FROM records WHERE ts >= %s AND ts < %s"
        )
        args: list[Any] = [from_ns, to_ns]
        sql += _pair_filter(customer, dimension, args)
        if after is not None:
            sql += " AND (ts, seq) > (%s, %s)"
            args.extend(after)
        sql += " ORDER BY ts, seq LIMIT %s"
        args.append(limit)
        with self._conn() as conn:
            rows = conn.execute(sql, args).fetchall()
        return [
            StoredRecord(r[0], r[1], r[2], r[3], r[4], r[5], read_metadata(r[6]), r[7], r[8])
            for r in rows
        ]

    def rejected(self, after_seq: int | None, limit: int, reason: str | None) -> list[RejectedRow]:
        sql = (
            "SELECT seq, received_ns, source, reason, field, error, raw FROM rejected "
            "WHERE seq > %s"
        )
        args: list[Any] = [after_seq or 0]
        if reason is not None:
            sql += " AND reason = %s"
            args.append(reason)
        sql += " ORDER BY seq LIMIT %s"
        args.append(limit)
        with self._conn() as conn:
            rows = conn.execute(sql, args).fetchall()
        return [RejectedRow(*r) for r in rows]

    # --- billing: invoices, wallet, meters, outbox (semantics in store.base) ----------------

    def invoice_create(self, invoice: InvoiceRow) -> None:
        try:
            with self._conn() as conn, conn.transaction():
                cur = conn.cursor()
                cur.execute(
                    "INSERT INTO invoices VALUES (%s, %s, %s, %s, %s, %s)",
                    (
                        invoice.id,
                        invoice.customer,
                        invoice.status,
                        invoice.created_ns,
                        invoice.finalized_ns,
                        orjson.dumps(invoice.document).decode(),
                    ),
                )
                _put_renditions(cur, invoice.id, invoice.renditions)
        except pg_errors.UniqueViolation:
            raise ConflictError(f"invoice {invoice.id!r} already exists") from None

    def invoice_get(self, invoice_id: str) -> InvoiceRow | None:
        with self._conn() as conn:
            row = conn.execute(
                "SELECT id, customer, status, created_ns, finalized_ns, document FROM invoices "
                "WHERE id = %s",
                (invoice_id,),
            ).fetchone()
            if row is None:
                return None
            rend = conn.execute(
                "SELECT format, body FROM invoice_renditions WHERE invoice_id = %s",
                (invoice_id,),
            ).fetchall()
        return _invoice(row, {f: bytes(b) for f, b in rend})

    def invoice_list(
        self, customer: str | None, after: tuple[int, str] | None, limit: int
    ) -> list[InvoiceRow]:
        sql = (
            "SELECT id, customer, status, created_ns, finalized_ns, document FROM invoices "
            "WHERE true"
        )
        args: list[Any] = []
        if customer is not None:
            sql += " AND customer = %s"
            args.append(customer)
        if after is not None:
            sql += " AND (created_ns, id) > (%s, %s)"
            args.extend(after)
        sql += " ORDER BY created_ns, id LIMIT %s"
        args.append(limit)
        with self._conn() as conn:
            rows = conn.execute(sql, args).fetchall()
        return [_invoice(r, {}) for r in rows]

    def invoice_update_draft(self, invoice_id: str, document: Mapping[str, Any]) -> bool:
        with self._conn() as conn:
            cur = conn.execute(
                "UPDATE invoices SET document = %s WHERE id = %s AND status = 'draft'",
                (orjson.dumps(dict(document)).decode(), invoice_id),
            )
        return cur.rowcount > 0

    def invoice_finalize(
        self,
        invoice_id: str,
        document: Mapping[str, Any],
        renditions: Mapping[str, bytes],
        finalized_ns: int,
        ledger: Sequence[LedgerEntry],
        events: Sequence[OutboxEvent],
    ) -> bool:
        with self._conn() as conn, conn.transaction():
            cur = conn.cursor()
            # The row lock makes a second replica finalizing the same draft wait, then find
            # it finalized and write nothing.
            cur.execute(
                "UPDATE invoices SET status = 'finalized', finalized_ns = %s, document = %s "
                "WHERE id = %s AND status = 'draft'",
                (finalized_ns, orjson.dumps(dict(document)).decode(), invoice_id),
            )
            if cur.rowcount == 0:
                return False
            _put_renditions(cur, invoice_id, renditions)
            if ledger and not _append_ledger(cur, ledger):
                raise ConflictError(f"invoice {invoice_id!r} already drew on the wallet")
            _append_outbox(cur, events)
        return True

    _LEDGER_COLS = "customer, currency, seq, entry_id, kind, amount, balance, created_ns, reference"

    def wallet_last(self, customer: str, currency: str) -> LedgerEntry | None:
        with self._conn() as conn:
            row = conn.execute(
                f"SELECT {self._LEDGER_COLS} FROM wallet_ledger WHERE customer = %s "
                "AND currency = %s ORDER BY seq DESC LIMIT 1",
                (customer, currency),
            ).fetchone()
        return None if row is None else LedgerEntry(*row)

    def wallet_entries(
        self, customer: str, currency: str | None, after_seq: int, limit: int
    ) -> list[LedgerEntry]:
        sql = f"SELECT {self._LEDGER_COLS} FROM wallet_ledger WHERE customer = %s AND seq > %s"
        args: list[Any] = [customer, after_seq]
        if currency is not None:
            sql += " AND currency = %s"
            args.append(currency)
        sql += " ORDER BY currency, seq LIMIT %s"
        args.append(limit)
        with self._conn() as conn:
            rows = conn.execute(sql, args).fetchall()
        return [LedgerEntry(*r) for r in rows]

    def wallets(self) -> list[LedgerEntry]:
        with self._conn() as conn:
            rows = conn.execute(
                f"SELECT DISTINCT ON (customer, currency) {self._LEDGER_COLS} "
                "FROM wallet_ledger ORDER BY customer, currency, seq DESC"
            ).fetchall()
        return [LedgerEntry(*r) for r in rows]

    def wallet_append(self, entries: Sequence[LedgerEntry]) -> bool:
        with self._conn() as conn, conn.transaction():
            return _append_ledger(conn.cursor(), entries)

    def job_state(self, prefix: str) -> dict[str, dict[str, Any]]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT key, body FROM job_state WHERE key >= %s AND key < %s ORDER BY key",
                (prefix, prefix + "\U0010ffff"),
            ).fetchall()
        return {k: orjson.loads(b) for k, b in rows}

    def job_commit(
        self,
        states: Mapping[str, Mapping[str, Any] | None],
        events: Sequence[OutboxEvent],
        fence: tuple[str, str] | None,
        now_ns: int,
    ) -> None:
        with self._conn() as conn, conn.transaction():
            cur = conn.cursor()
            if fence is not None:
                self._check_fence(cur, fence, now_ns)
            for key in sorted(states):
                body = states[key]
                if body is None:
                    cur.execute("DELETE FROM job_state WHERE key = %s", (key,))
                else:
                    cur.execute(
                        "INSERT INTO job_state VALUES (%s, %s) ON CONFLICT (key) "
                        "DO UPDATE SET body = excluded.body",
                        (key, orjson.dumps(dict(body)).decode()),
                    )
            _append_outbox(cur, events)

    @staticmethod
    def _check_fence(cur: psycopg.Cursor[Any], fence: tuple[str, str], now_ns: int) -> None:
        """Inside the writing transaction: the lease is ours and unexpired. FOR SHARE holds the
        lease row, so a replica taking the lease over waits until this transaction ends."""
        name, holder = fence
        row = cur.execute(
            "SELECT holder, expires_ns FROM leases WHERE name = %s FOR SHARE", (name,)
        ).fetchone()
        if row is None or row[0] != holder or row[1] <= now_ns:
            raise LeaseLostError(
                f"lease {name!r} is not held by {holder!r} "
                f"({'absent' if row is None else f'held by {row[0]!r}'}): nothing written"
            )

    def outbox_claim(self, exporter: str, now_ns: int, limit: int) -> list[OutboxItem]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT exporter, seq, event_id, type, payload, created_ns, attempts, "
                "next_attempt_ns, last_error FROM outbox WHERE exporter = %s "
                "AND status = 'pending' AND next_attempt_ns <= %s ORDER BY seq LIMIT %s",
                (exporter, now_ns, limit),
            ).fetchall()
        return [
            OutboxItem(e, s, i, t, bytes(p), c, a, n, err) for e, s, i, t, p, c, a, n, err in rows
        ]

    def outbox_delivered(self, exporter: str, seqs: Sequence[int], now_ns: int) -> None:
        with self._conn() as conn:
            conn.execute(
                "UPDATE outbox SET status = 'delivered', delivered_ns = %s, "
                "attempts = attempts + 1 WHERE exporter = %s AND seq = ANY(%s) "
                "AND status = 'pending'",
                (now_ns, exporter, list(seqs)),
            )

    def outbox_failed(
        self, exporter: str, seq: int, error: str, next_attempt_ns: int | None, now_ns: int
    ) -> None:
        with self._conn() as conn:
            conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = %s, "
                "next_attempt_ns = coalesce(%s, next_attempt_ns), status = %s "
                "WHERE exporter = %s AND seq = %s AND status = 'pending'",
                (
                    _text(error[:2000]),
                    next_attempt_ns,
                    "pending" if next_attempt_ns is not None else "dead",
                    exporter,
                    seq,
                ),
            )

    def outbox_stats(self) -> list[OutboxStats]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT exporter, count(*) FILTER (WHERE status = 'pending'), "
                "min(created_ns) FILTER (WHERE status = 'pending'), "
                "count(*) FILTER (WHERE status = 'dead') FROM outbox "
                "WHERE status != 'delivered' GROUP BY exporter ORDER BY exporter"
            ).fetchall()
        return [OutboxStats(e, int(p), o, int(d)) for e, p, o, d in rows]

    def outbox_purge(self, delivered_before_ns: int) -> int:
        with self._conn() as conn:
            cur = conn.execute(
                "DELETE FROM outbox WHERE status = 'delivered' AND delivered_ns < %s",
                (delivered_before_ns,),
            )
        return cur.rowcount

    def stats(self) -> dict[str, int]:
        with self._conn() as conn:
            n = conn.execute("SELECT count(*) FROM records").fetchone()
            k = conn.execute("SELECT count(*) FROM dedup_keys").fetchone()
        return {"records": int(n[0]) if n else 0, "dedup_keys": int(k[0]) if k else 0}


def _invoice(row: Sequence[Any], renditions: dict[str, bytes]) -> InvoiceRow:
    id_, customer, status, created_ns, finalized_ns, document = row
    return InvoiceRow(
        id_, customer, status, created_ns, finalized_ns, orjson.loads(document), renditions
    )


def _put_renditions(
    cur: psycopg.Cursor[Any], invoice_id: str, renditions: Mapping[str, bytes]
) -> None:
    if renditions:
        cur.executemany(
            "INSERT INTO invoice_renditions VALUES (%s, %s, %s) ON CONFLICT (invoice_id, format) "
            "DO UPDATE SET body = excluded.body",
            [(invoice_id, f, bytes(b)) for f, b in renditions.items()],
        )


def _append_ledger(cur: psycopg.Cursor[Any], entries: Sequence[LedgerEntry]) -> bool:
    """Inside a transaction: False if the first entry's id is already in its wallet (write
    nothing then); ConflictError if a seq is not the wallet's next one or is taken meanwhile."""
    for i, e in enumerate(entries):
        taken = cur.execute(
            "SELECT 1 FROM wallet_ledger WHERE customer = %s AND currency = %s AND entry_id = %s",
            (e.customer, e.currency, e.entry_id),
        ).fetchone()
        if taken is not None:
            if i != 0:
                raise ConflictError(f"ledger entry {e.entry_id!r} already recorded")
            return False
        row = cur.execute(
            "SELECT coalesce(max(seq), 0) FROM wallet_ledger WHERE customer = %s AND currency = %s",
            (e.customer, e.currency),
        ).fetchone()
        last = int(row[0]) if row else 0
        if e.seq != last + 1:
            raise ConflictError(
                f"wallet {e.customer}/{e.currency} is at entry {last}, not {e.seq - 1}: "
                "re-read and retry"
            )
        try:
            # A concurrent append of the same seq (or entry id) waits for the other transaction
            # and then fails here: a savepoint keeps our transaction usable for the error.
            with cur.connection.transaction():
                cur.execute(
                    "INSERT INTO wallet_ledger VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (
                        e.customer,
                        e.currency,
                        e.seq,
                        e.entry_id,
                        e.kind,
                        e.amount,
                        e.balance,
                        e.created_ns,
                        e.reference,
                    ),
                )
        except pg_errors.UniqueViolation:
            raise ConflictError(
                f"wallet {e.customer}/{e.currency} already has entry {e.seq} or "
                f"{e.entry_id!r}: re-read and retry"
            ) from None
    return True


def _append_outbox(cur: psycopg.Cursor[Any], events: Sequence[OutboxEvent]) -> None:
    if events:
        cur.executemany(
            "INSERT INTO outbox (exporter, event_id, type, payload, created_ns, status, "
            "attempts, next_attempt_ns) VALUES (%s, %s, %s, %s, %s, 'pending', 0, %s) "
            "ON CONFLICT (exporter, event_id) DO NOTHING",
            [
                (e.exporter, e.event_id, e.type, e.payload, e.created_ns, e.created_ns)
                for e in events
            ],
        )


def _pair_filter(customer: str | None, dimension: str | None, args: list[Any]) -> str:
    sql = ""
    for column, value in (("customer", customer), ("dimension", dimension)):
        if value is not None:
            sql += f" AND {column} = %s"
            args.append(value)
    return sql


def migrate(url: str) -> int:
    """Bring the schema up to date; replicas starting together migrate one after the other
    (a session advisory lock), and each migration commits with its version. The version."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS meter_gateway_schema "
                "(version int PRIMARY KEY, applied_ns bigint NOT NULL)"
            )
            row = conn.execute(
                "SELECT coalesce(max(version), 0) FROM meter_gateway_schema"
            ).fetchone()
            version = int(row[0]) if row else 0
            if version > len(MIGRATIONS):
                raise SchemaTooNewError(
                    f"the database schema is at version {version}, this meter-gateway knows "
                    f"{len(MIGRATIONS)}: upgrade meter-gateway"
                )
            for i, script in enumerate(MIGRATIONS[version:], start=version + 1):
                with conn.transaction():
                    conn.execute(script)
                    conn.execute(
                        "INSERT INTO meter_gateway_schema VALUES (%s, %s)", (i, time.time_ns())
                    )
                log.info("migrated the PostgreSQL schema to version %d", i)
                version = i
            return version
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
