"""Billing persistence written once, for every SQL store: the catalog, invoices (with the one
gapless number sequence), the wallet ledger, leases with fenced job commits, the outbox and
idempotency keys.

``SqlBilling`` implements ``CatalogStore``, ``BillingStore``, ``IdempotencyStore`` and
``LeaseStore`` (semantics in ``store.base``) over a ``Dialect``; ``SQLiteStore`` and
``PostgresStore`` compose it and keep only their hot ingest and usage paths to themselves.
Every method is one transaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import orjson

from meter_gateway.store.base import (
    ConflictError,
    FinalInvoice,
    IdempotentAnswer,
    InvoiceRow,
    LeaseLostError,
    LedgerEntry,
    OutboxEvent,
    OutboxItem,
    OutboxStats,
    PeriodInvoicedError,
)
from meter_gateway.store.dialect import Dialect, Row, Tx

# Named lock (Dialect.exclusive; PostgreSQL: an advisory lock id, "mg" 3) held around one
# catalog change (CatalogStore.catalog_lock).
CATALOG_LOCK = 0x6D67_0003
# The last error of a failed outbox delivery is kept up to this many characters.
MAX_ERROR_CHARS = 2000
# The upper bound of a key prefix scan: no key continues past this code point.
_PREFIX_END = "\U0010ffff"

_INVOICE_COLS = (
    "id, customer, status, created_ns, finalized_ns, document, number, from_ns, to_ns, "
    "voided_ns, origin"
)
_LEDGER_COLS = "customer, currency, seq, entry_id, kind, amount, balance, created_ns, reference"
_OUTBOX_COLS = (
    "exporter, seq, event_id, type, payload, created_ns, attempts, next_attempt_ns, last_error"
)


class SqlBilling:
    """Catalog, billing and lease persistence over ``self._dialect`` (set by the store)."""

    _dialect: Dialect

    # --- catalog -----------------------------------------------------------------------------

    def catalog_load(self) -> dict[str, dict[str, dict[str, Any]]]:
        out: dict[str, dict[str, dict[str, Any]]] = {}
        with self._dialect.reading() as tx:
            rows = tx.all("SELECT kind, id, body FROM catalog ORDER BY kind, id")
        for kind, id_, body in rows:
            out.setdefault(kind, {})[id_] = orjson.loads(body)
        return out

    def catalog_put(
        self, kind: str, id: str, body: Mapping[str, Any], expect_version: int | None = None
    ) -> None:
        with self._dialect.writing() as tx:
            self._lock_catalog_version(tx, expect_version)
            tx.run(
                "INSERT INTO catalog VALUES (?, ?, ?, ?) ON CONFLICT (kind, id) "
                "DO UPDATE SET body = excluded.body, updated_ns = excluded.updated_ns",
                (kind, id, orjson.dumps(dict(body)).decode(), time.time_ns()),
            )
            tx.run("UPDATE catalog_version SET version = version + 1")

    def catalog_delete(self, kind: str, id: str, expect_version: int | None = None) -> bool:
        with self._dialect.writing() as tx:
            self._lock_catalog_version(tx, expect_version)
            deleted = tx.run("DELETE FROM catalog WHERE kind = ? AND id = ?", (kind, id)) > 0
            if deleted:
                tx.run("UPDATE catalog_version SET version = version + 1")
        return deleted

    def catalog_version(self) -> int:
        with self._dialect.reading() as tx:
            row = tx.one("SELECT version FROM catalog_version")
        assert row is not None  # the migration inserts the one row
        return int(row[0])

    def finalized_through(self, customers: Sequence[str]) -> int | None:
        latest: int | None = None
        with self._dialect.reading() as tx:
            for i in range(0, len(customers), 500):
                chunk = list(customers[i : i + 500])
                row = tx.one(
                    "SELECT max(to_ns) FROM invoices WHERE status = 'finalized' "
                    f"AND customer IN ({', '.join('?' * len(chunk))})",
                    chunk,
                )
                if row is not None and row[0] is not None:
                    latest = max(int(row[0]), latest or int(row[0]))
        return latest

    @contextmanager
    def catalog_lock(self) -> Iterator[None]:
        with self._dialect.exclusive(CATALOG_LOCK):
            yield

    def _lock_catalog_version(self, tx: Tx, expect: int | None) -> None:
        """A catalog writer's first step: lock the version row (writers queue here, so they
        never deadlock on catalog rows) and, with ``expect``, check it has not moved."""
        row = tx.one(f"SELECT version FROM catalog_version{self._dialect.for_update}")
        assert row is not None
        if expect is not None and int(row[0]) != expect:
            raise ConflictError(f"the catalog changed (version {row[0]}, expected {expect})")

    # --- leases ------------------------------------------------------------------------------

    def lease(self, name: str, holder: str, ttl_ns: int, now_ns: int) -> bool:
        if self._dialect.single_owner:
            return True
        with self._dialect.writing() as tx:
            row = tx.one(
                "INSERT INTO leases AS l (name, holder, expires_ns) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
                "expires_ns = excluded.expires_ns "
                "WHERE l.holder = excluded.holder OR l.expires_ns <= ? RETURNING holder",
                (name, holder, now_ns + ttl_ns, now_ns),
            )
        return row is not None

    def release(self, name: str, holder: str) -> None:
        if self._dialect.single_owner:
            return
        with self._dialect.writing() as tx:
            tx.run("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

    def _check_fence(self, tx: Tx, fence: tuple[str, str], now_ns: int) -> None:
        """Inside the writing transaction: the lease is ours and unexpired. FOR SHARE holds the
        lease row, so a replica taking the lease over waits until this transaction ends."""
        if self._dialect.single_owner:
            return
        name, holder = fence
        row = tx.one(
            f"SELECT holder, expires_ns FROM leases WHERE name = ?{self._dialect.for_share}",
            (name,),
        )
        if row is None or row[0] != holder or row[1] <= now_ns:
            raise LeaseLostError(
                f"lease {name!r} is not held by {holder!r} "
                f"({'absent' if row is None else f'held by {row[0]!r}'}): nothing written"
            )

    # --- invoices ----------------------------------------------------------------------------

    def invoice_create(self, invoice: InvoiceRow) -> None:
        try:
            with self._dialect.writing() as tx:
                _insert_invoice(tx, invoice)
                _put_renditions(tx, invoice.id, invoice.renditions)
        except Exception as exc:
            if not self._dialect.is_unique_violation(exc):
                raise
            raise ConflictError(f"invoice {invoice.id!r} already exists") from None

    def invoice_get(self, invoice_id: str) -> InvoiceRow | None:
        with self._dialect.reading() as tx:
            row = tx.one(f"SELECT {_INVOICE_COLS} FROM invoices WHERE id = ?", (invoice_id,))
            if row is None:
                return None
            rend = tx.all(
                "SELECT format, body FROM invoice_renditions WHERE invoice_id = ?", (invoice_id,)
            )
        return _invoice(row, {f: bytes(b) for f, b in rend})

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
        sql = f"SELECT {_INVOICE_COLS} FROM invoices WHERE true"
        args: list[Any] = []
        for cond, value in (
            (" AND customer = ?", customer),
            (" AND status = ?", status),
            (" AND to_ns > ?", from_ns),  # the period overlaps [from_ns, to_ns)
            (" AND from_ns < ?", to_ns),
        ):
            if value is not None:
                sql += cond
                args.append(value)
        if after is not None:
            sql += " AND (created_ns, id) > (?, ?)"
            args.extend(after)
        sql += " ORDER BY created_ns, id LIMIT ?"
        args.append(limit)
        with self._dialect.reading() as tx:
            rows = tx.all(sql, args)
        return [_invoice(r, {}) for r in rows]

    def invoice_update_draft(self, invoice_id: str, document: Mapping[str, Any]) -> bool:
        with self._dialect.writing() as tx:
            changed = tx.run(
                "UPDATE invoices SET document = ? WHERE id = ? AND status = 'draft'",
                (orjson.dumps(dict(document)).decode(), invoice_id),
            )
        return changed > 0

    def invoice_delete_draft(self, invoice_id: str) -> bool:
        with self._dialect.writing() as tx:
            deleted = tx.run(
                "DELETE FROM invoices WHERE id = ? AND status = 'draft'", (invoice_id,)
            )
            if deleted:
                tx.run("DELETE FROM invoice_renditions WHERE invoice_id = ?", (invoice_id,))
        return deleted > 0

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
        with self._dialect.writing() as tx:
            if fence is not None:
                self._check_fence(tx, fence, finalized_ns)
            if insert:
                _insert_invoice(tx, invoice)
            else:
                # The row lock makes a second replica finalizing the same draft wait, then
                # find it finalized and write nothing.
                row = tx.one(
                    f"SELECT status FROM invoices WHERE id = ?{self._dialect.for_update}",
                    (invoice.id,),
                )
                if row is None or row[0] != "draft":
                    return None
            if ledger and not self._append_ledger(tx, ledger):
                raise ConflictError(f"invoice {invoice.id!r} already drew on the wallet")
            # The one counter row: finalizations take their numbers in commit order, and a
            # rolled-back one gives its number back, so the sequence has no gaps.
            counter = tx.one("UPDATE invoice_numbers SET last = last + 1 RETURNING last")
            assert counter is not None  # the migration inserts the one row
            number = invoice_number(int(counter[0]))
            final = finish(number)
            try:
                with tx.savepoint():
                    tx.run(
                        "UPDATE invoices SET status = 'finalized', finalized_ns = ?, "
                        "document = ?, number = ? WHERE id = ?",
                        (
                            finalized_ns,
                            orjson.dumps(final.document).decode(),
                            number,
                            invoice.id,
                        ),
                    )
            except Exception as exc:
                if not self._dialect.is_unique_violation(exc):
                    raise
                raise PeriodInvoicedError(
                    f"customer {invoice.customer!r} already has a finalized invoice for this "
                    "period (void it to invoice the period again)"
                ) from None
            _put_renditions(tx, invoice.id, final.renditions)
            _append_outbox(tx, final.events)
            if states:
                _put_states(tx, states)
            stored = tx.one(f"SELECT {_INVOICE_COLS} FROM invoices WHERE id = ?", (invoice.id,))
        assert stored is not None
        return _invoice(stored, dict(final.renditions))

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
        with self._dialect.writing() as tx:
            changed = tx.run(
                "UPDATE invoices SET status = 'void', voided_ns = ?, document = ? "
                "WHERE id = ? AND status = 'finalized'",
                (voided_ns, orjson.dumps(dict(document)).decode(), invoice_id),
            )
            if changed == 0:
                return False
            if ledger and not self._append_ledger(tx, ledger):
                raise ConflictError(f"invoice {invoice_id!r} already gave its credits back")
            _put_renditions(tx, invoice_id, renditions)
            _append_outbox(tx, events)
            if states:
                _put_states(tx, states)
        return True

    def invoice_backfill_periods(
        self, period_of: Callable[[Mapping[str, Any]], tuple[int, int] | None]
    ) -> int:
        with self._dialect.reading() as tx:
            rows = tx.all("SELECT id, document FROM invoices WHERE from_ns IS NULL")
        done = 0
        for id_, document in rows:
            period = period_of(orjson.loads(document))
            if period is None:
                continue
            with self._dialect.writing() as tx:
                done += tx.run(
                    "UPDATE invoices SET from_ns = ?, to_ns = ? WHERE id = ? AND from_ns IS NULL",
                    (period[0], period[1], id_),
                )
        return done

    # --- idempotency keys --------------------------------------------------------------------

    def idempotency_begin(
        self, path: str, key: str, fingerprint: str, now_ns: int, stale_before_ns: int
    ) -> IdempotentAnswer | None:
        with self._dialect.writing() as tx:
            # A concurrent insert of the same key waits for ours to commit, then does nothing.
            if tx.run(
                "INSERT INTO idempotency (path, key, fingerprint, created_ns) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (path, key) DO NOTHING",
                (path, key, fingerprint, now_ns),
            ):
                return None
            row = tx.one(
                "SELECT fingerprint, status, media_type, body, created_ns FROM idempotency "
                f"WHERE path = ? AND key = ?{self._dialect.for_update}",
                (path, key),
            )
            if row is None:  # purged between the two statements: the key is free
                tx.run(
                    "INSERT INTO idempotency (path, key, fingerprint, created_ns) "
                    "VALUES (?, ?, ?, ?)",
                    (path, key, fingerprint, now_ns),
                )
                return None
            fp, status, media_type, body, created_ns = row
            if status is None and created_ns < stale_before_ns:
                # The request that reserved it never finished (its process died): take over.
                tx.run(
                    "UPDATE idempotency SET fingerprint = ?, created_ns = ? "
                    "WHERE path = ? AND key = ?",
                    (fingerprint, now_ns, path, key),
                )
                return None
        return IdempotentAnswer(
            fp,
            None if status is None else int(status),
            media_type,
            None if body is None else bytes(body),
            int(created_ns),
        )

    def idempotency_finish(
        self, path: str, key: str, status: int, media_type: str | None, body: bytes
    ) -> None:
        with self._dialect.writing() as tx:
            tx.run(
                "UPDATE idempotency SET status = ?, media_type = ?, body = ? "
                "WHERE path = ? AND key = ? AND status IS NULL",
                (status, media_type, body, path, key),
            )

    def idempotency_release(self, path: str, key: str) -> None:
        with self._dialect.writing() as tx:
            tx.run(
                "DELETE FROM idempotency WHERE path = ? AND key = ? AND status IS NULL",
                (path, key),
            )

    def idempotency_purge(self, before_ns: int) -> int:
        with self._dialect.writing() as tx:
            return tx.run("DELETE FROM idempotency WHERE created_ns < ?", (before_ns,))

    # --- wallet ------------------------------------------------------------------------------

    def wallet_last(self, customer: str, currency: str) -> LedgerEntry | None:
        with self._dialect.reading() as tx:
            row = tx.one(
                f"SELECT {_LEDGER_COLS} FROM wallet_ledger WHERE customer = ? AND currency = ? "
                "ORDER BY seq DESC LIMIT 1",
                (customer, currency),
            )
        return None if row is None else _ledger(row)

    def wallet_entries(
        self, customer: str, currency: str | None, after_seq: int, limit: int
    ) -> list[LedgerEntry]:
        sql = f"SELECT {_LEDGER_COLS} FROM wallet_ledger WHERE customer = ? AND seq > ?"
        args: list[Any] = [customer, after_seq]
        if currency is not None:
            sql += " AND currency = ?"
            args.append(currency)
        sql += " ORDER BY currency, seq LIMIT ?"
        args.append(limit)
        with self._dialect.reading() as tx:
            rows = tx.all(sql, args)
        return [_ledger(r) for r in rows]

    def wallets(self) -> list[LedgerEntry]:
        cols = ", ".join(f"w.{c}" for c in _LEDGER_COLS.split(", "))
        with self._dialect.reading() as tx:
            rows = tx.all(
                f"SELECT {cols} FROM wallet_ledger w JOIN (SELECT customer, currency, "
                "max(seq) AS seq FROM wallet_ledger GROUP BY customer, currency) m "
                "ON w.customer = m.customer AND w.currency = m.currency AND w.seq = m.seq "
                "ORDER BY w.customer, w.currency"
            )
        return [_ledger(r) for r in rows]

    def wallet_append(self, entries: Sequence[LedgerEntry]) -> bool:
        with self._dialect.writing() as tx:
            return self._append_ledger(tx, entries)

    def _append_ledger(self, tx: Tx, entries: Sequence[LedgerEntry]) -> bool:
        """Inside a write transaction: False if the first entry's id is already in its wallet
        (write nothing then); ConflictError if a later entry's id is, or a seq is not the
        wallet's next one or is taken meanwhile (the caller's transaction rolls back)."""
        for i, e in enumerate(entries):
            taken = tx.one(
                "SELECT 1 FROM wallet_ledger WHERE customer = ? AND currency = ? AND entry_id = ?",
                (e.customer, e.currency, e.entry_id),
            )
            if taken is not None:
                if i != 0:
                    raise ConflictError(f"ledger entry {e.entry_id!r} already recorded")
                return False
            row = tx.one(
                "SELECT coalesce(max(seq), 0) FROM wallet_ledger WHERE customer = ? "
                "AND currency = ?",
                (e.customer, e.currency),
            )
            last = int(row[0]) if row else 0
            if e.seq != last + 1:
                raise ConflictError(
                    f"wallet {e.customer}/{e.currency} is at entry {last}, not {e.seq - 1}: "
                    "re-read and retry"
                )
            try:
                # A concurrent append of the same seq (or entry id) waits for the other
                # transaction and then fails here: the savepoint keeps ours usable.
                with tx.savepoint():
                    tx.run(
                        "INSERT INTO wallet_ledger VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            e.customer,
                            e.currency,
                            e.seq,
                            e.entry_id,
                            e.kind,
                            self._dialect.decimal(e.amount),
                            self._dialect.decimal(e.balance),
                            e.created_ns,
                            e.reference,
                        ),
                    )
            except Exception as exc:
                if not self._dialect.is_unique_violation(exc):
                    raise
                raise ConflictError(
                    f"wallet {e.customer}/{e.currency} already has entry {e.seq} or "
                    f"{e.entry_id!r}: re-read and retry"
                ) from None
        return True

    # --- scheduled jobs' state ---------------------------------------------------------------

    def job_state(self, prefix: str) -> dict[str, dict[str, Any]]:
        with self._dialect.reading() as tx:
            rows = tx.all(
                "SELECT key, body FROM job_state WHERE key >= ? AND key < ? ORDER BY key",
                (prefix, prefix + _PREFIX_END),
            )
        return {k: orjson.loads(b) for k, b in rows}

    def job_commit(
        self,
        states: Mapping[str, Mapping[str, Any] | None],
        events: Sequence[OutboxEvent],
        fence: tuple[str, str] | None,
        now_ns: int,
    ) -> None:
        with self._dialect.writing() as tx:
            if fence is not None:
                self._check_fence(tx, fence, now_ns)
            _put_states(tx, states)
            _append_outbox(tx, events)

    # --- outbox ------------------------------------------------------------------------------

    def outbox_claim(self, exporter: str, now_ns: int, limit: int) -> list[OutboxItem]:
        with self._dialect.reading() as tx:
            rows = tx.all(
                f"SELECT {_OUTBOX_COLS} FROM outbox WHERE exporter = ? AND status = 'pending' "
                "AND next_attempt_ns <= ? ORDER BY seq LIMIT ?",
                (exporter, now_ns, limit),
            )
        return [
            OutboxItem(e, int(s), i, t, bytes(p), int(c), int(a), int(n), err)
            for e, s, i, t, p, c, a, n, err in rows
        ]

    def outbox_delivered(self, exporter: str, seqs: Sequence[int], now_ns: int) -> None:
        with self._dialect.writing() as tx:
            tx.many(
                "UPDATE outbox SET status = 'delivered', delivered_ns = ?, attempts = attempts + 1 "
                "WHERE exporter = ? AND seq = ? AND status = 'pending'",
                [(now_ns, exporter, s) for s in seqs],
            )

    def outbox_failed(
        self, exporter: str, seq: int, error: str, next_attempt_ns: int | None, now_ns: int
    ) -> None:
        with self._dialect.writing() as tx:
            tx.run(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, "
                "next_attempt_ns = coalesce(?, next_attempt_ns), status = ? "
                "WHERE exporter = ? AND seq = ? AND status = 'pending'",
                (
                    self._dialect.text(error[:MAX_ERROR_CHARS]),
                    next_attempt_ns,
                    "pending" if next_attempt_ns is not None else "dead",
                    exporter,
                    seq,
                ),
            )

    def outbox_stats(self) -> list[OutboxStats]:
        with self._dialect.reading() as tx:
            rows = tx.all(
                "SELECT exporter, count(*) FILTER (WHERE status = 'pending'), "
                "min(created_ns) FILTER (WHERE status = 'pending'), "
                "count(*) FILTER (WHERE status = 'dead') FROM outbox "
                "WHERE status != 'delivered' GROUP BY exporter ORDER BY exporter"
            )
        return [OutboxStats(e, int(p), o, int(d)) for e, p, o, d in rows]

    def outbox_purge(self, delivered_before_ns: int) -> int:
        with self._dialect.writing() as tx:
            return tx.run(
                "DELETE FROM outbox WHERE status = 'delivered' AND delivered_ns < ?",
                (delivered_before_ns,),
            )


def invoice_number(n: int) -> str:
    """The n-th number of the one invoice sequence."""
    return f"INV-{n:06d}"


def _invoice(row: Row, renditions: dict[str, bytes]) -> InvoiceRow:
    id_, customer, status, created_ns, finalized_ns, document, number, f, t, voided, origin = row
    return InvoiceRow(
        id_,
        customer,
        status,
        int(created_ns),
        None if finalized_ns is None else int(finalized_ns),
        orjson.loads(document),
        renditions,
        number,
        None if f is None else int(f),
        None if t is None else int(t),
        None if voided is None else int(voided),
        origin,
    )


def _insert_invoice(tx: Tx, invoice: InvoiceRow) -> None:
    tx.run(
        f"INSERT INTO invoices ({_INVOICE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            invoice.id,
            invoice.customer,
            invoice.status,
            invoice.created_ns,
            invoice.finalized_ns,
            orjson.dumps(invoice.document).decode(),
            invoice.number,
            invoice.from_ns,
            invoice.to_ns,
            invoice.voided_ns,
            invoice.origin,
        ),
    )


def _put_states(tx: Tx, states: Mapping[str, Mapping[str, Any] | None]) -> None:
    for key in sorted(states):  # rows locked in key order: concurrent commits queue
        body = states[key]
        if body is None:
            tx.run("DELETE FROM job_state WHERE key = ?", (key,))
        else:
            tx.run(
                "INSERT INTO job_state VALUES (?, ?) ON CONFLICT (key) "
                "DO UPDATE SET body = excluded.body",
                (key, orjson.dumps(dict(body)).decode()),
            )


def _put_renditions(tx: Tx, invoice_id: str, renditions: Mapping[str, bytes]) -> None:
    tx.many(
        "INSERT INTO invoice_renditions VALUES (?, ?, ?) ON CONFLICT (invoice_id, format) "
        "DO UPDATE SET body = excluded.body",
        [(invoice_id, f, bytes(b)) for f, b in renditions.items()],
    )


def _ledger(row: Row) -> LedgerEntry:
    customer, currency, seq, entry_id, kind, amount, balance, created_ns, reference = row
    return LedgerEntry(
        customer,
        currency,
        int(seq),
        entry_id,
        kind,
        Decimal(amount),
        Decimal(balance),
        int(created_ns),
        reference,
    )


def _append_outbox(tx: Tx, events: Sequence[OutboxEvent]) -> None:
    """Queue events; one already in the outbox (same exporter and event id) is skipped, so a
    retried commit never queues it twice."""
    tx.many(
        "INSERT INTO outbox (exporter, event_id, type, payload, created_ns, status, attempts, "
        "next_attempt_ns) VALUES (?, ?, ?, ?, ?, 'pending', 0, ?) "
        "ON CONFLICT (exporter, event_id) DO NOTHING",
        [(e.exporter, e.event_id, e.type, e.payload, e.created_ns, e.created_ns) for e in events],
    )
