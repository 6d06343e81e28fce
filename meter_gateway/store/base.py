"""The store's interfaces, by concern, and what every backend shares.

``IngestStore`` (one atomic commit for a group of batches, receiver state), ``UsageReader``
(the reads aggregation and listings need), ``CatalogStore``, ``BillingStore`` (invoices, wallet,
job state, outbox), ``IdempotencyStore`` (answers recorded under ``Idempotency-Key``),
``CorrectionStore`` (records cancelled by id) and ``LeaseStore`` (scheduled work on one
replica); ``Store`` is all of them.
Callers type against the narrow one they use. Implementations: ``sqlite.SQLiteStore`` (embedded
default) and ``postgres.PostgresStore``, each with its own ingest and usage path and both with
the one billing persistence of ``store.billing``.
Whatever the implementation, ``commit`` is all-or-nothing: records, their dedup keys, rollups and
rejected records land in one transaction, and dedup keys are marked only if that transaction
commits. A commit that fails because of what a record holds raises ``Unstorable`` (the committer
then finds the record and rejects it alone); any other failure is the store's own (an outage).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from decimal import Decimal, localcontext
from typing import Any, Literal, Protocol

import orjson

from meter_gateway.decimals import EXACT
from meter_gateway.model import Batch, CommitResult, UsageRecord
from meter_gateway.timebuckets import BUCKET_NS

RollupKey = tuple[str, str, int]  # (customer, dimension, bucket_ns)

# --- what a store can keep ---------------------------------------------------------------------
#
# orjson writes JSON nested at most ORJSON_MAX_DEPTH levels, and a raw page serves a record's
# metadata PAGE_NESTING levels down (``{"data": [{"metadata": ...}]}``): metadata nested deeper
# than MAX_METADATA_DEPTH could be stored but never listed. Stores refuse it while encoding:
# SQLite's rows nest it PAGE_NESTING levels down already, so orjson's own limit does it there;
# ``encode_metadata`` checks it for metadata encoded alone.
ORJSON_MAX_DEPTH = 254
PAGE_NESTING = 3
MAX_METADATA_DEPTH = ORJSON_MAX_DEPTH - PAGE_NESTING
# A record's metadata a store could not decode for a page is served as its stored text under
# this one key, instead of failing the page.
UNREADABLE_METADATA = "$unreadable"
_INT64 = 1 << 63


class Unstorable(Exception):
    """What a group holds cannot be written as given: a record the store cannot encode or the
    database refuses (metadata nested too deep, a string PostgreSQL cannot hold, a number out of
    the column's range), not a store outage. Nothing of the group was written; the committer
    splits it to find the record (``unstorable_reason``) and rejects that record alone."""


class GroupVoided(RuntimeError):
    """A prepared group that was never tried: an earlier group of the same pipeline failed, so
    this one was built on state that did not commit. Nothing of it was written; prepare it
    again."""


def encode_metadata(metadata: Mapping[str, Any]) -> bytes:
    """Metadata as the JSON a store keeps (numbers JSON cannot carry, Decimal, as exact text);
    ``Unstorable`` if a page could not list it. Nesting d levels takes at least 2d bytes, so
    only longer text is looked at, and walked only if its brackets could nest that deep."""
    body = orjson.dumps(metadata, default=str)
    if (
        len(body) > 2 * MAX_METADATA_DEPTH
        and body.count(b"{") + body.count(b"[") > MAX_METADATA_DEPTH
        and nesting_depth(metadata, MAX_METADATA_DEPTH) > MAX_METADATA_DEPTH
    ):
        raise Unstorable(f"metadata nests deeper than {MAX_METADATA_DEPTH} levels")
    return body


def unstorable_reason(r: UsageRecord) -> tuple[str, str] | None:
    """(field, error) when no store can keep ``r`` as it is, else None. Only the commit's
    failure path calls this: the happy path leaves such checks to the encoders themselves."""
    for name, text in (
        ("customerId", r.customer_id),
        ("dimensionId", r.dimension_id),
        ("id", r.record_id),
        ("metadata", r.unique_value),
    ):
        if text is None:
            continue
        if "\x00" in text:
            return name, f"{name} holds U+0000 (NUL), which the store cannot keep unaltered"
        if not _is_unicode(text):
            return name, f"{name} holds an unpaired surrogate: not valid Unicode text"
    if not r.value.is_finite():
        return "recordValue", f"recordValue {r.value} is not a finite number"
    if not -_INT64 <= r.timestamp_ns < _INT64:
        return "timestamp", "timestamp is outside the 64-bit nanosecond range"
    if r.metadata:
        if nesting_depth(r.metadata, MAX_METADATA_DEPTH) > MAX_METADATA_DEPTH:
            return (
                "metadata",
                f"metadata nests deeper than {MAX_METADATA_DEPTH} levels, which a page of "
                "records cannot carry",
            )
        try:
            orjson.dumps(r.metadata, default=str)
        except TypeError as exc:  # orjson.JSONEncodeError: surrogates, huge ints, odd keys
            return "metadata", f"metadata cannot be stored as JSON: {exc}"
    return None


def _is_unicode(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def nesting_depth(value: Any, limit: int) -> int:
    """How many dicts and lists deep ``value`` nests (a scalar: 0); stops counting past
    ``limit``, so it is safe on any depth."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            children: Any = v.values()
        elif isinstance(v, list | tuple):
            children = v
        else:
            continue
        depth += 1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        stack.extend((c, depth) for c in children)
    return deepest


def printable_text(text: str | None) -> str | None:
    """Text for the rejected store, which keeps what was wrong verbatim where it can: U+0000
    and unpaired surrogates (which no store can write) become backslash escapes."""
    if text is None or (text.isascii() and "\x00" not in text):
        return text
    text = text.replace("\x00", "\\u0000")
    return text if _is_unicode(text) else text.encode("utf-8", "backslashreplace").decode()


def read_metadata(stored: str | bytes | None) -> dict[str, Any] | None:
    """A record's metadata as stored, decoded for a page of records. Metadata no page can carry
    (stored before stores refused it: nested too deep, not JSON orjson reads, not an object)
    comes back as ``{UNREADABLE_METADATA: its stored text}`` rather than failing the page."""
    if not stored:
        return None
    try:
        value = orjson.loads(stored)
    except orjson.JSONDecodeError:
        value = None
    if isinstance(value, dict):
        raw = stored.encode() if isinstance(stored, str) else stored
        # Brackets in the text bound its depth: the exact walk only for a suspicious one.
        if raw.count(b"{") + raw.count(b"[") <= MAX_METADATA_DEPTH or (
            nesting_depth(value, MAX_METADATA_DEPTH) <= MAX_METADATA_DEPTH
        ):
            return value
    text = stored if isinstance(stored, str) else stored.decode("utf-8", "backslashreplace")
    return {UNREADABLE_METADATA: text}


def unique_of(metadata: dict[str, Any] | None, unique_key: str | None) -> str | None:
    """The distinct-count value of a record: its metadata[unique_key] as text."""
    if unique_key is None or not metadata or unique_key not in metadata:
        return None
    v = metadata[unique_key]
    return v if isinstance(v, str) else orjson.dumps(v).decode()


def pair_filter(customer: str | None, dimension: str | None, args: list[Any], mark: str) -> str:
    """SQL conditions for optional customer/dimension filters, their arguments appended to
    ``args``; ``mark`` is the driver's placeholder."""
    sql = ""
    for column, value in (("customer", customer), ("dimension", dimension)):
        if value is not None:
            sql += f" AND {column} = {mark}"
            args.append(value)
    return sql


RollupColumn = Literal["count", "sum", "min", "max"]
ROLLUP_COLUMNS: tuple[RollupColumn, ...] = ("count", "sum", "min", "max")


@dataclass(slots=True)
class RollupRow:
    """Partial aggregates of one (customer, dimension, UTC hour) bucket.

    ``wsum`` is Σ value × (bucket_end − timestamp) in value·nanoseconds: with it a window's
    time-weighted level integral follows from rollups alone (see aggregation.engine).

    Never changed once made (the SQLite store shares rows between its cache and the groups in
    flight); not ``frozen`` only because a frozen dataclass is built four times slower, and a
    commit builds one per key it touches.
    """

    bucket_ns: int
    count: int
    sum: Decimal
    min: Decimal
    max: Decimal
    last_ts: int
    last_seq: int
    last_value: Decimal
    wsum: Decimal


class Bucketed(Protocol):
    """What ``rollup_partials`` reads of a record: a ``UsageRecord``, or one read back."""

    @property
    def timestamp_ns(self) -> int: ...
    @property
    def customer_id(self) -> str: ...
    @property
    def dimension_id(self) -> str: ...


def rollup_partials(
    records: Sequence[Bucketed], values: Sequence[Decimal], seqs: Iterable[int]
) -> dict[RollupKey, list[Any]]:
    """A commit's new records per (customer, dimension, bucket): [count, sum, min, max, last
    ts, last seq, last value, wsum] (``RollupRow``'s fields), for a store to merge into its rows.
    ``fold_records`` into nothing."""
    out: dict[RollupKey, list[Any]] = {}
    fold_records(out, records, values, seqs)
    return out


def fold_records(
    into: dict[RollupKey, list[Any]],
    records: Sequence[Bucketed],
    values: Sequence[Decimal],
    seqs: Iterable[int],
) -> None:
    """Add each record to its key's partial in ``into`` (``rollup_partials``' layout), making
    the partial of a key ``into`` does not hold.

    ``values`` are the records' values and ``seqs`` their sequence numbers, rising in ingest
    order and after those of the records folded into ``into`` before. The record with the
    latest time is the last, the later one on a tie. Sums and products are exact. One pass, in
    place: most keys of a group have one record (1,000 customers × 6 dimensions), and grouping
    the records by key first, then summing each key's in C, cost 1.7 against 0.8-1.1 us a
    record there (the same, 0.9, with 40 records a key).
    """
    get = into.get
    with localcontext(EXACT):  # the sums and products below are exact
        for r, v, seq in zip(records, values, seqs, strict=True):
            t = r.timestamp_ns
            bucket = t - t % BUCKET_NS
            key = (r.customer_id, r.dimension_id, bucket)
            a = get(key)
            if a is None:
                into[key] = [1, v, v, v, t, seq, v, v * (bucket + BUCKET_NS - t)]
                continue
            a[0] += 1
            a[1] += v
            if v < a[2]:
                a[2] = v
            elif v > a[3]:
                a[3] = v
            if t >= a[4]:  # the later record on a tie in time
                a[4], a[5], a[6] = t, seq, v
            a[7] += v * (bucket + BUCKET_NS - t)


@dataclass(frozen=True, slots=True)
class RawPoint:
    ts: int
    seq: int
    value: Decimal
    unique: str | None


CancelStatus = Literal["cancelled", "not_found", "already_cancelled", "invoiced"]


@dataclass(frozen=True, slots=True)
class CancelResult:
    """What became of one id of a cancellation request."""

    id: str
    status: CancelStatus
    invoice_id: str | None = None  # for ``invoiced``: the finalized invoice that billed it


@dataclass(frozen=True, slots=True)
class CancelledRecord:
    """One entry of the audit list: the record as it was stored, and its cancellation."""

    seq: int  # of the list: cancellations in the order they happened
    record_seq: int
    record_id: str
    timestamp_ns: int
    customer_id: str
    dimension_id: str
    value: Decimal
    metadata: dict[str, Any] | None
    source: str
    received_ns: int
    cancelled_ns: int
    reason: str | None


@dataclass(frozen=True, slots=True)
class StoredRecord:
    seq: int
    timestamp_ns: int
    customer_id: str
    dimension_id: str
    value: Decimal
    record_id: str | None
    metadata: dict[str, Any] | None
    source: str
    received_ns: int


@dataclass(frozen=True, slots=True)
class RejectedRow:
    seq: int
    received_ns: int
    source: str
    reason: str
    field: str | None
    error: str
    raw: str | None


class IngestStore(Protocol):
    """Where usage is committed. One writer calls ``commit`` (or ``commit_threads`` of them,
    where a store sets that attribute: it then orders concurrent commits itself); any thread
    may read state."""

    def commit(self, batches: Sequence[Batch], now_ns: int) -> list[CommitResult]:
        """Dedup, write records, update rollups and store rejected records in one transaction."""
        ...

    def state_get(self, keys: Sequence[str]) -> dict[str, bytes]:
        """Committed receiver state for these keys (absent keys are left out)."""
        ...

    def state_scan(self, prefix: str) -> dict[str, bytes]:
        """Committed receiver state whose keys start with ``prefix``."""
        ...


#: Set inside ``sweeping()``: a scratch dict living as long as that one computation, in its
#: context only (its thread). The reads made there sweep every customer's current period, so a
#: store may answer them in bulk and keep what it read, under a key of its own
#: (``store.postgres`` reads a block of customers in one statement: one period-gauge refresh
#: was 18,000 single reads). Reads elsewhere never see it.
READ_SWEEP: ContextVar[dict[Any, Any] | None] = ContextVar("meter_gateway_read_sweep", default=None)


@contextmanager
def sweeping() -> Iterator[None]:
    """The reads of the block sweep every customer (see ``READ_SWEEP``)."""
    token = READ_SWEEP.set({})
    try:
        yield
    finally:
        READ_SWEEP.reset(token)


class UsageReader(Protocol):
    """Committed usage as aggregation and listings read it; any thread may call."""

    def rollups(
        self, customer: str, dimension: str, from_bucket: int, to_bucket: int
    ) -> list[RollupRow]:
        """Rollup rows with ``from_bucket <= bucket < to_bucket``, in bucket order."""
        ...

    def rollup_column(
        self, customer: str, dimension: str, from_bucket: int, to_bucket: int, column: RollupColumn
    ) -> list[tuple[int, Any]]:
        """``(bucket, value)`` of one column of those rows, in bucket order: ``count`` an int,
        the others a ``Decimal``. Reading what a method needs, not five decimals a row, is
        most of what a long rating costs."""
        ...

    def split_tail(
        self, customer: str, dimension: str, bucket: int, at: int, column: RollupColumn
    ) -> tuple[Any, list[Decimal]] | None:
        """One rollup column's cell of ``bucket`` and the values of the bucket's records at or
        after ``at``, read in one statement (one snapshot: the cell holds exactly those records
        and the ones before ``at``); None when the bucket has no row."""
        ...

    def raw(
        self, customer: str, dimension: str, from_ns: int, to_ns: int, unique_key: str | None = None
    ) -> list[RawPoint]:
        """Records with ``from_ns <= ts < to_ns`` ordered by (ts, seq); with ``unique_key``,
        each point's ``unique`` is its metadata value under that key."""
        ...

    def distinct(
        self, customer: str, dimension: str, from_bucket: int, to_bucket: int
    ) -> list[tuple[int, str]]:
        """(bucket, unique value) pairs of the distinct-value rollup."""
        ...

    def last_before(self, customer: str, dimension: str, ts_ns: int) -> RawPoint | None:
        """The latest record (by ts, then seq) strictly before ``ts_ns``."""
        ...

    def pairs(
        self, customer: str | None, dimension: str | None, before_ns: int
    ) -> list[tuple[str, str]]:
        """(customer, dimension) pairs that have usage before ``before_ns``."""
        ...

    def records(
        self,
        customer: str | None,
        dimension: str | None,
        from_ns: int,
        to_ns: int,
        after: tuple[int, int] | None,
        limit: int,
    ) -> list[StoredRecord]: ...

    def rejected(
        self, after_seq: int | None, limit: int, reason: str | None
    ) -> list[RejectedRow]: ...


class LeaseStore(Protocol):
    """Scheduled work on one replica at a time."""

    def lease(self, name: str, holder: str, ttl_ns: int, now_ns: int) -> bool:
        """Take or renew the named lease for ``holder`` until ``now_ns + ttl_ns``; False when
        another holder's lease has not expired. Jobs run only while their lease is held."""
        ...

    def release(self, name: str, holder: str) -> None:
        """Give the lease up (if ``holder`` holds it) so another replica takes over at once."""
        ...


class CatalogStore(Protocol):
    """The catalog (dimensions, offerings, customers, meters) as JSON documents."""

    def catalog_load(self) -> dict[str, dict[str, dict[str, Any]]]: ...

    def catalog_put(
        self, kind: str, id: str, body: Mapping[str, Any], expect_version: int | None = None
    ) -> None:
        """Upsert one entry and move ``catalog_version`` by one, in one transaction. With
        ``expect_version``: compare-and-set, ``ConflictError`` (nothing written) unless the
        version is still that one (another change came first: reload, validate again)."""
        ...

    def catalog_delete(self, kind: str, id: str, expect_version: int | None = None) -> bool:
        """Delete one entry (False: absent, nothing moves); a deletion moves
        ``catalog_version`` by one in its transaction. ``expect_version`` as for ``catalog_put``."""
        ...

    def catalog_lock(self) -> AbstractContextManager[None]:
        """Held around one catalog change, from reading the version through validation to the
        write, so changes made through any replica take turns (and compare-and-set writes do
        not starve each other)."""
        ...

    def finalized_through(self, customers: Sequence[str]) -> int | None:
        """The latest end of a finalized (not void) invoice's period of these customers (None:
        none): what a catalog change must not rate again differently (SPEC 11)."""
        ...

    def catalog_version(self) -> int:
        """A counter that moves by one with every committed catalog change, whoever made it
        (other replicas included): a reader that read it before ``catalog_load`` knows its
        snapshot is at least that new, and reloads when it has moved. Compare it only with
        values read from the same store (SQLite counts in memory from 0 at open: one process
        owns the database)."""
        ...


class BillingStore(Protocol):
    """Invoices, the wallet ledger, scheduled jobs' state and the outbox.

    Documents are JSON-able dicts (decimals as strings); every method is one transaction of
    its own. Methods that must happen once across replicas take ``fence=(lease name,
    holder)``: the store checks, inside the same transaction, that ``holder`` still holds that
    lease (unexpired at ``now_ns``) and raises ``LeaseLostError`` without writing anything
    otherwise (SQLite: one process owns the database, so the check is trivially true)."""

    def invoice_create(self, invoice: InvoiceRow) -> None:
        """Insert a new invoice (normally a draft); ``ConflictError`` if the id exists."""
        ...

    def invoice_get(self, invoice_id: str) -> InvoiceRow | None:
        """The invoice with its document and, once finalized, its renditions."""
        ...

    def invoice_list(
        self,
        customer: str | None,
        after: tuple[int, str] | None,
        limit: int,
        *,
        status: str | None = None,
        from_ns: int | None = None,
        to_ns: int | None = None,
    ) -> list[InvoiceRow]:
        """Invoices (of one customer, or all) ordered by ``(created_ns, id)``, those after the
        ``after`` key only; rows come without ``renditions`` (an empty dict). ``status`` keeps
        one status; ``from_ns``/``to_ns`` keep invoices whose period overlaps
        ``[from_ns, to_ns)``."""
        ...

    def invoice_update_draft(self, invoice_id: str, document: Mapping[str, Any]) -> bool:
        """Replace a draft's document (a recomputation); False, writing nothing, when the
        invoice does not exist or is no longer a draft."""
        ...

    def invoice_delete_draft(self, invoice_id: str) -> bool:
        """Delete a draft; False, deleting nothing, when it is absent or not a draft."""
        ...

    def invoice_finalize(
        self,
        invoice: InvoiceRow,
        finalized_ns: int,
        ledger: Sequence[LedgerEntry],
        finish: Callable[[str], FinalInvoice],
        *,
        insert: bool = False,
        fence: tuple[str, str] | None = None,
        states: Mapping[str, Mapping[str, Any] | None] | None = None,
    ) -> InvoiceRow | None:
        """In ONE transaction: check the fence; if ``insert``, write ``invoice`` as a new row,
        else require the stored ``invoice.id`` to still be a draft (None, writing nothing,
        when it is not: finalized meanwhile, e.g. by another replica, or absent); append the
        ledger entries (rules of ``wallet_append``: a taken seq raises ``ConflictError``); take
        the next number of the one gapless sequence (``INV-000001``, ...: a counter row
        updated in this transaction, so a rollback gives the number back); call
        ``finish(number)`` for the document, its exact renditions (served verbatim from then
        on) and the outbox events, and write them with status ``finalized``; upsert
        ``states`` (job state, as ``job_commit``). ``PeriodInvoicedError`` (nothing written)
        when another numbered invoice of the customer is finalized for the same period. The
        finalized row."""
        ...

    def invoice_void(
        self,
        invoice_id: str,
        document: Mapping[str, Any],
        renditions: Mapping[str, bytes],
        voided_ns: int,
        ledger: Sequence[LedgerEntry],
        events: Sequence[OutboxEvent],
        states: Mapping[str, Mapping[str, Any] | None] | None = None,
    ) -> bool:
        """In ONE transaction: if the invoice is finalized, make it ``void`` at ``voided_ns``
        with this document and these renditions (its period is free again), append the ledger
        entries (credits given back; ``wallet_append``'s rules), the outbox events and the job
        states. False, writing nothing, when it is not finalized."""
        ...

    def invoice_backfill_periods(
        self, period_of: Callable[[Mapping[str, Any]], tuple[int, int] | None]
    ) -> int:
        """Give rows stored before invoices had period columns their ``from_ns``/``to_ns``, as
        ``period_of(document)`` reads them; how many rows it set."""
        ...

    def wallet_last(self, customer: str, currency: str) -> LedgerEntry | None:
        """The wallet's latest entry (its ``balance`` is the balance; None: empty wallet)."""
        ...

    def wallet_entries(
        self, customer: str, currency: str | None, after_seq: int, limit: int
    ) -> list[LedgerEntry]:
        """A customer's ledger entries (one currency or all) with ``seq > after_seq``, ordered
        by (currency, seq)."""
        ...

    def wallets(self) -> list[LedgerEntry]:
        """The latest entry of every wallet (customer, currency), for balance metrics."""
        ...

    def wallet_append(self, entries: Sequence[LedgerEntry]) -> bool:
        """Append ledger entries in one transaction. Each entry's ``seq`` must be its wallet's
        last seq + 1 (optimistic concurrency: the caller read ``wallet_last``, computed the new
        balance, and a (customer, currency, seq) that is already taken raises ``ConflictError``;
        re-read and retry). An ``entry_id`` already in that wallet makes the call return False
        and write nothing (an idempotent retry of the same top-up)."""
        ...

    def job_state(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Scheduled jobs' state documents (meter periods and fired thresholds, ...) whose key
        starts with ``prefix``."""
        ...

    def job_commit(
        self,
        states: Mapping[str, Mapping[str, Any] | None],
        events: Sequence[OutboxEvent],
        fence: tuple[str, str] | None,
        now_ns: int,
    ) -> None:
        """In ONE transaction: check the fence (``LeaseLostError``, nothing written), upsert the
        state documents (None deletes the key) and append the outbox events (an event whose
        (exporter, event_id) is already in the outbox is skipped, so a retried commit never
        queues it twice)."""
        ...

    def outbox_claim(self, exporter: str, now_ns: int, limit: int) -> list[OutboxItem]:
        """Up to ``limit`` of the exporter's pending events that are due (``next_attempt_ns <=
        now_ns``), oldest (lowest seq) first. Claiming marks nothing: the delivery job runs under
        a lease, and an event stays pending until ``outbox_delivered`` (at-least-once)."""
        ...

    def outbox_delivered(self, exporter: str, seqs: Sequence[int], now_ns: int) -> None:
        """Mark these events delivered (they stop being pending; kept until purged)."""
        ...

    def outbox_failed(
        self, exporter: str, seq: int, error: str, next_attempt_ns: int | None, now_ns: int
    ) -> None:
        """Record a failed attempt: attempts + 1, the error, and the next attempt time; with
        ``next_attempt_ns=None`` the event is given up (``dead``: no longer pending, kept)."""
        ...

    def outbox_stats(self) -> list[OutboxStats]:
        """Per exporter: pending events, the oldest pending event's ``created_ns``, dead events."""
        ...

    def outbox_purge(self, delivered_before_ns: int) -> int:
        """Delete events delivered before this time; returns how many."""
        ...


class IdempotencyStore(Protocol):
    """Answers recorded under ``Idempotency-Key`` headers, per (path, key)."""

    def idempotency_begin(
        self, path: str, key: str, fingerprint: str, now_ns: int, stale_before_ns: int
    ) -> IdempotentAnswer | None:
        """Reserve (path, key) for a request with this fingerprint: None when the caller now
        holds it (new, or an unfinished reservation made before ``stale_before_ns``, taken
        over); otherwise what is recorded there (finished or still in progress)."""
        ...

    def idempotency_finish(
        self, path: str, key: str, status: int, media_type: str | None, body: bytes
    ) -> None:
        """Record the reserved request's answer (replayed for the same key from then on)."""
        ...

    def idempotency_release(self, path: str, key: str) -> None:
        """Drop an unfinished reservation (the request failed: the key may be used again)."""
        ...

    def idempotency_purge(self, before_ns: int) -> int:
        """Delete what was recorded before ``before_ns``; how many."""
        ...


class CorrectionStore(Protocol):
    """Usage corrections (SPEC 11): records cancelled by id, and the audit list of them."""

    def cancel_records(
        self,
        ids: Sequence[str],
        reason: str | None,
        now_ns: int,
        unique_keys: Mapping[str, str],
    ) -> list[CancelResult]:
        """In ONE transaction, per id: move the records with that id out of ``records`` into
        the audit list and recompute the rollup buckets they were in from the records that
        remain (``store.corrections``), unless one lies in a finalized invoice's period of
        its customer (``invoiced``, nothing changed). Answers each id in order: ``cancelled``,
        ``not_found``, ``already_cancelled`` or ``invoiced``. ``unique_keys`` maps a
        dimension to its ``unique_key``. Dedup keys stay marked: a cancelled id sent again is
        a duplicate."""
        ...

    def cancellations(self, after_seq: int | None, limit: int) -> list[CancelledRecord]:
        """The audit list: cancelled records, oldest cancellation first."""
        ...


class MeteredBillingStore(UsageReader, BillingStore, Protocol):
    """What rates usage into money: invoices and meters read usage and write billing."""


class Store(
    IngestStore,
    UsageReader,
    LeaseStore,
    CatalogStore,
    BillingStore,
    IdempotencyStore,
    CorrectionStore,
    Protocol,
):
    """Every concern of a store, as a gateway opens it."""

    def close(self) -> None: ...


class LeaseLostError(RuntimeError):
    """A fenced write found its lease held by another replica or expired; nothing was written."""


class ConflictError(RuntimeError):
    """An optimistic write lost a race (an id or wallet seq already taken); re-read, retry."""


@dataclass(frozen=True, slots=True)
class InvoiceRow:
    """An invoice as stored. ``status`` is ``draft``, ``finalized`` or ``void``; ``document`` is
    the invoice JSON (for a draft, its last computation); ``renditions`` maps a format
    (``json``, ``csv``, ``html``) to the exact bytes served for a finalized or void invoice
    (empty for drafts). ``number`` is the gapless number a finalization gave it (None for
    drafts, and for invoices finalized before numbers existed); ``from_ns``/``to_ns`` its period
    (None only for rows older than those columns, until backfilled); ``origin`` ``api`` or
    ``cycle`` (made by the billing-cycle job)."""

    id: str
    customer: str
    status: str
    created_ns: int
    finalized_ns: int | None
    document: dict[str, Any]
    renditions: dict[str, bytes]
    number: str | None = None
    from_ns: int | None = None
    to_ns: int | None = None
    voided_ns: int | None = None
    origin: str = "api"


@dataclass(frozen=True, slots=True)
class FinalInvoice:
    """What a finalization writes once its number is known: the document, its exact
    renditions and the outbox events (see ``BillingStore.invoice_finalize``)."""

    document: dict[str, Any]
    renditions: dict[str, bytes]
    events: Sequence[OutboxEvent]


class PeriodInvoicedError(ConflictError):
    """A finalization found the customer's period already held by another finalized invoice
    (one finalized invoice per customer and exact period; a void one frees it). Nothing was
    written."""


@dataclass(frozen=True, slots=True)
class IdempotentAnswer:
    """What an ``Idempotency-Key`` recorded: the request's fingerprint and, once the first
    request finished, its answer (``status`` None: still in progress)."""

    fingerprint: str
    status: int | None
    media_type: str | None
    body: bytes | None
    created_ns: int


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One entry of a customer's prepaid wallet in one currency. ``seq`` counts 1, 2, 3, ...
    per wallet without gaps; ``amount`` is signed (+ top-up, − drawn by an invoice) and
    ``balance`` is the balance after it; ``entry_id`` is unique per wallet (idempotency)."""

    customer: str
    currency: str
    seq: int
    entry_id: str
    kind: str  # "top_up" | "invoice" | "adjustment"
    amount: Decimal
    balance: Decimal
    created_ns: int
    reference: str | None = None  # the invoice id, or the top-up's note


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """An event queued for one exporter; ``payload`` is the exact body delivered (JSON bytes),
    ``event_id`` is stable (receivers dedup on it) and unique per exporter."""

    exporter: str
    event_id: str
    type: str
    payload: bytes
    created_ns: int


@dataclass(frozen=True, slots=True)
class OutboxItem:
    exporter: str
    seq: int
    event_id: str
    type: str
    payload: bytes
    created_ns: int
    attempts: int
    next_attempt_ns: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class OutboxStats:
    exporter: str
    pending: int
    oldest_pending_ns: int | None
    dead: int
