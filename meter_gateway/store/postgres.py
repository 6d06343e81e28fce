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
(a deadlock or serialization failure is retried anyway). Bulk columns go as array literals
written in one join (psycopg dumps a list element by element in Python). Migrations are
versioned and run under an advisory lock, so replicas that start together migrate once.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from decimal import Decimal
from itertools import compress
from typing import Any, NamedTuple

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq
from psycopg.pq.abc import PGresult
from psycopg_pool import ConnectionPool

from meter_gateway.model import Batch, CommitResult, UsageRecord
from meter_gateway.store import corrections
from meter_gateway.store.base import (
    READ_SWEEP,
    ROLLUP_COLUMNS,
    CancelledRecord,
    CancelResult,
    RawPoint,
    RejectedRow,
    RollupColumn,
    RollupRow,
    StoredRecord,
    Unstorable,
    encode_metadata,
    pair_filter,
    printable_text,
    read_metadata,
    rollup_partials,
    unique_of,
)
from meter_gateway.store.billing import SqlBilling
from meter_gateway.store.dialect import Row, positional
from meter_gateway.timebuckets import BUCKET_NS

log = logging.getLogger(__name__)

NS = 1_000_000_000
# Advisory lock ids (pg_advisory_lock's bigint space is shared by everything on the database).
MIGRATION_LOCK = 0x6D67_0001  # "mg" 1
PURGE_LOCK = 0x6D67_0002
# 0x6D67_0003: store.billing.CATALOG_LOCK, held around one catalog change
STATE_LOCK_CLASS = 0x6D67  # pg_advisory_xact_lock(class, hashtext(key)) per receiver-state key
PURGE_EVERY_S = 600
PURGE_CHUNK = 50_000
COMMIT_ATTEMPTS = 5
# Record seqs one nextval('records_seq') reserves: the sequence's increment (migration 6). A
# later migration must not lower it while replicas that reserve this many still run.
SEQ_BLOCK = 1024
# After a group whose dedup keys could not be copied (a key was there already), this many
# commits of the store mark their keys with the upsert straight away (see _mark_keys).
DEDUP_COPY_PAUSE = 8

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
    # 4: the invoice lifecycle (SPEC 11): gapless numbers from one counter row (finalizing
    # replicas queue on it; a rolled-back finalization gives its number back), the period as
    # columns (one finalized numbered invoice per customer and period; a void one frees it),
    # void invoices, cycle-made invoices; answers recorded under Idempotency-Key headers
    """
    ALTER TABLE invoices ADD COLUMN number text COLLATE "C";
    ALTER TABLE invoices ADD COLUMN from_ns bigint;
    ALTER TABLE invoices ADD COLUMN to_ns bigint;
    ALTER TABLE invoices ADD COLUMN voided_ns bigint;
    ALTER TABLE invoices ADD COLUMN origin text NOT NULL DEFAULT 'api';
    CREATE UNIQUE INDEX invoices_number ON invoices (number);
    CREATE UNIQUE INDEX invoices_finalized_period ON invoices (customer, from_ns, to_ns)
        WHERE status = 'finalized' AND number IS NOT NULL;
    CREATE INDEX invoices_status ON invoices (status, created_ns, id);
    CREATE TABLE invoice_numbers (
        one boolean PRIMARY KEY DEFAULT true CHECK (one), last bigint NOT NULL);
    INSERT INTO invoice_numbers VALUES (true, 0);
    CREATE TABLE idempotency (
        path text COLLATE "C" NOT NULL, key text COLLATE "C" NOT NULL,
        fingerprint text NOT NULL, status int, media_type text, body bytea,
        created_ns bigint NOT NULL, PRIMARY KEY (path, key));
    CREATE INDEX idempotency_created ON idempotency (created_ns);
    """,
    # 5: usage corrections (SPEC 11): records cancelled by id leave ``records`` for this audit
    # list (store.corrections); ids are looked up, so they are indexed
    """
    CREATE TABLE cancelled_records (
        seq bigserial PRIMARY KEY, record_seq bigint NOT NULL,
        record_id text COLLATE "C" NOT NULL, ts bigint NOT NULL,
        customer text COLLATE "C" NOT NULL, dimension text COLLATE "C" NOT NULL,
        value numeric NOT NULL, metadata text, source text NOT NULL,
        received_ns bigint NOT NULL, cancelled_ns bigint NOT NULL, reason text);
    CREATE INDEX cancelled_records_id ON cancelled_records (record_id);
    CREATE INDEX records_record_id ON records (record_id) WHERE record_id IS NOT NULL;
    """,
    # 6: record seqs in blocks: one nextval reserves SEQ_BLOCK seqs for a commit (a nextval
    # per record cost the backend 0.34 us a record). Seqs are unique and rise within a commit
    # as before, with gaps; a replica still taking one nextval a record gets sparse seqs that
    # no block holds, so replicas of either version share the database.
    "ALTER SEQUENCE records_seq INCREMENT BY 1024",
    # 7: the dedup index on a 64-bit prefix of each key. Keys are random, so every new one
    # lands on an index page of its own, and the first write of a page after a checkpoint puts
    # the whole page in the WAL: with 10M ids in the window two thirds of the WAL a record. An
    # index of 8-byte integers is about half as many pages as one of 16-byte byteas (bench.mix,
    # PostgreSQL, 10M ids, 1.5M records: WAL 3,836 -> 1,761 bytes and full-page images 465 ->
    # 146 a 1,000 records, 38,778 -> 42,497 records/s). Adding the column rewrites the table
    # under an exclusive lock. The prefix is computed by the database (a generated column), so
    # an older replica's copy of (key, seen_s) still goes in; its upsert on the key does not
    # (no unique index on the key is left), so during a rolling upgrade its groups holding a
    # known key fail with a 5xx, which senders retry on another replica. A key whose prefix a
    # different live key holds (about one in 10^12 at 10M ids) is kept in ``dedup_collisions``
    # (PostgresStore._mark_keys); keys already colliding move there now.
    """
    ALTER TABLE dedup_keys ADD COLUMN prefix bigint
        GENERATED ALWAYS AS (('x' || encode(substr(key, 1, 8), 'hex'))::bit(64)::bigint) STORED;
    CREATE TABLE dedup_collisions (key bytea PRIMARY KEY, seen_s bigint NOT NULL);
    INSERT INTO dedup_collisions
        SELECT key, seen_s FROM (
            SELECT key, seen_s,
                row_number() OVER (PARTITION BY prefix ORDER BY seen_s DESC, key) AS n
            FROM dedup_keys) AS d
        WHERE n > 1;
    DELETE FROM dedup_keys d USING dedup_collisions c WHERE d.key = c.key;
    ALTER TABLE dedup_keys DROP CONSTRAINT dedup_keys_pkey;
    ALTER TABLE dedup_keys ADD PRIMARY KEY (prefix);
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

# Marking keys that are not all new (PostgresStore._mark_keys). A key's slot is its prefix
# (migration 7); a slot whose key is past the window (not yet purged) is taken over, and that
# key counts as new. Slots are locked by the upsert whether it takes them or not, so the keys
# they hold stay what _DEDUP_SLOTS reads until the transaction ends.
_PREFIX_OF_K = "('x' || encode(substr(k, 1, 8), 'hex'))::bit(64)::bigint"
_DEDUP_INSERT = """
INSERT INTO dedup_keys AS d (key, seen_s)
SELECT decode(k, 'hex'), %(now)s FROM unnest(string_to_array(%(keys)s, ',')) AS k
ON CONFLICT (prefix) DO UPDATE SET key = excluded.key, seen_s = excluded.seen_s
    WHERE d.seen_s < %(cutoff)s
RETURNING key
"""
# Of keys the upsert did not mark, the ones whose slot holds another key (collisions).
_DEDUP_SLOTS = f"""
SELECT c.k FROM (SELECT decode(h, 'hex') AS k FROM unnest(string_to_array(%(keys)s, ',')) AS h) c
JOIN dedup_keys d ON d.prefix = {_PREFIX_OF_K}
WHERE d.key <> c.k
"""
_COLLISIONS_INSERT = """
INSERT INTO dedup_collisions AS c (key, seen_s)
SELECT decode(k, 'hex'), %(now)s FROM unnest(string_to_array(%(keys)s, ',')) AS k
ON CONFLICT (key) DO UPDATE SET seen_s = excluded.seen_s WHERE c.seen_s < %(cutoff)s
RETURNING key
"""
_COLLISIONS_LIVE = """
SELECT key FROM dedup_collisions
WHERE key = ANY(SELECT decode(k, 'hex') FROM unnest(string_to_array(%(keys)s, ',')) AS k)
    AND seen_s >= %(cutoff)s
"""


class _Collided(Exception):
    """A copied key is a live collision's: the copy is rolled back (PostgresStore._mark_keys)."""


# Binary COPY framing (PostgreSQL's COPY BINARY: signature, flags, header extension; a row is
# its field count and each field's length and bytes; -1 ends the data).
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_COPY_TRAILER = b"\xff\xff"
_KEY_FIELD = struct.pack(">hi", 2, 16)  # two fields, the first 16 bytes long
_SEEN_FIELD = struct.pack(">i", 8)  # then an 8-byte bigint
_NULL = "\\N"  # NULL in COPY text


def _dedup_copy(keys: Sequence[bytes], now_s: int) -> bytes:
    """Rows (key, seen_s) of 16-byte keys as one COPY BINARY stream, joined in C."""
    tail = _SEEN_FIELD + struct.pack(">q", now_s)
    return b"".join(
        (_COPY_SIGNATURE, _KEY_FIELD, (tail + _KEY_FIELD).join(keys), tail, _COPY_TRAILER)
    )


def _copy_escape(s: str) -> str:
    """A text field of COPY text format (backslash, tab, newline and return escaped)."""
    return s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _records_copy(records: Sequence[UsageRecord], seqs: Sequence[int], now_ns: int) -> str:
    """Fresh records as the COPY text of ``records`` (seq, ts, customer, dimension, value,
    record_id, metadata, source, received_ns), written in one join: ``write_row`` dumps each
    field in Python (1.9 of the writer's 7.8 us a record). Usual fields need no escaping,
    which the counts of separators and backslashes (one per NULL) prove; otherwise every text
    field is escaped."""
    metas = [encode_metadata(r.metadata).decode() if r.metadata else None for r in records]
    # a None where the schema says NOT NULL goes as NULL, so PostgreSQL refuses it
    nulls = metas.count(None) + sum(
        (r.record_id is None) + (r.customer_id is None) + (r.dimension_id is None) for r in records
    )
    text = "".join(
        [
            f"{seq}\t{r.timestamp_ns}\t{_NULL if r.customer_id is None else r.customer_id}\t"
            f"{_NULL if r.dimension_id is None else r.dimension_id}\t{r.value}\t"
            f"{_NULL if r.record_id is None else r.record_id}\t{_NULL if m is None else m}\t"
            f"{r.source}\t{now_ns}\n"
            for r, seq, m in zip(records, seqs, metas, strict=True)
        ]
    )
    n = len(records)
    if (
        text.count("\\") == nulls
        and text.count("\t") == 8 * n
        and text.count("\n") == n
        and "\r" not in text
    ):
        return text
    e = _copy_escape
    return "".join(
        [
            f"{seq}\t{r.timestamp_ns}\t{_NULL if r.customer_id is None else e(r.customer_id)}\t"
            f"{_NULL if r.dimension_id is None else e(r.dimension_id)}\t{r.value}\t"
            f"{_NULL if r.record_id is None else e(r.record_id)}\t"
            f"{_NULL if m is None else e(m)}\t{r.source}\t{now_ns}\n"
            for r, seq, m in zip(records, seqs, metas, strict=True)
        ]
    )


# The reads rating runs per (customer, dimension) and range: thousands a period-gauge
# refresh. They go as named statements straight through libpq (PostgresStore._read):
# psycopg's cursor path costs 52-63 us of Python a call, this one 31-34 (and the backend
# 27-29 us instead of 31-36). Each read: (select list, table, range column, order).
_ROLLUP_FIELDS = "bucket, count, sum, min, max, last_ts, last_seq, last_value, wsum"
_READ_SPECS: dict[str, tuple[str, str, str, str]] = {
    "rollups": (_ROLLUP_FIELDS, "rollups", "bucket", "bucket"),
    **{f"rollup_{c}": (f"bucket, {c}", "rollups", "bucket", "bucket") for c in ROLLUP_COLUMNS},
    "distinct": ("bucket, value", "rollup_distinct", "bucket", ""),
    "raw": ("ts, seq, value", "records", "ts", "ts, seq"),
    "raw_metadata": ("ts, seq, value, metadata", "records", "ts", "ts, seq"),
}
_READS: dict[str, str] = {
    name: f"SELECT {cols} FROM {table} WHERE customer = $1 AND dimension = $2 "
    f"AND {at} >= $3 AND {at} < $4" + (f" ORDER BY {order}" if order else "")
    for name, (cols, table, at, order) in _READ_SPECS.items()
}
# The same reads for a block of customers of one dimension at once (a period sweep, see
# _Sweep): the customer last, rows grouped by customer, at most $5 of them.
_BULK_READS: dict[str, str] = {
    f"bulk_{name}": f"SELECT {cols}, customer FROM {table} WHERE customer = ANY($1::text[]) "
    f"AND dimension = $2 AND {at} >= $3 AND {at} < $4 "
    f"ORDER BY customer{', ' + order if order else ''} LIMIT $5"
    for name, (cols, table, at, order) in _READ_SPECS.items()
}
# A rollup column's cell of one bucket ($4) and the values of its records at or after $3, in one
# statement (one snapshot), tagged 0 and 1 (PostgresStore.split_tail); in a sweep, for a block
# of customers like the reads above (the customer last, grouped, at most $5 rows).
_TAIL = (
    "SELECT 0, {c}::text{also} FROM rollups WHERE customer {who} AND dimension = $2 "
    "AND bucket = $4 UNION ALL SELECT 1, value::text{also} FROM records WHERE customer {who} "
    f"AND dimension = $2 AND ts >= $3 AND ts < $4 + {BUCKET_NS}"
)
_TAIL_READS: dict[str, str] = {
    **{f"tail_{c}": _TAIL.format(c=c, also="", who="= $1") for c in ROLLUP_COLUMNS},
    **{
        f"bulk_tail_{c}": _TAIL.format(c=c, also=", customer", who="= ANY($1::text[])")
        + " ORDER BY customer LIMIT $5"
        for c in ROLLUP_COLUMNS
    },
}
_STATEMENTS = {**_READS, **_BULK_READS, **_TAIL_READS}
_READ_NAMES = {name: f"mg_{name}".encode() for name in _STATEMENTS}
# A sweep reads this many customers of a dimension in one statement, and at most this many
# rows (a block's result is held until the sweep moves past it).
SWEEP_CUSTOMERS = 200
SWEEP_ROWS = 50_000
_NO_SUCH_STATEMENT = b"26000"  # invalid_sql_statement_name


def _array(values: Sequence[int | Decimal]) -> str:
    """Numbers as one array literal (``'{1,2.5}'``), cast by the statement: psycopg dumps a
    list element by element in Python (4,000 decimals: 8.6 ms a round trip as a list, 1.9 as
    a literal; the rollup upsert of a commit sends nine such columns)."""
    return "{" + ",".join(map(str, values)) + "}"


def _text_array(values: Sequence[str]) -> str:
    """Strings as one array literal, each quoted (backslash and double quote escaped, which
    the usual ids need not be: one look at all of them instead of two replaces each)."""
    if not values:
        return "{}"
    joined = '","'.join(values)
    if "\\" in joined or joined.count('"') != 2 * (len(values) - 1):
        joined = '","'.join([v.replace("\\", "\\\\").replace('"', '\\"') for v in values])
    return '{"' + joined + '"}'


def _spans(res: PGresult, enc: str, customers: Sequence[str], limit: int) -> dict[str, range]:
    """Each customer's rows in a bulk read's result (grouped by customer, its last column),
    for the customers it holds all rows of: every one asked (none for some), unless the
    result reached ``limit`` rows, which may have cut the last customer and left out those
    after it (byte order: Python's order of code points)."""
    col, n = res.nfields - 1, res.ntuples
    spans: dict[str, range] = {}
    start, current = 0, None
    for i in range(n):
        c = res.get_value(i, col)
        if c != current:
            if current is not None:
                spans[current.decode(enc)] = range(start, i)
            start, current = i, c
    if current is not None:
        spans[current.decode(enc)] = range(start, n)
    covered: Sequence[str] = customers
    if n >= limit and current is not None:
        last = current.decode(enc)
        covered = [c for c in customers if c < last]
    empty = range(0)
    return {c: spans.get(c, empty) for c in covered}


class SchemaTooNewError(RuntimeError):
    """The database was migrated by a newer meter-gateway than this one."""


def _int(text: bytes | None) -> int:
    """A ``bigint`` of a text-format result (never NULL where it is read)."""
    return int(text or b"")


def _decimal(text: bytes | None) -> Decimal:
    """A ``numeric`` of a text-format result (never NULL where it is read)."""
    return Decimal((text or b"").decode())


def _text(s: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL; SQLite can. Keep the rest of the string."""
    if s is None or "\x00" not in s:
        return s
    return s.replace("\x00", "\ufffd")


class _Rows(NamedTuple):
    """Rows ``start`` to ``stop`` of a read's result (rows as text), in its client encoding."""

    res: PGresult
    enc: str
    start: int
    stop: int


class _Pairs:
    """The (customer, dimension) pairs with usage before one moment, as one query read them,
    indexed the two ways a sweep asks."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.all = pairs  # in the query's order: customer, then dimension (byte order)
        self.of_customer: dict[str, list[tuple[str, str]]] = {}
        customers: dict[str, list[str]] = {}
        for c, d in pairs:
            self.of_customer.setdefault(c, []).append((c, d))
            customers.setdefault(d, []).append(c)
        # byte order of UTF-8 is code point order: Python's, and COLLATE "C"'s
        self.customers = {d: sorted(cs) for d, cs in customers.items()}

    def select(self, customer: str | None, dimension: str | None) -> list[tuple[str, str]]:
        pairs = self.all if customer is None else self.of_customer.get(customer, [])
        return pairs if dimension is None else [p for p in pairs if p[1] == dimension]


class _Sweep:
    """What one period sweep (``store.base.READ_SWEEP``: the period gauges rating every
    customer) has read in bulk. Its first ``pairs()`` of all pairs is kept and answers the
    per-customer ones; a read of a pair among them reads that dimension for the next
    ``SWEEP_CUSTOMERS`` customers with usage of it, in one statement, and the following
    customers' reads of the same read, dimension and range are answered from that block
    (the latest block of each is kept). So a customer's rows are as of its block's read, as
    each single read was as of its own; a pair the block does not cover (no usage when the
    pairs were read, or past the rows a block may hold) is read alone."""

    def __init__(self) -> None:
        self.pairs: dict[int, _Pairs] = {}  # by before_ns
        self.latest: _Pairs | None = None
        # (read, dimension, lo, hi) -> the block's result and each customer's rows in it
        self.blocks: dict[tuple[str, str, int, int], tuple[PGresult, str, dict[str, range]]] = {}


class PostgresStore(SqlBilling):
    """``Store`` on PostgreSQL. Any number of processes may open the same database. Its ingest
    and usage path is its own; catalog, billing and leases are ``SqlBilling`` over
    ``PostgresDialect``."""

    #: Writers the ingestor runs (``pipeline.ingest``): commits lock in key order and the
    #: database decides dedup, seqs and state, exactly as between replicas, so more writers
    #: overlap one group's Python with other groups' transactions. bench.mix out of order,
    #: 300k records, alternating runs: 2 writers 37.0k/37.7k records/s, 3 42.2k/41.8k; then
    #: 3 40.7k/47.1k, 4 43.5k/48.3k. Three, so that five of the pool's eight connections stay
    #: for reads (the API, the period gauges, jobs).
    commit_threads = 3

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
        migrate(url, connect_timeout_s)
        self._pool = ConnectionPool(
            url,
            min_size=pool_min,
            max_size=pool_max,
            kwargs={"autocommit": True},
            open=False,
            name="meter-gateway",
        )
        self._pool.open(wait=True, timeout=connect_timeout_s)
        self._dialect = PostgresDialect(self._pool)
        self._last_purge_s = now_ns // NS
        self._purge_lock = threading.Lock()
        self._copy_pause = 0  # commits left that mark dedup keys by upsert (_mark_keys)

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
        fresh = self._mark_keys(conn, sorted(in_group), now_s) if in_group else set()
        new_flags = [
            first and (r.dedup_key is None or r.dedup_key in fresh)
            for r, first in zip(flat, firsts, strict=True)
        ]

        n_new = sum(new_flags)
        if n_new:
            cur.execute(
                "SELECT nextval('records_seq') FROM generate_series(1, %s)",
                (-(-n_new // SEQ_BLOCK),),
                prepare=True,
            )
            blocks = sorted(int(row[0]) for row in cur.fetchall())
            seqs = [s for b in blocks for s in range(b, b + SEQ_BLOCK)][:n_new]
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

    def _mark_keys(
        self, conn: psycopg.Connection[Any], keys: Sequence[bytes], now_s: int
    ) -> set[bytes]:
        """Mark the group's dedup keys (sorted) seen now; the ones that were not in the window.

        Usually none is there yet, and a plain ``COPY`` of them costs the database 40% less
        than the upsert (``ON CONFLICT`` inserts speculatively: a lock and a second WAL record
        a key; 6.9 vs 11.4 ms for 2,300 keys). Its unique index still decides: a key committed
        before, or by a replica committing it meanwhile (the copy waits for that transaction),
        fails the copy with a unique violation; then the copy is rolled back to its savepoint
        and ``_mark_slow`` marks the keys and says which are new. Retries come in runs, so
        after a failed copy the next ``DEDUP_COPY_PAUSE`` commits go to it straight away.

        The unique index is on a key's 64-bit prefix (migration 7), so a key whose prefix
        another key holds fails the copy too, and one kept in ``dedup_collisions`` would not:
        while that table has rows, a copy is checked against it before it stands."""
        cur = conn.cursor()
        cutoff = now_s - self.dedup_window_s
        if self._copy_pause > 0:
            self._copy_pause -= 1
        elif all(len(k) == 16 for k in keys):
            try:
                with conn.transaction():
                    with cur.copy("COPY dedup_keys (key, seen_s) FROM STDIN (FORMAT BINARY)") as cp:
                        cp.write(_dedup_copy(keys, now_s))
                    if self._collisions_live(cur, keys, cutoff):
                        raise _Collided
                return set(keys)
            except pg_errors.UniqueViolation:
                self._copy_pause = DEDUP_COPY_PAUSE
            except _Collided:
                pass
        return self._mark_slow(cur, keys, now_s, cutoff)

    @staticmethod
    def _collisions_live(
        cur: psycopg.Cursor[Any], keys: Sequence[bytes], cutoff: int
    ) -> set[bytes]:
        """Those of ``keys`` that ``dedup_collisions`` holds within the window (the table is
        empty but for keys sharing a prefix with another: one statement usually)."""
        row = cur.execute("SELECT EXISTS (SELECT 1 FROM dedup_collisions)").fetchone()
        if not (row and row[0]):
            return set()
        cur.execute(_COLLISIONS_LIVE, {"keys": ",".join([k.hex() for k in keys]), "cutoff": cutoff})
        return {bytes(r[0]) for r in cur.fetchall()}

    def _mark_slow(
        self, cur: psycopg.Cursor[Any], keys: Sequence[bytes], now_s: int, cutoff: int
    ) -> set[bytes]:
        """``_mark_keys`` by upsert: a key in ``dedup_collisions`` within the window is seen;
        the others take their prefix's slot if it is free or past the window, and a key whose
        slot holds another key within the window goes to ``dedup_collisions``. Keys sharing a
        prefix within the group go to the slot one at a time (an upsert may not touch a row
        twice), the others after it as collisions or repeats."""
        seen = self._collisions_live(cur, keys, cutoff)
        first: dict[bytes, bytes] = {}
        later: list[bytes] = []
        for k in keys:
            if k in seen:
                continue
            slot = k[:8].ljust(8, b"\0")
            if slot in first:
                later.append(k)
            else:
                first[slot] = k
        args = {"now": now_s, "cutoff": cutoff}
        cur.execute(_DEDUP_INSERT, {**args, "keys": ",".join([k.hex() for k in first.values()])})
        new = {bytes(row[0]) for row in cur.fetchall()}
        rest = [k for k in first.values() if k not in new] + later
        if rest:
            cur.execute(_DEDUP_SLOTS, {"keys": ",".join([k.hex() for k in rest])})
            collided = sorted(bytes(row[0]) for row in cur.fetchall())
            if collided:
                cur.execute(
                    _COLLISIONS_INSERT, {**args, "keys": ",".join([k.hex() for k in collided])}
                )
                new.update(bytes(row[0]) for row in cur.fetchall())
        return new

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
        # record ids are never altered: a NUL fails the commit (Unstorable), the record alone
        with cur.copy(
            "COPY records (seq, ts, customer, dimension, value, record_id, metadata, source, "
            "received_ns) FROM STDIN"
        ) as cp:
            cp.write(_records_copy(fresh, seqs, now_ns))
        acc = rollup_partials(fresh, [r.value for r in fresh], seqs)
        # Sorted, so that concurrent commits lock rollup rows in one order.
        keys = sorted(acc)
        parts = [acc[k] for k in keys]
        cols = [_text_array([k[0] for k in keys]), _text_array([k[1] for k in keys])]
        cols.append(_array([k[2] for k in keys]))
        cols.extend(_array([p[j] for p in parts]) for j in range(8))
        cur.execute(_ROLLUP_UPSERT, cols)
        if distinct:
            rows = sorted(distinct)
            cur.execute(
                "INSERT INTO rollup_distinct "
                "SELECT * FROM unnest(%s::text[], %s::text[], %s::int8[], %s::text[]) "
                "ON CONFLICT DO NOTHING",
                (
                    _text_array([r[0] for r in rows]),
                    _text_array([r[1] for r in rows]),
                    _array([r[2] for r in rows]),
                    _text_array([r[3] for r in rows]),
                ),
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
                    cur = conn.execute(
                        "DELETE FROM dedup_collisions WHERE seen_s < %s",
                        (now_s - self.dedup_window_s,),
                    )
                    deleted += cur.rowcount
                finally:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (PURGE_LOCK,))
        finally:
            self._purge_lock.release()
        return deleted

    # --- corrections ---------------------------------------------------------------------

    def cancel_records(
        self,
        ids: Sequence[str],
        reason: str | None,
        now_ns: int,
        unique_keys: Mapping[str, str],
    ) -> list[CancelResult]:
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            try:
                with self._dialect.writing() as tx:
                    results, _ = corrections.cancel(
                        tx, self._dialect, ids, reason, now_ns, unique_keys, "metadata"
                    )
                return results
            except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure):
                if attempt == COMMIT_ATTEMPTS:
                    raise
                log.warning("a cancellation hit a deadlock; retrying")
        raise AssertionError("unreachable")

    def cancellations(self, after_seq: int | None, limit: int) -> list[CancelledRecord]:
        with self._dialect.reading() as tx:
            return corrections.cancelled_page(tx, after_seq, limit)

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

    # --- reads -------------------------------------------------------------------------------

    def _sweep(self) -> _Sweep | None:
        scratch = READ_SWEEP.get()
        if scratch is None:
            return None
        sweep = scratch.get(self)
        if sweep is None:
            sweep = scratch[self] = _Sweep()
        assert isinstance(sweep, _Sweep)
        return sweep

    def _exec(self, name: str, args: Sequence[str | int]) -> tuple[PGresult, str]:
        """Run the named statement ``name`` (of ``_READS`` or ``_BULK_READS``), preparing it
        the first time a connection does not know it, which is also after psycopg
        deallocated everything a connection had prepared (it does after a ROLLBACK, to a
        savepoint too, or a DROP/ALTER). Its result (rows as text) and the client encoding."""
        with self._conn() as conn:
            pg, enc = conn.pgconn, conn.info.encoding
            params = [a.encode(enc) if isinstance(a, str) else b"%d" % a for a in args]
            res = pg.exec_prepared(_READ_NAMES[name], params)
            if (
                res.status != pq.ExecStatus.TUPLES_OK
                and res.error_field(pq.DiagnosticField.SQLSTATE) == _NO_SUCH_STATEMENT
            ):
                prepared = pg.prepare(_READ_NAMES[name], _STATEMENTS[name].encode())
                if prepared.status != pq.ExecStatus.COMMAND_OK:
                    raise pg_errors.error_from_result(prepared, enc)
                res = pg.exec_prepared(_READ_NAMES[name], params)
            if res.status != pq.ExecStatus.TUPLES_OK:
                raise pg_errors.error_from_result(res, enc)
        return res, enc

    def _read(self, name: str, customer: str, dimension: str, lo: int, hi: int) -> _Rows | None:
        """The rows of the read ``name`` (of ``_READS`` or ``_TAIL_READS``) for one (customer,
        dimension) and range: in a period sweep from its block when one covers them, else as a
        statement of their own. None, without asking, for a key with NUL: no stored key holds
        one (PostgreSQL text cannot), and libpq would cut a text parameter there."""
        if "\x00" in customer or "\x00" in dimension:
            return None
        sweep = self._sweep()
        if (
            sweep is not None
            and (rows := self._swept(sweep, name, customer, dimension, lo, hi)) is not None
        ):
            return rows
        res, enc = self._exec(name, (customer, dimension, lo, hi))
        return _Rows(res, enc, 0, res.ntuples)

    def _swept(
        self, sweep: _Sweep, name: str, customer: str, dimension: str, lo: int, hi: int
    ) -> _Rows | None:
        """A sweep's rows of one pair (see ``_Sweep``), reading the block that starts with it
        when no block of the sweep covers it; None when the pair is to be read alone."""
        key = (name, dimension, lo, hi)
        block = sweep.blocks.get(key)
        if block is None or customer not in block[2]:
            customers = sweep.latest.customers.get(dimension, []) if sweep.latest else []
            i = bisect_left(customers, customer)
            if i == len(customers) or customers[i] != customer:
                return None
            chunk = customers[i : i + SWEEP_CUSTOMERS]
            res, enc = self._exec(
                f"bulk_{name}", (_text_array(chunk), dimension, lo, hi, SWEEP_ROWS)
            )
            block = sweep.blocks[key] = (res, enc, _spans(res, enc, chunk, SWEEP_ROWS))
        res, enc, spans = block
        span = spans.get(customer)
        return None if span is None else _Rows(res, enc, span.start, span.stop)

    def rollups(
        self, customer: str, dimension: str, from_bucket: int, to_bucket: int
    ) -> list[RollupRow]:
        read = self._read("rollups", customer, dimension, from_bucket, to_bucket)
        if read is None:
            return []
        v = read.res.get_value
        return [
            RollupRow(
                _int(v(i, 0)),
                _int(v(i, 1)),
                _decimal(v(i, 2)),
                _decimal(v(i, 3)),
                _decimal(v(i, 4)),
                _int(v(i, 5)),
                _int(v(i, 6)),
                _decimal(v(i, 7)),
                _decimal(v(i, 8)),
            )
            for i in range(read.start, read.stop)
        ]

    def rollup_column(
        self, customer: str, dimension: str, from_bucket: int, to_bucket: int, column: RollupColumn
    ) -> list[tuple[int, Any]]:
        if column not in ROLLUP_COLUMNS:
            raise ValueError(f"not a rollup column: {column!r}")
        read = self._read(f"rollup_{column}", customer, dimension, from_bucket, to_bucket)
        if read is None:
            return []
        v = read.res.get_value
        load: Any = _int if column == "count" else _decimal
        return [(_int(v(i, 0)), load(v(i, 1))) for i in range(read.start, read.stop)]

    def split_tail(
        self, customer: str, dimension: str, bucket: int, at: int, column: RollupColumn
    ) -> tuple[Any, list[Decimal]] | None:
        if column not in ROLLUP_COLUMNS:
            raise ValueError(f"not a rollup column: {column!r}")
        read = self._read(f"tail_{column}", customer, dimension, at, bucket)
        if read is None:
            return None
        v = read.res.get_value
        cell: Any = None
        later: list[Decimal] = []
        for i in range(read.start, read.stop):
            if v(i, 0) == b"0":
                cell = _int(v(i, 1)) if column == "count" else _decimal(v(i, 1))
            else:
                later.append(_decimal(v(i, 1)))
        return None if cell is None else (cell, later)

    def raw(
        self, customer: str, dimension: str, from_ns: int, to_ns: int, unique_key: str | None = None
    ) -> list[RawPoint]:
        read = self._read(
            "raw_metadata" if unique_key else "raw", customer, dimension, from_ns, to_ns
        )
        if read is None:
            return []
        v = read.res.get_value
        if not unique_key:
            return [
                RawPoint(_int(v(i, 0)), _int(v(i, 1)), _decimal(v(i, 2)), None)
                for i in range(read.start, read.stop)
            ]
        out = []
        for i in range(read.start, read.stop):
            m = v(i, 3)
            out.append(
                RawPoint(
                    _int(v(i, 0)),
                    _int(v(i, 1)),
                    _decimal(v(i, 2)),
                    unique_of(read_metadata(m.decode(read.enc)), unique_key) if m else None,
                )
            )
        return out

    def distinct(
        self, customer: str, dimension: str, from_bucket: int, to_bucket: int
    ) -> list[tuple[int, str]]:
        read = self._read("distinct", customer, dimension, from_bucket, to_bucket)
        if read is None:
            return []
        v, enc = read.res.get_value, read.enc
        return [(_int(v(i, 0)), (v(i, 1) or b"").decode(enc)) for i in range(read.start, read.stop)]

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
        sweep = self._sweep()
        if sweep is not None and (known := sweep.pairs.get(before_ns)) is not None:
            return known.select(customer, dimension)
        sql = "SELECT DISTINCT customer, dimension FROM rollups WHERE bucket < %s"
        args: list[Any] = [before_ns]
        sql += pair_filter(customer, dimension, args, "%s")
        with self._conn() as conn:
            rows = conn.execute(sql + " ORDER BY 1, 2", args).fetchall()
        pairs = [(c, d) for c, d in rows]
        if sweep is not None and customer is None and dimension is None:
            sweep.pairs[before_ns] = sweep.latest = _Pairs(pairs)
        return pairs

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
        sql += pair_filter(customer, dimension, args, "%s")
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

    def stats(self) -> dict[str, int]:
        with self._conn() as conn:
            n = conn.execute("SELECT count(*) FROM records").fetchone()
            k = conn.execute(
                "SELECT (SELECT count(*) FROM dedup_keys) + (SELECT count(*) FROM dedup_collisions)"
            ).fetchone()
        return {"records": int(n[0]) if n else 0, "dedup_keys": int(k[0]) if k else 0}


def migrate(url: str, connect_timeout_s: float = 30.0) -> int:
    """Bring the schema up to date; replicas starting together migrate one after the other
    (a session advisory lock), and each migration commits with its version. The version.
    A host that drops packets fails after ``connect_timeout_s`` instead of the OS's minutes."""
    timeout = max(1, round(connect_timeout_s))
    with psycopg.connect(url, autocommit=True, connect_timeout=timeout) as conn:
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


class _PgTx:
    """``dialect.Tx`` on one pooled connection."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def one(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        return self._conn.execute(positional(sql), args).fetchone()

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return self._conn.execute(positional(sql), args).fetchall()

    def run(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self._conn.execute(positional(sql), args).rowcount

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._conn.cursor().executemany(positional(sql), rows)

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        with self._conn.transaction():
            yield


class PostgresDialect:
    """``dialect.Dialect`` for PostgreSQL: pooled autocommit connections, explicit
    transactions, ``FOR UPDATE``/``FOR SHARE`` row locks, advisory locks, ``numeric``
    decimals; several replicas share the database, so leases are real."""

    single_owner = False
    for_update = " FOR UPDATE"
    for_share = " FOR SHARE"
    record_id_match = "record_id = ?"
    series_match = "customer = ? AND dimension = ?"

    def __init__(self, pool: ConnectionPool[Any]) -> None:
        self._pool = pool

    @contextmanager
    def reading(self) -> Iterator[_PgTx]:
        with self._pool.connection() as conn:
            yield _PgTx(conn)

    @contextmanager
    def writing(self) -> Iterator[_PgTx]:
        with self._pool.connection() as conn, conn.transaction():
            yield _PgTx(conn)

    @contextmanager
    def exclusive(self, key: int) -> Iterator[None]:
        # A transaction lock: it goes with the transaction, whatever happens to the caller or
        # the connection; what the block writes goes on other connections meanwhile.
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
            yield

    def decimal(self, value: Decimal) -> Decimal:
        return value

    def text(self, value: str) -> str:
        return _text(value) or ""

    def is_unique_violation(self, exc: BaseException) -> bool:
        return isinstance(exc, pg_errors.UniqueViolation)
