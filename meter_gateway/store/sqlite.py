"""The embedded SQLite store: one writer thread, WAL, one fsync per group commit.

Records are appended in ingest order (integer primary key), so writes go to the right edge of
every B-tree. Dedup keys are persisted append-only as one blob per commit in ``dedup_log`` and
looked up in the in-memory ``DedupIndex``; an exclusive lock file keeps a second process off the
database, which is what makes the in-memory index authoritative. Decimals are stored as exact
text; rollups are added up in Python after each commit and written behind the commits
(``SQLiteStore._flush_rollups``: reads write them first, a crash folds the records past the mark
in again at open).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import compress, islice
from operator import attrgetter
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from meter_gateway.decimals import EXACT
from meter_gateway.model import Batch, CommitResult, SeriesMetadata, UsageRecord
from meter_gateway.store import corrections
from meter_gateway.store.base import (
    ROLLUP_COLUMNS,
    Bucketed,
    CancelledRecord,
    CancelResult,
    GroupVoided,
    RawPoint,
    RejectedRow,
    RollupColumn,
    RollupKey,
    RollupRow,
    StoredRecord,
    Unstorable,
    encode_metadata,
    fold_records,
    pair_filter,
    printable_text,
    read_metadata,
    unique_of,
    unstorable_reason,
)
from meter_gateway.store.billing import SqlBilling
from meter_gateway.store.dedup_index import DedupIndex
from meter_gateway.store.dialect import Row
from meter_gateway.store.sqlite_layout import (
    APPLY,
    APPLY_TRIGGER,
    APPLY_VIEW,
    ApplyParams,
    record_rows,
    rollups_json,
    state_rows,
)
from meter_gateway.timebuckets import BUCKET_NS

NS = 1_000_000_000

log = logging.getLogger(__name__)

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
    # 3: billing: invoices (finalized ones as exact bytes), wallet ledger, job state, outbox
    """
    CREATE TABLE invoices (
        id TEXT PRIMARY KEY, customer TEXT NOT NULL, status TEXT NOT NULL,
        created_ns INTEGER NOT NULL, finalized_ns INTEGER, document TEXT NOT NULL) WITHOUT ROWID;
    CREATE INDEX invoices_customer ON invoices (customer, created_ns, id);
    CREATE INDEX invoices_created ON invoices (created_ns, id);
    CREATE TABLE invoice_renditions (
        invoice_id TEXT NOT NULL, format TEXT NOT NULL, body BLOB NOT NULL,
        PRIMARY KEY (invoice_id, format)) WITHOUT ROWID;
    CREATE TABLE wallet_ledger (
        customer TEXT NOT NULL, currency TEXT NOT NULL, seq INTEGER NOT NULL,
        entry_id TEXT NOT NULL, kind TEXT NOT NULL, amount TEXT NOT NULL, balance TEXT NOT NULL,
        created_ns INTEGER NOT NULL, reference TEXT,
        PRIMARY KEY (customer, currency, seq), UNIQUE (customer, currency, entry_id)) WITHOUT ROWID;
    CREATE TABLE job_state (key TEXT PRIMARY KEY, body TEXT NOT NULL) WITHOUT ROWID;
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, exporter TEXT NOT NULL, event_id TEXT NOT NULL,
        type TEXT NOT NULL, payload BLOB NOT NULL, created_ns INTEGER NOT NULL,
        status TEXT NOT NULL, attempts INTEGER NOT NULL, next_attempt_ns INTEGER NOT NULL,
        last_error TEXT, delivered_ns INTEGER, UNIQUE (exporter, event_id));
    CREATE INDEX outbox_pending ON outbox (exporter, status, seq);
    """,
    # 4: metadata a series' records share is stored once (records.meta_id), not per record
    """
    CREATE TABLE metadata (id INTEGER PRIMARY KEY, digest BLOB NOT NULL, body BLOB NOT NULL);
    CREATE UNIQUE INDEX metadata_digest ON metadata (digest);
    ALTER TABLE records ADD COLUMN meta_id INTEGER;
    """,
    # 5: the catalog version as a row (store.billing moves it in every catalog change's
    # transaction, as on PostgreSQL), no longer counted in memory from 0 at open
    """
    CREATE TABLE catalog_version (
        one INTEGER PRIMARY KEY CHECK (one = 1), version INTEGER NOT NULL);
    INSERT INTO catalog_version VALUES (1, 0);
    """,
    # 6: the invoice lifecycle (SPEC 11): gapless numbers from one counter row, the period as
    # columns (one finalized numbered invoice per customer and period; a void one frees it),
    # void invoices, cycle-made invoices; answers recorded under Idempotency-Key headers
    """
    ALTER TABLE invoices ADD COLUMN number TEXT;
    ALTER TABLE invoices ADD COLUMN from_ns INTEGER;
    ALTER TABLE invoices ADD COLUMN to_ns INTEGER;
    ALTER TABLE invoices ADD COLUMN voided_ns INTEGER;
    ALTER TABLE invoices ADD COLUMN origin TEXT NOT NULL DEFAULT 'api';
    CREATE UNIQUE INDEX invoices_number ON invoices (number);
    CREATE UNIQUE INDEX invoices_finalized_period ON invoices (customer, from_ns, to_ns)
        WHERE status = 'finalized' AND number IS NOT NULL;
    CREATE INDEX invoices_status ON invoices (status, created_ns, id);
    CREATE TABLE invoice_numbers (one INTEGER PRIMARY KEY CHECK (one = 1), last INTEGER NOT NULL);
    INSERT INTO invoice_numbers VALUES (1, 0);
    CREATE TABLE idempotency (
        path TEXT NOT NULL, key TEXT NOT NULL, fingerprint TEXT NOT NULL, status INTEGER,
        media_type TEXT, body BLOB, created_ns INTEGER NOT NULL,
        PRIMARY KEY (path, key)) WITHOUT ROWID;
    CREATE INDEX idempotency_created ON idempotency (created_ns);
    """,
    # 7: usage corrections (SPEC 11): records cancelled by id leave ``records`` for this audit
    # list (store.corrections); ids are looked up, so they are indexed
    """
    CREATE TABLE cancelled_records (
        seq INTEGER PRIMARY KEY, record_seq INTEGER NOT NULL, record_id TEXT NOT NULL,
        ts INTEGER NOT NULL, customer TEXT NOT NULL, dimension TEXT NOT NULL,
        value TEXT NOT NULL, metadata BLOB, source TEXT NOT NULL, received_ns INTEGER NOT NULL,
        cancelled_ns INTEGER NOT NULL, reason TEXT);
    CREATE INDEX cancelled_records_id ON cancelled_records (record_id);
    CREATE INDEX records_record_id ON records (record_id) WHERE record_id IS NOT NULL;
    """,
    # 8: record ids leave the hot table's indexes. An index on random ids took a random B-tree
    # page per record at every commit (a third of a group's time at 200k records, growing with
    # the table); ``record_ids`` gets them in sorted batches behind the commits
    # (``SQLiteStore._index_record_ids``), and a lookup reads it plus the records after
    # ``record_ids_upto`` by seq (SqliteDialect.record_id_match)
    """
    CREATE TABLE record_ids (
        record_id TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (record_id, seq)) WITHOUT ROWID;
    INSERT INTO record_ids SELECT record_id, seq FROM records WHERE record_id IS NOT NULL
        ORDER BY record_id, seq;
    CREATE TABLE record_ids_upto (one INTEGER PRIMARY KEY CHECK (one = 1), seq INTEGER NOT NULL);
    INSERT INTO record_ids_upto SELECT 1, coalesce(max(seq), 0) FROM records;
    DROP INDEX records_record_id;
    """,
    # 9: record times leave the hot table's indexes too. Out of order (senders' clocks and
    # batching scatter timestamps over minutes) every record of a group landed on its own page of
    # an index on ts: 7 us a record against 3 in time order, most of the gap between the two
    # (bench.mix, gateway CPU). ``record_times`` gets them in the same sorted batches as the ids,
    # and a listing by time reads it plus the records after ``record_ids_upto``
    # (``SQLiteStore.records``); a customer's records go by ``records_cdt`` as before.
    """
    CREATE TABLE record_times (
        ts INTEGER NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (ts, seq)) WITHOUT ROWID;
    INSERT INTO record_times SELECT ts, seq FROM records
        WHERE seq <= (SELECT seq FROM record_ids_upto) ORDER BY ts, seq;
    DROP INDEX records_ts;
    """,
    # 10: a customer's records by a series number. The index on (customer, dimension, ts) took
    # one B-tree page per series a group wrote to, each holding entries of some 40 bytes: 2.7 us
    # a record of the realistic mix's commits (6,000 series), 1.9 of 4.5 a remote-write sample.
    # ``series`` numbers each (customer, dimension) once, and the records' index on (series,
    # ts) holds entries of a few bytes, so a group dirties a fraction of the pages.
    """
    CREATE TABLE series (id INTEGER PRIMARY KEY, customer TEXT NOT NULL, dimension TEXT NOT NULL);
    CREATE UNIQUE INDEX series_pair ON series (customer, dimension);
    INSERT INTO series (customer, dimension)
        SELECT DISTINCT customer, dimension FROM records ORDER BY customer, dimension;
    ALTER TABLE records ADD COLUMN series INTEGER;
    UPDATE records SET series = (
        SELECT id FROM series s WHERE s.customer = records.customer
            AND s.dimension = records.dimension);
    CREATE INDEX records_series ON records (series, ts);
    DROP INDEX records_cdt;
    """,
    # 11: rollups are written behind the commits (SQLiteStore._flush_rollups): the rows hold
    # the records up to ``rollups_upto``, and the records after it are folded in again at open
    # (SQLiteStore._replay_rollups). Every commit had upserted each rollup row its records
    # touched (about one a record with 6,000 series): 20% of the realistic mix's rate.
    """
    CREATE TABLE rollups_upto (one INTEGER PRIMARY KEY CHECK (one = 1), seq INTEGER NOT NULL);
    INSERT INTO rollups_upto SELECT 1, coalesce(max(seq), 0) FROM records;
    """,
)

# Record ids and times are indexed (``record_ids``, ``record_times``) once this many committed
# records are not yet, in one sorted batch of at most _IDS_CHUNK: the records an id lookup or a
# listing by time scans by seq stay few.
_IDS_BATCH = 50_000
_IDS_CHUNK = 200_000
# Page caches are memory of the process, per connection: the writer's holds the hot edges of
# the tables and indexes it writes; prepare's and each reader thread's (the API's thread pool
# has dozens) read through the OS page cache instead of keeping a copy each. The writer's 32 MB
# cost nothing against 64 in bench.mix (40 vs 41-44 us/record gateway CPU, alternating runs at
# 300k records) and took 33 MB off the peak RSS.
_WRITER_CACHE_KIB = 32 * 1024
_READER_CACHE_KIB = 4 * 1024
# Rollup rows a merge reads per query (3 parameters each, under SQLite's 32,766).
_ROLLUP_READ_BATCH = 500
# Rollup keys folded since the last flush are written once this many are waiting, or once the
# oldest has waited this long, after a commit (a read that needs them writes them first).
_ROLLUP_FLUSH_ROWS = 20_000
_ROLLUP_FLUSH_S = 2.0
# Records a replay (``_replay_rollups``) reads per query.
_REPLAY_CHUNK = 50_000

_RECORD_ID = attrgetter("record_id")
_CUSTOMER = attrgetter("customer_id")
_DIMENSION = attrgetter("dimension_id")
# Series numbers kept in memory (about 200 bytes each); past this they are read again.
_MAX_SERIES_REMEMBERED = 500_000
_METADATA = attrgetter("metadata")
# (series, metadata id) pairs whose text is kept (about 150 bytes each); past this, formatted
# again (a remote-write group's records have a metadata id each: one per Prometheus series).
_ID_PIECES_REMEMBERED = 100_000
_SOURCE = attrgetter("source")

# A group's writes as one statement: an INSERT into a TEMP view (per connection) whose trigger
# inserts the group's records, dedup keys, rollups and receiver state from JSON arrays
# (store.sqlite_layout: the rows' layouts by name, and the SQL generated from them). In
# autocommit mode that statement is its own transaction, fsync included, so applying a group
# releases and retakes the GIL once, not once per statement: with receiver threads busy, every
# retake waits up to the interpreter's switch interval (5 ms) for its turn.
# A record's metadata: its own, or its series' shared one.
_META = "coalesce(r.metadata, (SELECT body FROM metadata WHERE id = r.meta_id))"
# The records of one (customer, dimension): bound to the two (migration 10).
_SERIES = "series = (SELECT id FROM series WHERE customer = ? AND dimension = ?)"
# Metadata digests a prepare looks up per query.
_META_READ_BATCH = 500
_UNKNOWN = object()  # a record's shared metadata not remembered by its object (_metadata_ids)


class _SharedMetadata:
    """Ids of the shared series metadata of one group: remembered ones (committed or in a
    group still in flight), else found in the database, else new (inserted with the group)."""

    MAX_REMEMBERED = 200_000

    def __init__(self, store: SQLiteStore, p: _Prepared) -> None:
        self.store = store
        self.p = p
        self.objs = [store._meta_objs, *(g.meta_objs for g in store._inflight), p.meta_objs]
        self.ids = [store._meta_ids, *(g.meta_ids for g in store._inflight), p.meta_ids]
        self.looked: set[bytes] = set()  # digests ``read`` looked up in the database
        self.stored: dict[bytes, int] = {}  # and those it found there
        self.encoded: dict[int, tuple[bytes, bytes]] = {}  # id(m) → (body, digest)

    def _remembered(self, m: SeriesMetadata) -> int | None:
        for objs in self.objs:
            hit = objs.get(id(m))
            if hit is not None and hit[0] is m:
                return hit[1]
        return None

    def _encoded(self, m: SeriesMetadata) -> tuple[bytes, bytes]:
        got = self.encoded.get(id(m))
        if got is None:
            body = encode_metadata(m)
            got = self.encoded[id(m)] = (body, hashlib.blake2b(body, digest_size=16).digest())
        return got

    def read(self, metas: Sequence[SeriesMetadata]) -> None:
        """Look the digests of ``metas`` up in the database in a few queries, not one each (a
        new sender's first request brings thousands of series)."""
        wanted: dict[bytes, None] = {}
        for m in metas:
            if self._remembered(m) is None:
                digest = self._encoded(m)[1]
                if not any(digest in i for i in self.ids):
                    wanted[digest] = None
        keys = list(wanted)
        self.looked.update(keys)
        for i in range(0, len(keys), _META_READ_BATCH):
            chunk = keys[i : i + _META_READ_BATCH]
            marks = ",".join("?" * len(chunk))
            for digest, mid in self.store._prep.execute(
                f"SELECT digest, id FROM metadata WHERE digest IN ({marks})", chunk
            ):
                self.stored[bytes(digest)] = int(mid)

    def id_of(self, m: SeriesMetadata) -> int:
        mid = self._remembered(m)
        if mid is not None:
            return mid
        body, digest = self._encoded(m)
        p = self.p
        mid = next((i[digest] for i in self.ids if digest in i), None)
        if mid is None:
            mid = self.stored.get(digest)
            if mid is None and digest not in self.looked:
                row = self.store._prep.execute(
                    "SELECT id FROM metadata WHERE digest = ?", (digest,)
                ).fetchone()
                mid = None if row is None else int(row[0])
            if mid is None:
                mid = p.next_meta
                p.next_meta += 1
                p.meta_new.append((mid, digest, body))
        p.meta_ids[digest] = mid
        p.meta_objs[id(m)] = (m, mid)
        return mid


@dataclass(eq=False)
class _Prepared:
    """One group, ready for its transaction (see ``SQLiteStore.prepare``)."""

    epoch: int
    now_ns: int
    number: int  # groups are applied in this order
    committed: bool = False  # by ``apply``; ``_fold`` moves memory past it
    now_s: int = 0
    next_seq: int = 0
    next_rejected: int = 0
    next_meta: int = 0
    records_json: bytes | None = None  # rows as sqlite_layout.APPLY_TRIGGER reads them
    times: bytes | None = None  # and their times and ids (sqlite_layout.record_rows)
    times_at: int = 0
    ids: bytes | None = None
    first_seq: int = 0
    has_ids: bool = False  # some record has an id (for record_ids)
    full: bool = False  # rows carry record id and metadata
    source: str | None = None  # every row's, when they share one (else each row says)
    fresh: list[bytes] = field(default_factory=list)
    fresh_set: set[bytes] = field(default_factory=set)
    # the group's new records and their values, folded into the rollups once committed
    folded: tuple[Sequence[Bucketed], Sequence[Decimal]] = ((), ())
    distinct: set[tuple[str, str, int, str]] = field(default_factory=set)
    rejected: list[tuple[Any, ...]] = field(default_factory=list)
    state: dict[str, bytes | None] = field(default_factory=dict)
    meta_new: list[tuple[int, bytes, bytes]] = field(default_factory=list)
    next_series: int = 0
    series_new: list[tuple[int, str, str]] = field(default_factory=list)
    series_ids: dict[tuple[str, str], int] = field(default_factory=dict)
    meta_ids: dict[bytes, int] = field(default_factory=dict)
    meta_objs: dict[int, tuple[SeriesMetadata, int]] = field(default_factory=dict)
    results: list[CommitResult] = field(default_factory=list)
    params: ApplyParams | None = None  # of APPLY; set by _prepare
    state_binary: list[tuple[str, bytes]] = field(default_factory=list)  # not JSON text
    # Set once ``apply`` is done with the group (committed or not), or when a failure voids
    # it: what a cancellation waits for before it writes (``_quiet``).
    settled: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.now_s = self.now_ns // NS


def _row_layout(records: Sequence[UsageRecord]) -> tuple[bool, bool, str | None]:
    """Whether some record of a group has an id, whether its rows need record ids and metadata
    of their own, and the one source they share (None: each row says); see
    sqlite_layout.RECORD_WIDE."""
    has_ids = full = list(map(_RECORD_ID, records)).count(None) != len(records)
    if not full:
        metas = list(map(_METADATA, records))
        if not {type(m) for m in metas} <= {SeriesMetadata, type(None)}:
            full = any(m and type(m) is not SeriesMetadata for m in metas)
    sources = set(map(_SOURCE, records))
    return has_ids, full, sources.pop().value if len(sources) == 1 else None


def _refuse_nul(records: Sequence[UsageRecord]) -> None:
    """Raise ``Unstorable`` if a record's text column holds U+0000 (read back, SQLite text ends
    there: distinct ids would come back as one)."""
    for r in records:
        reason = unstorable_reason(r)
        if reason is not None and "U+0000" in reason[1]:
            raise Unstorable(reason[1])


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


class SQLiteStore(SqlBilling):
    """The embedded store: ``Store`` on one SQLite file owned by this process. Its ingest and
    usage path is its own; catalog, billing and leases are ``SqlBilling`` over ``SqliteDialect``."""

    def __init__(
        self, path: str, dedup_window_s: int, now_ns: int, rollup_cache_size: int = 50_000
    ) -> None:
        self.path = path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(f"{path}.lock", "a+b")  # noqa: SIM115 - held for the store's life
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise StoreLockedError(f"{path} is in use by another meter-gateway process") from None
        self._conn = self._connect(_WRITER_CACHE_KIB)
        self._migrate()
        self._conn.execute(APPLY_VIEW)
        self._conn.execute(APPLY_TRIGGER)
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._local = threading.local()
        # Rollups are written behind the commits: ``_dirty`` holds the partials of the groups
        # committed since the last flush (``rollup_partials``' layout, one list per key, each
        # record added in place by ``_fold_records``), ``_cache`` rows as written (about 700
        # bytes each: the keys being written are the current hours of the series sending; a
        # miss is read in a batch of 500).
        # ``_merged_upto`` is the seq up to which ``_dirty`` and the rows hold the records
        # (the database's rows hold them up to ``rollups_upto``; all, once ``_dirty`` is
        # empty: every record leaves a partial). All under
        # ``_conn_lock``, which also serializes the writer connection: a group's commit and its
        # fold happen under one hold, so a flush never writes rows behind the records a read
        # can see.
        self._conn_lock = threading.Lock()
        self._dirty: dict[RollupKey, list[Any]] = {}
        self._dirty_since = 0.0  # monotonic time of the oldest row in _dirty
        self._cache: dict[RollupKey, RollupRow] = {}
        self._cache_size = rollup_cache_size
        # A cancelled record's seq is never given again (the audit list keeps it).
        row = self._conn.execute(
            "SELECT max(coalesce((SELECT max(seq) FROM records), 0), "
            "coalesce((SELECT max(record_seq) FROM cancelled_records), 0))"
        ).fetchone()
        self._next_seq = int(row[0]) + 1
        row = self._conn.execute("SELECT coalesce(max(seq), 0) FROM rejected").fetchone()
        self._next_rejected = int(row[0]) + 1
        row = self._conn.execute("SELECT coalesce(max(id), 0) FROM metadata").fetchone()
        self._next_meta = int(row[0]) + 1
        # Shared series metadata already stored: by digest, and by the object itself (the
        # receivers hand the same SeriesMetadata object for every point of a series).
        self._meta_ids: dict[bytes, int] = {}
        self._meta_objs: dict[int, tuple[SeriesMetadata, int]] = {}
        # Series numbers (migration 10) committed and remembered (a miss is read, or numbered
        # anew with its group).
        self._series: dict[tuple[str, str], int] = {}
        # The text of (series, metadata id) pairs in a group's rows (sqlite_layout.record_rows).
        self._id_pieces: dict[tuple[int, int | None], bytes] = {}
        row = self._conn.execute("SELECT coalesce(max(id), 0) FROM series").fetchone()
        self._next_series = int(row[0]) + 1
        # Groups prepared but not committed yet, oldest first; an epoch voids them on failure.
        self._inflight: deque[_Prepared] = deque()
        self._state_mem: dict[str, bytes | None] = {}  # receiver state committed since open
        self._epoch = 0
        self._reread_schema = False  # before the next apply: one failed
        self._next_number = 0  # of the next group prepared
        self._next_apply = 0  # of the next group to apply
        self._mem = threading.RLock()  # in-memory views: caches, counters, dedup index
        self._dialect = SqliteDialect(self._reader)
        row = self._conn.execute("SELECT seq FROM record_ids_upto").fetchone()
        self._ids_upto = int(row[0])
        # The last record of a committed group with record ids (at open: any after the mark):
        # a span of records without ids is not scanned for them.
        self._ids_last = self._next_seq - 1
        self._prep = self._connect()  # prepare's reads: committed data only
        row = self._conn.execute("SELECT seq FROM rollups_upto").fetchone()
        self._merged_upto = int(row[0])
        self._replay_rollups()  # records committed after the last flush (a crash)...
        self._flush_rollups()  # ...written at once, so another crash does not replay them
        self.dedup = DedupIndex(dedup_window_s)
        self._load_dedup(now_ns // NS)
        self._last_purge_s = self._compacted_s = now_ns // NS

    # --- connections and schema --------------------------------------------------------------

    def _connect(self, cache_kib: int = _READER_CACHE_KIB) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsynced at every commit, so a 2xx survives power loss.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA cache_size=-{cache_kib}")
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
        # A connection of its own with a small page cache: the keys are read once, and through
        # the writer's connection their pages would stay in its cache (up to 128 MB) for nothing.
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        try:
            conn.execute("PRAGMA cache_size=-2048")
            cur = conn.execute(
                "SELECT keys, seen_s FROM dedup_log WHERE seen_s >= ? ORDER BY seq",
                (now_s - self.dedup.window_s,),
            )
            self.dedup.load((k, int(s)) for k, s in cur)
        finally:
            conn.close()

    def close(self) -> None:
        try:
            self._settle_rollups()
        except sqlite3.Error:  # the records are durable: the next open replays them
            log.exception("writing rollups at close failed; they are rebuilt at the next open")
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        self._prep.close()
        self._conn.close()
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()

    # --- commit ------------------------------------------------------------------------------

    def commit(self, batches: Sequence[Batch], now_ns: int) -> list[CommitResult]:
        results = self.apply(self.prepare(batches, now_ns))
        self.write_behind()
        return results

    def prepare(self, batches: Sequence[Batch], now_ns: int) -> _Prepared:
        """Everything of a commit but the transaction: dedup decisions, rows, merged rollups.

        Groups prepared but not applied yet count as committed for the next ``prepare`` (their
        keys, rollups, metadata and state are looked up in ``_inflight`` first), so the writer
        can prepare one group while the previous one is in SQLite. Nothing in memory moves
        until ``apply`` has committed a group; then the next ``prepare`` moves it (``_fold``).
        A failed ``apply`` voids every group still in flight.

        A failed ``prepare`` leaves nothing behind: the group is not in flight and the next one
        takes its place. It raises ``Unstorable`` when a record cannot be encoded (the caller
        splits the group); the ``sqlite3`` errors of its reads are the store's own.
        """
        with self._mem:
            self._fold()
            try:
                return self._prepare(batches, now_ns)
            except (ValueError, TypeError, OverflowError, ArithmeticError, RecursionError) as exc:
                # orjson.JSONEncodeError is a TypeError: metadata too deep, surrogates, ...
                raise Unstorable(f"a record cannot be encoded: {exc}") from exc

    def _prepare(self, batches: Sequence[Batch], now_ns: int) -> _Prepared:
        inflight = self._inflight
        p = _Prepared(self._epoch, now_ns, self._next_number)
        last = inflight[-1] if inflight else None
        p.next_seq = last.next_seq if last else self._next_seq
        p.next_rejected = last.next_rejected if last else self._next_rejected
        p.next_meta = last.next_meta if last else self._next_meta
        p.next_series = last.next_series if last else self._next_series
        conflicts = self._state_conflicts(batches) if any(b.state_expect for b in batches) else ()
        if conflicts:
            batches = [b for i, b in enumerate(batches) if i not in conflicts]

        now_s = p.now_s
        flat: list[UsageRecord] = [r for b in batches for r in b.records]
        keys = [r.dedup_key for r in flat]
        keyed = [k for k in keys if k is not None]
        seen = self.dedup.contains(keyed, now_s)
        pending = [g.fresh_set for g in inflight]
        new_flags: list[bool] | None = None
        if (
            not any(seen)
            and len(set(keyed)) == len(keyed)
            and not any(not s.isdisjoint(keyed) for s in pending)
        ):
            fresh = keyed  # the common case: every record new (a record without a key is)
        else:
            fresh, new_flags = [], []
            in_group: set[bytes] = set()
            flags = iter(seen)
            for k in keys:
                if k is None:
                    new_flags.append(True)
                    continue
                dup = next(flags) or k in in_group or any(k in s for s in pending)
                new_flags.append(not dup)
                if not dup:
                    in_group.add(k)
                    fresh.append(k)
        p.fresh = fresh
        p.fresh_set = set(fresh)

        records = flat if new_flags is None else list(compress(flat, new_flags))
        p.first_seq = p.next_seq
        p.next_seq += len(records)
        p.has_ids, p.full, p.source = _row_layout(records)
        meta_ids = self._metadata_ids(p, records)
        series = self._series_ids(p, records)
        if p.series_new and b"\\u0000" in orjson.dumps(p.series_new):  # (and surrogates raise)
            _refuse_nul(records)  # a record's customer and dimension are its series row's
        values = [r.value for r in records]
        if records:
            p.records_json, p.times, p.times_at, p.ids = record_rows(
                records,
                list(map(str, values)),
                meta_ids,
                series,
                p.full,
                p.source is not None,
                self._id_pieces,
            )
            if len(self._id_pieces) > _ID_PIECES_REMEMBERED:
                self._id_pieces.clear()
            # SQLite would cut text at a NUL; a backslash (memchr) is rare in rows, so the
            # search for the escape runs only where JSON escaped something
            if b"\\" in p.records_json and b"\\u0000" in p.records_json:
                _refuse_nul(records)
        p.folded = (records, values)
        p.distinct.update(
            (r.customer_id, r.dimension_id, r.timestamp_ns - r.timestamp_ns % BUCKET_NS, u)
            for r in records
            if (u := r.unique_value) is not None
        )

        rseq = p.next_rejected
        for b in batches:
            for e in b.errors:
                p.rejected.append(
                    (
                        rseq,
                        now_ns,
                        b.source.value,
                        e.reason.value,
                        printable_text(e.field),
                        printable_text(e.error),
                        printable_text(e.raw),
                    )
                )
                rseq += 1
        p.next_rejected = rseq
        for b in batches:
            p.state.update(b.state)

        flag_iter = iter(new_flags) if new_flags is not None else None
        results: list[CommitResult] = []
        for b in batches:
            n = len(b.records)
            accepted = n if flag_iter is None else sum(islice(flag_iter, n))
            results.append(CommitResult(accepted, n - accepted, len(b.errors)))
        if conflicts:
            done = iter(results)
            n_all = len(results) + len(conflicts)
            results = [
                CommitResult(0, 0, 0, conflict=True) if i in conflicts else next(done)
                for i in range(n_all)
            ]
        p.results = results
        state = p.state
        text = state_rows(state)
        p.state_binary = [(k, v) for k, v in state.items() if v is not None and not v.isascii()]
        gone = [k for k, v in state.items() if v is None]
        p.params = ApplyParams(
            records=p.records_json,
            times=p.times,
            times_at=p.times_at,
            ids=p.ids,
            first_seq=p.first_seq,
            received_ns=p.now_ns,
            full=p.full,
            source=p.source,
            seen_s=p.now_s,
            dedup_keys=b"".join(p.fresh) if p.fresh else None,
            rollups=None,  # folded after the commit, written behind it (_flush_rollups)
            distinct_values=orjson.dumps(sorted(p.distinct)) if p.distinct else None,
            state=orjson.dumps(text) if text else None,
            gone=orjson.dumps(gone) if gone else None,
        )
        # Last: a prepare that failed before this point left no trace.
        self._next_number += 1
        inflight.append(p)
        return p

    def _metadata_ids(self, p: _Prepared, records: Sequence[UsageRecord]) -> list[int | None]:
        """Each record's shared metadata id (None: it has none, or its own)."""
        metas = list(map(_METADATA, records))
        # The usual case, one pass: series seen before, found by the id of their metadata
        # object. Metadata not found so (_UNKNOWN) is looked up in batches, then numbered.
        hits = map(self._meta_objs.get, map(id, metas))
        ids: list[Any] = [
            hit[1]
            if hit is not None and hit[0] is m
            else (_UNKNOWN if type(m) is SeriesMetadata else None)
            for m, hit in zip(metas, hits, strict=True)
        ]
        if _UNKNOWN in ids:
            shared = _SharedMetadata(self, p)
            shared.read([m for m, i in zip(metas, ids, strict=True) if i is _UNKNOWN])
            ids = [shared.id_of(m) if i is _UNKNOWN else i for m, i in zip(metas, ids, strict=True)]
        return ids

    def _series_ids(self, p: _Prepared, records: Sequence[UsageRecord]) -> list[int]:
        """Each record's series number: remembered, in a group still in flight, stored, or
        numbered anew with ``p``."""
        pairs = list(zip(map(_CUSTOMER, records), map(_DIMENSION, records), strict=True))
        ids: list[int | None] = list(map(self._series.get, pairs))
        if None not in ids:  # the usual group: every series seen before
            return ids  # type: ignore[return-value]
        groups = [g.series_ids for g in reversed(self._inflight)]
        mine = p.series_ids
        for i, pair in enumerate(pairs):
            if ids[i] is not None:
                continue
            sid = mine.get(pair)
            if sid is None:
                sid = next((g[pair] for g in groups if pair in g), None)
            if sid is None:
                row = self._prep.execute(
                    "SELECT id FROM series WHERE customer = ? AND dimension = ?", pair
                ).fetchone()
                if row is not None:
                    sid = int(row[0])
                else:
                    sid = p.next_series
                    p.next_series += 1
                    p.series_new.append((sid, *pair))
            mine[pair] = ids[i] = sid
        return ids  # type: ignore[return-value]

    def apply(self, p: _Prepared) -> list[CommitResult]:
        """Commit a prepared group (in ``prepare`` order), fsynced, and fold in its rollups.

        Only the transaction and the fold happen here, one statement for the usual group: the
        other in-memory views move at the next ``prepare`` (``_fold``), which meanwhile reads
        this group as one still in flight. So the applying thread goes from one commit to the
        next without waiting for a ``prepare`` to let go of ``_mem``. The folded rollups are
        written behind (``write_behind``).
        """
        try:
            return self._apply(p)
        finally:
            p.settled.set()

    def _apply(self, p: _Prepared) -> list[CommitResult]:
        if p.epoch != self._epoch or p.number != self._next_apply:
            raise GroupVoided("an earlier group failed to commit; this one was void")
        failure: BaseException | None = None
        with self._conn_lock:
            try:
                self._write_group(p)
            except BaseException as exc:
                failure = exc
            else:
                p.committed = True
                self._next_apply += 1
                # Under the same hold as the commit: a flush never writes the rows without a
                # group whose records a read could already see. Only the fold: no row is read.
                self._merge_committed(p)
                if p.now_s - self._last_purge_s >= 600:
                    self._purge_dedup_log(p.now_s)
                if p.has_ids:
                    self._ids_last = p.next_seq - 1
                if p.next_seq - 1 - self._ids_upto >= _IDS_BATCH:
                    self._index_behind(p.next_seq - 1)
        if failure is not None:
            with self._mem:
                self._fold()  # groups committed before this one are kept
                self._epoch += 1
                self._next_apply = self._next_number
                for g in self._inflight:
                    g.settled.set()  # void: never applied
                self._inflight.clear()
            if isinstance(failure, sqlite3.DataError | ValueError | TypeError | OverflowError):
                # a value SQLite refuses (too big, not encodable): the group's, not an outage
                raise Unstorable(f"SQLite refused a value: {failure}") from failure
            self._reread_schema = True
            raise failure
        return p.results

    def _write_group(self, p: _Prepared) -> None:
        """The group's transaction (under ``_conn_lock``)."""
        params = p.params
        assert params is not None  # set by _prepare
        conn = self._conn
        if self._reread_schema:
            # After a failure: a statement that fails to compile (the schema changed under
            # it) never rereads the schema, so read it first, as the database is now.
            with suppress(sqlite3.Error):
                conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
                self._reread_schema = False
        if not (p.meta_new or p.series_new or p.rejected or p.state_binary):
            conn.execute(APPLY, params)  # the usual group: one statement, one transaction
            return
        with self._write_txn(conn):
            if p.meta_new:
                conn.executemany("INSERT INTO metadata VALUES (?, ?, ?)", p.meta_new)
            if p.series_new:
                conn.executemany("INSERT INTO series VALUES (?, ?, ?)", p.series_new)
            conn.execute(APPLY, params)
            if p.rejected:
                conn.executemany("INSERT INTO rejected VALUES (?,?,?,?,?,?,?)", p.rejected)
            if p.state_binary:
                conn.executemany(
                    "INSERT OR REPLACE INTO receiver_state VALUES (?, ?)", p.state_binary
                )

    # --- rollups, written behind the commits ---------------------------------------------------

    def _merge_committed(self, p: _Prepared) -> None:
        """Fold a committed group's records into ``_dirty`` (under ``_conn_lock``). No row is
        read or built here; that happens once a flush (``_flush_rollups``)."""
        records, values = p.folded
        if records:
            self._fold_records(records, values, range(p.first_seq, p.next_seq))
        self._merged_upto = max(self._merged_upto, p.next_seq - 1)

    def _fold_records(
        self, records: Sequence[Bucketed], values: Sequence[Decimal], seqs: Iterable[int]
    ) -> None:
        """``fold_records`` into ``_dirty``: each record added in place to its key's partial,
        in one pass. Computing a group's partials in ``prepare`` and adding them up key by key
        here had taken twice the GIL's time (3 against 1.5 us a record in bench.mix's groups,
        where most keys have one record a group)."""
        if not self._dirty:
            self._dirty_since = time.monotonic()
        fold_records(self._dirty, records, values, seqs)

    def _merge_rollups(self, acc: dict[RollupKey, list[Any]]) -> dict[RollupKey, RollupRow]:
        """``acc``'s partials merged with each key's row as written: cached, else the
        database's (read in batches: at every new hour, every series' key is new, and one
        query each cost more than the rest of the merge)."""
        cache_get = self._cache.get
        olds: dict[RollupKey, RollupRow | None] = {}
        missing: list[RollupKey] = []
        for key in acc:
            row = cache_get(key)
            if row is None:
                missing.append(key)
            olds[key] = row
        for i in range(0, len(missing), _ROLLUP_READ_BATCH):
            chunk = missing[i : i + _ROLLUP_READ_BATCH]
            marks = ",".join("(?,?,?)" for _ in chunk)
            for r in self._conn.execute(
                "SELECT customer, dimension, bucket, count, sum, min, max, last_ts, last_seq, "
                f"last_value, wsum FROM (VALUES {marks}) k CROSS JOIN rollups "
                "ON customer = k.column1 AND dimension = k.column2 AND bucket = k.column3",
                [x for key in chunk for x in key],
            ):
                olds[(r[0], r[1], r[2])] = _rollup(r[2], r[3:])
        out: dict[RollupKey, RollupRow] = {}
        for key, part in acc.items():
            old = olds[key]
            if old is not None:  # the row as written, then the partial's later records
                merged: list[Any] = [old.count, old.sum, old.min, old.max]
                merged += [old.last_ts, old.last_seq, old.last_value, old.wsum]
                _add_later(merged, part)
                part = merged
            out[key] = RollupRow(key[2], *part)
        return out

    def _replay_rollups(self) -> None:
        """At open: fold in the records after the mark, those a crash left unwritten."""
        last = self._merged_upto
        while True:
            rows = self._conn.execute(
                "SELECT seq, ts, customer, dimension, value FROM records WHERE seq > ? "
                "ORDER BY seq LIMIT ?",
                (last, _REPLAY_CHUNK),
            ).fetchall()
            if not rows:
                break
            records = [_Replayed(ts, c, d) for _, ts, c, d, _ in rows]
            values = [Decimal(v) for *_, v in rows]
            self._fold_records(records, values, [r[0] for r in rows])
            last = rows[-1][0]
        self._merged_upto = last

    def _flush_rollups(self) -> None:
        """Merge the partials folded since the last flush with the rows as written, write
        them and move the mark (under ``_conn_lock``). A failure (reading the rows, writing
        them) leaves the partials folded, for the next flush."""
        parts = self._dirty
        if not parts:
            return
        rows = self._merge_rollups(parts)
        with self._write_txn(self._conn):
            self._conn.execute(APPLY, _ROLLUPS_ONLY._replace(rollups=rollups_json(rows)))
            self._conn.execute("UPDATE rollups_upto SET seq = ?", (self._merged_upto,))
        self._dirty = {}
        if len(self._cache) + len(rows) > self._cache_size:
            self._cache.clear()
        self._cache.update(rows)

    def _settle_rollups(self) -> None:
        """Before a read of rollups: the database's rows hold every committed group that has
        been answered (each folded in before its ``apply`` returned)."""
        if not self._dirty:
            return
        with self._conn_lock:
            self._flush_rollups()

    def write_behind(self) -> None:
        """After a commit's answer (``Ingestor``): write the folded rollups once
        _ROLLUP_FLUSH_ROWS keys wait or the oldest has waited _ROLLUP_FLUSH_S. A failure is
        logged; the partials stay folded, and a read that needs them tries again."""
        if not self._dirty:
            return
        if (
            len(self._dirty) < _ROLLUP_FLUSH_ROWS
            and time.monotonic() - self._dirty_since < _ROLLUP_FLUSH_S
        ):
            return
        try:
            self._settle_rollups()
        except sqlite3.Error:
            log.exception("writing rollups failed; retrying after a later commit")

    def _index_behind(self, committed: int) -> None:
        """Add the ids and times of committed records after ``record_ids_upto`` to
        ``record_ids`` and ``record_times``, each sorted (neighbouring keys share B-tree pages),
        up to _IDS_CHUNK records per transaction. Like the purge, a failure is logged and
        retried after a later commit: until then lookups and listings scan a few more records."""
        upto = min(committed, self._ids_upto + _IDS_CHUNK)
        span = (self._ids_upto, upto)
        try:
            with self._write_txn(self._conn):
                if self._ids_last > self._ids_upto:
                    self._conn.execute(
                        "INSERT OR IGNORE INTO record_ids SELECT record_id, seq FROM records "
                        "WHERE seq > ? AND seq <= ? AND record_id IS NOT NULL "
                        "ORDER BY record_id, seq",
                        span,
                    )
                self._conn.execute(
                    "INSERT OR IGNORE INTO record_times SELECT ts, seq FROM records "
                    "WHERE seq > ? AND seq <= ? ORDER BY ts, seq",
                    span,
                )
                self._conn.execute("UPDATE record_ids_upto SET seq = ?", (upto,))
        except sqlite3.Error:
            log.exception("indexing record ids and times failed; retrying after the next commit")
            return
        self._ids_upto = upto

    def _purge_dedup_log(self, now_s: int) -> None:
        """Forget keys older than the dedup window; the index forgets the same ones at its
        next fold. A failure here is logged (the group did commit) and retried later."""
        try:
            with self._write_txn(self._conn):
                self._conn.execute(
                    "DELETE FROM dedup_log WHERE seen_s < ?", (now_s - self.dedup.window_s,)
                )
        except sqlite3.Error:
            log.exception("purging old dedup keys failed; retrying after the next commit")
            return
        self._last_purge_s = now_s

    def _fold(self) -> None:
        """Move the in-memory views past every committed group at the front of ``_inflight``
        (under ``_mem``)."""
        inflight = self._inflight
        while inflight and inflight[0].committed:
            p = inflight.popleft()
            self._next_seq, self._next_rejected = p.next_seq, p.next_rejected
            self._next_meta = p.next_meta
            self._next_series = p.next_series
            if p.series_ids:
                if len(self._series) + len(p.series_ids) > _MAX_SERIES_REMEMBERED:
                    self._series.clear()
                self._series.update(p.series_ids)
            if len(self._meta_objs) + len(p.meta_objs) > _SharedMetadata.MAX_REMEMBERED:
                self._meta_objs.clear()
                self._meta_ids.clear()
            self._meta_objs.update(p.meta_objs)
            self._meta_ids.update(p.meta_ids)
            self.dedup.add(p.fresh, p.now_s)
            if p.state:
                if len(self._state_mem) + len(p.state) > 500_000:
                    self._state_mem.clear()
                self._state_mem.update(p.state)
        if self._last_purge_s > self._compacted_s:
            self.dedup.compact(self._last_purge_s)
            self._compacted_s = self._last_purge_s

    def _state_conflicts(self, batches: Sequence[Batch]) -> set[int]:
        """Indexes of batches whose ``state_expect`` fails, batches applied in order."""
        keys = {k for b in batches for k in (*b.state_expect, *b.state)}
        # What this process committed is remembered (it is the only writer of state): only
        # keys it has not written since it opened the database are read.
        known = self._state_mem
        current: dict[str, bytes | None] = {k: known[k] for k in keys if k in known}
        unknown = sorted(keys - current.keys())
        current.update(dict.fromkeys(unknown))
        current.update(self._state_committed(unknown))
        for g in self._inflight:  # groups not committed yet will have written theirs first
            current.update((k, v) for k, v in g.state.items() if k in current)
        bad: set[int] = set()
        for i, b in enumerate(batches):
            if any(current.get(k) != v for k, v in b.state_expect.items()):
                bad.add(i)
            else:
                current.update(b.state)
        return bad

    # --- corrections ---------------------------------------------------------------------

    @contextmanager
    def _quiet(self) -> Iterator[None]:
        """Held while a write outside the ingest pipeline touches rollups: no group is in
        flight (each prepared one has been applied or voided) and none can be prepared until
        the block ends, so no group's rollups, folded before the write, overwrite it,
        and the rollup cache can be brought in step under ``_mem``. Waits without ``_mem``:
        a failing ``apply`` takes it to void the groups behind."""
        while True:
            with self._mem:
                self._fold()
                if not self._inflight:
                    self._settle_rollups()  # the rows a correction rebuilds are current
                    yield
                    return
                last = self._inflight[-1]
            last.settled.wait()

    def cancel_records(
        self,
        ids: Sequence[str],
        reason: str | None,
        now_ns: int,
        unique_keys: Mapping[str, str],
    ) -> list[CancelResult]:
        with self._quiet():
            with self._dialect.writing() as tx:
                results, touched = corrections.cancel(
                    tx, self._dialect, ids, reason, now_ns, unique_keys, _META
                )
            with self._conn_lock:
                for key in touched:  # rebuilt in the database: read again when next merged
                    self._cache.pop(key, None)
        return results

    def cancellations(self, after_seq: int | None, limit: int) -> list[CancelledRecord]:
        with self._dialect.reading() as tx:
            return corrections.cancelled_page(tx, after_seq, limit)

    # --- receiver state --------------------------------------------------------------------

    def _state_committed(self, keys: Sequence[str]) -> dict[str, bytes]:
        return self._state_rows(self._prep, keys)

    def state_get(self, keys: Sequence[str]) -> dict[str, bytes]:
        return self._state_rows(self._reader(), keys)

    def _state_rows(self, conn: sqlite3.Connection, keys: Sequence[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
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

    # --- reads -------------------------------------------------------------------------------

    def rollups(
        self, customer: str, dimension: str, from_bucket: int, to_bucket: int
    ) -> list[RollupRow]:
        self._settle_rollups()
        cur = self._reader().execute(
            "SELECT bucket, count, sum, min, max, last_ts, last_seq, last_value, wsum "
            "FROM rollups WHERE customer=? AND dimension=? AND bucket>=? AND bucket<? "
            "ORDER BY bucket",
            (customer, dimension, from_bucket, to_bucket),
        )
        return [_rollup(r[0], r[1:]) for r in cur]

    def rollup_column(
        self, customer: str, dimension: str, from_bucket: int, to_bucket: int, column: RollupColumn
    ) -> list[tuple[int, Any]]:
        if column not in ROLLUP_COLUMNS:
            raise ValueError(f"not a rollup column: {column!r}")
        self._settle_rollups()
        cur = self._reader().execute(
            f"SELECT bucket, {column} FROM rollups WHERE customer=? AND dimension=? "
            "AND bucket>=? AND bucket<? ORDER BY bucket",
            (customer, dimension, from_bucket, to_bucket),
        )
        if column == "count":
            return cur.fetchall()
        return [(b, Decimal(v)) for b, v in cur]

    def split_tail(
        self, customer: str, dimension: str, bucket: int, at: int, column: RollupColumn
    ) -> tuple[Any, list[Decimal]] | None:
        if column not in ROLLUP_COLUMNS:
            raise ValueError(f"not a rollup column: {column!r}")
        self._settle_rollups()
        # The cell holds the records up to the mark: the later ones are those it holds too
        # (a group committed since the flush is in neither).
        rows = (
            self._reader()
            .execute(
                f"SELECT 0, {column} FROM rollups WHERE customer=? AND dimension=? AND bucket=? "
                f"UNION ALL SELECT 1, value FROM records WHERE {_SERIES} AND ts>=? AND ts<? "
                "AND seq <= (SELECT seq FROM rollups_upto)",
                (customer, dimension, bucket, customer, dimension, at, bucket + BUCKET_NS),
            )
            .fetchall()
        )
        cell = [v for tag, v in rows if tag == 0]
        if not cell:
            return None
        later = [Decimal(v) for tag, v in rows if tag == 1]
        return (int(cell[0]) if column == "count" else Decimal(cell[0])), later

    def raw(
        self, customer: str, dimension: str, from_ns: int, to_ns: int, unique_key: str | None = None
    ) -> list[RawPoint]:
        cols = f"ts, seq, value, {_META}" if unique_key else "ts, seq, value, NULL"
        cur = self._reader().execute(
            f"SELECT {cols} FROM records r WHERE {_SERIES} AND ts>=? AND ts<? ORDER BY ts, seq",
            (customer, dimension, from_ns, to_ns),
        )
        return [
            RawPoint(ts, seq, Decimal(v), unique_of(read_metadata(m), unique_key) if m else None)
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
                f"SELECT ts, seq, value FROM records WHERE {_SERIES} AND ts<? "
                "ORDER BY ts DESC, seq DESC LIMIT 1",
                (customer, dimension, ts_ns),
            )
            .fetchone()
        )
        return None if row is None else RawPoint(row[0], row[1], Decimal(row[2]), None)

    def pairs(
        self, customer: str | None, dimension: str | None, before_ns: int
    ) -> list[tuple[str, str]]:
        self._settle_rollups()
        sql = "SELECT DISTINCT customer, dimension FROM rollups WHERE bucket < ?"
        args: list[Any] = [before_ns]
        sql += pair_filter(customer, dimension, args, "?")
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
        cols = (
            f"r.seq, r.ts, r.customer, r.dimension, r.value, r.record_id, {_META}, r.source, "
            "r.received_ns"
        )
        args: list[Any] = []

        def part(source: str, t: str, *conditions: str) -> str:
            """One SELECT over ``source`` in (ts, seq) order of its table ``t``, limited."""
            where = " AND ".join((*conditions, f"{t}.ts >= ?", f"{t}.ts < ?"))
            sql = f"SELECT {cols} FROM {source} WHERE {where}"
            args.extend((from_ns, to_ns))
            if customer is None:
                sql += pair_filter(customer, dimension, args, "?")
            elif dimension is None:
                sql += " AND r.series IN (SELECT id FROM series WHERE customer = ?)"
                args.append(customer)
            else:
                sql += f" AND r.{_SERIES}"
                args.extend((customer, dimension))
            if after is not None:
                sql += f" AND ({t}.ts, {t}.seq) > (?, ?)"
                args.extend(after)
            args.append(limit)
            return f"SELECT * FROM ({sql} ORDER BY {t}.ts, {t}.seq LIMIT ?)"

        if customer is not None:  # records_series holds a series' records in time order
            sql = part("records r", "r")
        else:  # the times indexed behind the commits, then the records not indexed yet
            indexed = part("record_times t JOIN records r ON r.seq = t.seq", "t")
            recent = part("records r", "r", "r.seq > (SELECT seq FROM record_ids_upto)")
            sql = f"{indexed} UNION ALL {recent} ORDER BY 2, 1 LIMIT ?"
            args.append(limit)
        return [
            StoredRecord(
                r[0],
                r[1],
                r[2],
                r[3],
                Decimal(r[4]),
                r[5],
                read_metadata(r[6]),
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


class _Replayed(NamedTuple):
    """What ``SQLiteStore._fold_records`` reads of a stored record."""

    timestamp_ns: int
    customer_id: str
    dimension_id: str


# APPLY's parameters for a flush: the rollup rows (set) and nothing else.
_ROLLUPS_ONLY = ApplyParams(None, None, 0, None, 0, 0, False, None, 0, None, None, None, None, None)


def _add_later(a: list[Any], b: Sequence[Any]) -> None:
    """Add partial ``b`` (``rollup_partials``' layout) into ``a`` in place; ``b``'s records
    all come after ``a``'s (higher seqs), so on a tie in time its last record is the last."""
    a[0] += b[0]
    a[1] = EXACT.add(a[1], b[1])
    if b[2] < a[2]:
        a[2] = b[2]
    if b[3] > a[3]:
        a[3] = b[3]
    if b[4] > a[4] or (b[4] == a[4] and b[5] > a[5]):
        a[4], a[5], a[6] = b[4], b[5], b[6]
    a[7] = EXACT.add(a[7], b[7])


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


class _SqliteTx:
    """``dialect.Tx`` on one SQLite connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def one(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        row: Row | None = self._conn.execute(sql, args).fetchone()
        return row

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return self._conn.execute(sql, args).fetchall()

    def run(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, args).rowcount

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._conn.executemany(sql, rows)

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        self._conn.execute("SAVEPOINT nested")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK TO nested")
            self._conn.execute("RELEASE nested")
            raise
        self._conn.execute("RELEASE nested")


class SqliteDialect:
    """``dialect.Dialect`` for SQLite: the calling thread's connection, ``BEGIN IMMEDIATE``
    write transactions (one writer: no row locks), decimals as exact text, and one owner (the
    lock file), so every lease is this process's and named locks are in-process locks."""

    single_owner = True
    for_update = ""
    for_share = ""
    series_match = _SERIES
    record_id_match = (
        "seq IN (SELECT seq FROM record_ids WHERE record_id = ? UNION ALL "
        "SELECT seq FROM records WHERE seq > (SELECT seq FROM record_ids_upto) "
        "AND record_id = ?)"
    )

    def __init__(self, connection: Callable[[], sqlite3.Connection]) -> None:
        self._connection = connection
        self._locks: dict[int, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    @contextmanager
    def reading(self) -> Iterator[_SqliteTx]:
        yield _SqliteTx(self._connection())

    @contextmanager
    def writing(self) -> Iterator[_SqliteTx]:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield _SqliteTx(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def exclusive(self, key: int) -> Iterator[None]:
        with self._locks_guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            yield

    def decimal(self, value: Decimal) -> str:
        return str(value)

    def text(self, value: str) -> str:
        return value

    def is_unique_violation(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError) and exc.sqlite_errorname in (
            "SQLITE_CONSTRAINT_PRIMARYKEY",
            "SQLITE_CONSTRAINT_UNIQUE",
        )
