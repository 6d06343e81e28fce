"""The embedded SQLite store: one writer thread, WAL, one fsync per group commit.

Records are appended in ingest order (integer primary key), so writes go to the right edge of
every B-tree. Dedup keys are persisted append-only as one blob per commit in ``dedup_log`` and
looked up in the in-memory ``DedupIndex``; an exclusive lock file keeps a second process off the
database, which is what makes the in-memory index authoritative. Decimals are stored as exact
text; rollups are merged in Python and written back.
"""

from __future__ import annotations

import fcntl
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from meter_gateway.aggregation.windows import BUCKET_NS
from meter_gateway.decimals import EXACT
from meter_gateway.model import Batch, CommitResult, UsageRecord
from meter_gateway.store.base import RawPoint, RejectedRow, RollupRow, StoredRecord
from meter_gateway.store.dedup_index import DedupIndex

NS = 1_000_000_000

MIGRATIONS: tuple[str, ...] = (
    # 1: the initial schema
    """
    CREATE TABLE catalog (
        kind TEXT NOT NULL, id TEXT NOT NULL, body TEXT NOT NULL, updated_ns INTEGER NOT NULL,
        PRIMARY KEY (kind, id)) WITHOUT ROWID;
    CREATE TABLE records (
        seq INTEGER PRIMARY KEY, ts INTEGER NOT NULL, customer TEXT NOT NULL,
        dimension TEXT NOT NULL, value TEXT NOT NULL, record_id TEXT, metadata BLOB,
        source TEXT NOT NULL, received_ns INTEGER NOT NULL);
    CREATE INDEX records_cdt ON records (customer, dimension, ts);
    CREATE INDEX records_ts ON records (ts);
    CREATE TABLE dedup_log (seq INTEGER PRIMARY KEY, seen_s INTEGER NOT NULL, keys BLOB NOT NULL);
    CREATE INDEX dedup_log_seen ON dedup_log (seen_s);
    CREATE TABLE rollups (
        customer TEXT NOT NULL, dimension TEXT NOT NULL, bucket INTEGER NOT NULL,
        count INTEGER NOT NULL, sum TEXT NOT NULL, min TEXT NOT NULL, max TEXT NOT NULL,
        last_ts INTEGER NOT NULL, last_seq INTEGER NOT NULL, last_value TEXT NOT NULL,
        wsum TEXT NOT NULL,
        PRIMARY KEY (customer, dimension, bucket)) WITHOUT ROWID;
    CREATE TABLE rollup_distinct (
        customer TEXT NOT NULL, dimension TEXT NOT NULL, bucket INTEGER NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (customer, dimension, bucket, value)) WITHOUT ROWID;
    CREATE TABLE rejected (
        seq INTEGER PRIMARY KEY, received_ns INTEGER NOT NULL, source TEXT NOT NULL,
        reason TEXT NOT NULL, field TEXT, error TEXT NOT NULL, raw TEXT);
    CREATE INDEX rejected_reason ON rejected (reason, seq);
    """,
    # 2: receiver state that commits with the records it describes
    """
    CREATE TABLE receiver_state (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
    """,
)

_RollupKey = tuple[str, str, int]


class StoreLockedError(RuntimeError):
    """Another process has this SQLite database open for writing."""


def path_from_url(url: str) -> str:
    """``sqlite:///relative.db``, ``sqlite:////abs/path.db`` or ``sqlite:///:memory:``."""
    if not url.startswith("sqlite://"):
        raise ValueError(f"not a sqlite URL: {url!r}")
    rest = url.removeprefix("sqlite://")
    path = rest[1:] if rest.startswith("/") else rest
    if path.startswith("/"):
        return path
    return path or "meter-gateway.db"


class SQLiteStore:
    def __init__(
        self, path: str, dedup_window_s: int, now_ns: int, rollup_cache_size: int = 200_000
    ) -> None:
        self.path = path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(f"{path}.lock", "a+b")  # noqa: SIM115 - held for the store's life
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise StoreLockedError(f"{path} is in use by another meter-gateway process") from None
        self._conn = self._connect()
        self._migrate()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._local = threading.local()
        self._cache: dict[_RollupKey, RollupRow] = {}
        self._cache_size = rollup_cache_size
        row = self._conn.execute("SELECT coalesce(max(seq), 0) FROM records").fetchone()
        self._next_seq = int(row[0]) + 1
        row = self._conn.execute("SELECT coalesce(max(seq), 0) FROM rejected").fetchone()
        self._next_rejected = int(row[0]) + 1
        self.dedup = DedupIndex(dedup_window_s)
        self._load_dedup(now_ns // NS)
        self._last_purge_s = now_ns // NS

    # --- connections and schema --------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsynced at every commit, so a 2xx survives power loss.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA cache_size=-131072")
        conn.execute("PRAGMA temp_store=MEMORY")
        conn.execute("PRAGMA wal_autocheckpoint=8192")
        return conn

    def _migrate(self) -> None:
        version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
        for i, script in enumerate(MIGRATIONS[version:], start=version + 1):
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in script.split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version={i}")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only=0")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    @contextmanager
    def _write_txn(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _load_dedup(self, now_s: int) -> None:
        cutoff = now_s - self.dedup.window_s
        cur = self._conn.execute(
            "SELECT keys, seen_s FROM dedup_log WHERE seen_s >= ? ORDER BY seq", (cutoff,)
        )
        self.dedup.load((bytes(k), int(s)) for k, s in cur)

    def close(self) -> None:
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        self._conn.close()
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()

    # --- commit ------------------------------------------------------------------------------

    def commit(self, batches: Sequence[Batch], now_ns: int) -> list[CommitResult]:
        now_s = now_ns // NS
        flat: list[UsageRecord] = [r for b in batches for r in b.records]
        keys = [r.dedup_key for r in flat if r.dedup_key is not None]
        seen = iter(self.dedup.contains(keys, now_s))
        in_group: set[bytes] = set()
        fresh: list[bytes] = []
        new_flags: list[bool] = []
        for r in flat:
            k = r.dedup_key
            if k is None:
                new_flags.append(True)
                continue
            dup = next(seen) or k in in_group
            new_flags.append(not dup)
            if not dup:
                in_group.add(k)
                fresh.append(k)

        seq = self._next_seq
        rows: list[tuple[Any, ...]] = []
        distinct: list[tuple[str, str, int, str]] = []
        acc: dict[_RollupKey, list[Any]] = {}
        for r, is_new in zip(flat, new_flags, strict=True):
            if not is_new:
                continue
            ts, v = r.timestamp_ns, r.value
            rows.append(
                (
                    seq,
                    ts,
                    r.customer_id,
                    r.dimension_id,
                    str(v),
                    r.record_id,
                    orjson.dumps(r.metadata) if r.metadata else None,
                    r.source,
                    now_ns,
                )
            )
            bucket = ts - ts % BUCKET_NS
            key = (r.customer_id, r.dimension_id, bucket)
            w = EXACT.multiply(v, bucket + BUCKET_NS - ts)
            a = acc.get(key)
            if a is None:
                acc[key] = [1, v, v, v, ts, seq, v, w]
            else:
                a[0] += 1
                a[1] = EXACT.add(a[1], v)
                if v < a[2]:
                    a[2] = v
                if v > a[3]:
                    a[3] = v
                if ts >= a[4]:  # later seq wins ties: records are walked in ingest order
                    a[4], a[5], a[6] = ts, seq, v
                a[7] = EXACT.add(a[7], w)
            if r.unique_value is not None:
                distinct.append((r.customer_id, r.dimension_id, bucket, r.unique_value))
            seq += 1

        rejected_rows = []
        rseq = self._next_rejected
        for b in batches:
            for e in b.errors:
                rejected_rows.append(
                    (rseq, now_ns, b.source.value, e.reason.value, e.field, e.error, e.raw)
                )
                rseq += 1

        conn = self._conn
        with self._write_txn(conn):
            merged = self._merge_rollups(conn, acc)
            if rows:
                conn.executemany("INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?)", rows)
            if fresh:
                conn.execute(
                    "INSERT INTO dedup_log (seen_s, keys) VALUES (?, ?)", (now_s, b"".join(fresh))
                )
            if merged:
                conn.executemany(
                    "INSERT OR REPLACE INTO rollups VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    [
                        (
                            c,
                            d,
                            row.bucket_ns,
                            row.count,
                            str(row.sum),
                            str(row.min),
                            str(row.max),
                            row.last_ts,
                            row.last_seq,
                            str(row.last_value),
                            str(row.wsum),
                        )
                        for (c, d, _), row in merged.items()
                    ],
                )
            if distinct:
                conn.executemany("INSERT OR IGNORE INTO rollup_distinct VALUES (?,?,?,?)", distinct)
            if rejected_rows:
                conn.executemany("INSERT INTO rejected VALUES (?,?,?,?,?,?,?)", rejected_rows)
            for b in batches:
                if b.state:
                    conn.executemany(
                        "INSERT OR REPLACE INTO receiver_state VALUES (?, ?)",
                        [(k, v) for k, v in b.state.items() if v is not None],
                    )
                    conn.executemany(
                        "DELETE FROM receiver_state WHERE key = ?",
                        [(k,) for k, v in b.state.items() if v is None],
                    )

        # Committed: only now do the in-memory views move.
        self._next_seq = seq
        self._next_rejected = rseq
        self.dedup.add(fresh, now_s)
        if len(self._cache) + len(merged) > self._cache_size:
            self._cache.clear()
        self._cache.update(merged)
        if now_s - self._last_purge_s >= 600:
            self._purge_dedup(now_s)

        results = []
        flags = iter(new_flags)
        for b in batches:
            accepted = sum(1 for _ in b.records if next(flags))
            results.append(CommitResult(accepted, len(b.records) - accepted, len(b.errors)))
        return results

    def _merge_rollups(
        self, conn: sqlite3.Connection, acc: dict[_RollupKey, list[Any]]
    ) -> dict[_RollupKey, RollupRow]:
        missing = [k for k in acc if k not in self._cache]
        loaded: dict[_RollupKey, RollupRow] = {}
        for c, d, bucket in missing:
            row = conn.execute(
                "SELECT count, sum, min, max, last_ts, last_seq, last_value, wsum FROM rollups "
                "WHERE customer=? AND dimension=? AND bucket=?",
                (c, d, bucket),
            ).fetchone()
            if row is not None:
                loaded[(c, d, bucket)] = _rollup(bucket, row)
        out: dict[_RollupKey, RollupRow] = {}
        for key, (n, s, mn, mx, lts, lseq, lv, w) in acc.items():
            old = self._cache.get(key) or loaded.get(key)
            if old is not None:
                later = (lts, lseq) > (old.last_ts, old.last_seq)
                out[key] = RollupRow(
                    key[2],
                    old.count + n,
                    EXACT.add(old.sum, s),
                    min(old.min, mn),
                    max(old.max, mx),
                    lts if later else old.last_ts,
                    lseq if later else old.last_seq,
                    lv if later else old.last_value,
                    EXACT.add(old.wsum, w),
                )
            else:
                out[key] = RollupRow(key[2], n, s, mn, mx, lts, lseq, lv, w)
        return out

    def _purge_dedup(self, now_s: int) -> None:
        cutoff = now_s - self.dedup.window_s
        with self._write_txn(self._conn):
            self._conn.execute("DELETE FROM dedup_log WHERE seen_s < ?", (cutoff,))
        self.dedup.compact(now_s)
        self._last_purge_s = now_s

    # --- receiver state --------------------------------------------------------------------

    def state_get(self, keys: Sequence[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        conn = self._reader()
        for i in range(0, len(keys), 500):
            chunk = list(keys[i : i + 500])
            marks = ",".join("?" * len(chunk))
            for k, v in conn.execute(
                f"SELECT key, value FROM receiver_state WHERE key IN ({marks})", chunk
            ):
                out[k] = bytes(v)
        return out

    def state_scan(self, prefix: str) -> dict[str, bytes]:
        cur = self._reader().execute(
            "SELECT key, value FROM receiver_state WHERE key >= ? AND key < ? ORDER BY key",
            (prefix, prefix + "\U0010ffff"),
        )
        return {k: bytes(v) for k, v in cur}

    # --- catalog -----------------------------------------------------------------------------

    # --- leases: the lock file already makes this process the only one on the database

    def lease(self, name: str, holder: str, ttl_ns: int, now_ns: int) -> bool:
        return True

    def release(self, name: str, holder: str) -> None:
        return None

    def catalog_load(self) -> dict[str, dict[str, dict[str, Any]]]:
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for kind, id_, body in self._reader().execute(
            "SELECT kind, id, body FROM catalog ORDER BY kind, id"
        ):
            out.setdefault(kind, {})[id_] = orjson.loads(body)
        return out

    def catalog_put(self, kind: str, id: str, body: Mapping[str, Any]) -> None:
        conn = self._reader()
        with self._write_txn(conn):
            conn.execute(
                "INSERT OR REPLACE INTO catalog VALUES (?, ?, ?, ?)",
                (kind, id, orjson.dumps(dict(body)).decode(), time.time_ns()),
            )

    def catalog_delete(self, kind: str, id: str) -> bool:
        conn = self._reader()
        with self._write_txn(conn):
            cur = conn.execute("DELETE FROM catalog WHERE kind=? AND id=?", (kind, id))
        return cur.rowcount > 0

    # --- reads -------------------------------------------------------------------------------

    def rollups(
        self, customer: str, dimension: str, from_bucket: int, to_bucket: int
    ) -> list[RollupRow]:
        cur = self._reader().execute(
            "SELECT bucket, count, sum, min, max, last_ts, last_seq, last_value, wsum "
            "FROM rollups WHERE customer=? AND dimension=? AND bucket>=? AND bucket<? "
            "ORDER BY bucket",
            (customer, dimension, from_bucket, to_bucket),
        )
        return [_rollup(r[0], r[1:]) for r in cur]

    def raw(
        self, customer: str, dimension: str, from_ns: int, to_ns: int, unique_key: str | None = None
    ) -> list[RawPoint]:
        cols = "ts, seq, value, metadata" if unique_key else "ts, seq, value, NULL"
        cur = self._reader().execute(
            f"SELECT {cols} FROM records "
            "WHERE customer=? AND dimension=? AND ts>=? AND ts<? ORDER BY ts, seq",
            (customer, dimension, from_ns, to_ns),
        )
        return [
            RawPoint(ts, seq, Decimal(v), unique_of(orjson.loads(m), unique_key) if m else None)
            for ts, seq, v, m in cur
        ]

    def distinct(
        self, customer: str, dimension: str, from_bucket: int, to_bucket: int
    ) -> list[tuple[int, str]]:
        cur = self._reader().execute(
            "SELECT bucket, value FROM rollup_distinct "
            "WHERE customer=? AND dimension=? AND bucket>=? AND bucket<?",
            (customer, dimension, from_bucket, to_bucket),
        )
        return [(int(b), str(v)) for b, v in cur]

    def last_before(self, customer: str, dimension: str, ts_ns: int) -> RawPoint | None:
        row = (
            self._reader()
            .execute(
                "SELECT ts, seq, value FROM records WHERE customer=? AND dimension=? AND ts<? "
                "ORDER BY ts DESC, seq DESC LIMIT 1",
                (customer, dimension, ts_ns),
            )
            .fetchone()
        )
        return None if row is None else RawPoint(row[0], row[1], Decimal(row[2]), None)

    def pairs(
        self, customer: str | None, dimension: str | None, before_ns: int
    ) -> list[tuple[str, str]]:
        sql = "SELECT DISTINCT customer, dimension FROM rollups WHERE bucket < ?"
        args: list[Any] = [before_ns]
        sql += _pair_filter(customer, dimension, args)
        return [(c, d) for c, d in self._reader().execute(sql + " ORDER BY 1, 2", args)]

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
            "received_ns FROM records WHERE ts >= ? AND ts < ?"
        )
        args: list[Any] = [from_ns, to_ns]
        sql += _pair_filter(customer, dimension, args)
        if after is not None:
            sql += " AND (ts, seq) > (?, ?)"
            args.extend(after)
        sql += " ORDER BY ts, seq LIMIT ?"
        args.append(limit)
        return [
            StoredRecord(
                r[0],
                r[1],
                r[2],
                r[3],
                Decimal(r[4]),
                r[5],
                orjson.loads(r[6]) if r[6] else None,
                r[7],
                r[8],
            )
            for r in self._reader().execute(sql, args)
        ]

    def rejected(self, after_seq: int | None, limit: int, reason: str | None) -> list[RejectedRow]:
        sql = "SELECT * FROM rejected WHERE seq > ?"
        args: list[Any] = [after_seq or 0]
        if reason is not None:
            sql += " AND reason = ?"
            args.append(reason)
        sql += " ORDER BY seq LIMIT ?"
        args.append(limit)
        return [RejectedRow(*r) for r in self._reader().execute(sql, args)]

    def stats(self) -> dict[str, int]:
        conn = self._reader()
        return {
            "records": int(conn.execute("SELECT count(*) FROM records").fetchone()[0]),
            "dedup_keys": len(self.dedup),
        }


def _rollup(bucket: int, r: Sequence[Any]) -> RollupRow:
    return RollupRow(
        int(bucket),
        int(r[0]),
        Decimal(r[1]),
        Decimal(r[2]),
        Decimal(r[3]),
        int(r[4]),
        int(r[5]),
        Decimal(r[6]),
        Decimal(r[7]),
    )


def _pair_filter(customer: str | None, dimension: str | None, args: list[Any]) -> str:
    """SQL conditions (and their arguments, appended) for optional customer/dimension filters."""
    sql = ""
    for column, value in (("customer", customer), ("dimension", dimension)):
        if value is not None:
            sql += f" AND {column} = ?"
            args.append(value)
    return sql


def unique_of(metadata: dict[str, Any] | None, unique_key: str | None) -> str | None:
    """The distinct-count value of a record: its metadata[unique_key] as text."""
    if unique_key is None or not metadata or unique_key not in metadata:
        return None
    v = metadata[unique_key]
    return v if isinstance(v, str) else orjson.dumps(v).decode()
