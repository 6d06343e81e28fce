"""Billing persistence (``store.billing``: catalog, invoices, wallet ledger, leases and fenced
job commits, outbox), written once over a dialect and tested here once against both backends:
every test runs on SQLite and on PostgreSQL, whatever METER_TEST_STORE says."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from decimal import Decimal as D
from pathlib import Path

import pytest

from meter_gateway.store import Store
from meter_gateway.store.base import (
    BillingStore,
    CatalogStore,
    ConflictError,
    FinalInvoice,
    InvoiceRow,
    LeaseLostError,
    LeaseStore,
    LedgerEntry,
    OutboxEvent,
)
from tests import pgdb
from tests.helpers import ts

NOW = ts("2026-05-02T00:00:00")
SEC = 10**9
BILLING_TABLES = "catalog, invoices, invoice_renditions, wallet_ledger, job_state, outbox, leases"

Opener = Callable[[], Store]


@pytest.fixture(scope="module")
def pg_url() -> str:
    """One PostgreSQL database for the module; each test empties the billing tables."""
    return pgdb.create_database()


@pytest.fixture(params=["sqlite", "postgres"])
def reopen(request: pytest.FixtureRequest, tmp_path: Path, pg_url: str) -> Iterator[Opener]:
    """Opens the store of this test (again: the one opened before is closed first, the same
    file or database reopened); the last one is closed at the end."""
    opened: list[Store] = []

    def open_() -> Store:
        while opened:
            opened.pop().close()
        if request.param == "sqlite":
            from meter_gateway.store.sqlite import SQLiteStore

            s: Store = SQLiteStore(str(tmp_path / "billing.db"), 86400, NOW)
        else:
            from meter_gateway.store.postgres import PostgresStore

            s = PostgresStore(pg_url, 86400, NOW, pool_max=4)
        opened.append(s)
        return s

    if request.param == "postgres":
        import psycopg

        open_()  # migrates
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f"TRUNCATE {BILLING_TABLES}")
    yield open_
    while opened:
        opened.pop().close()


@pytest.fixture
def store(reopen: Opener) -> Store:
    return reopen()


def draft(id_: str, customer: str = "c1", created: int = 1) -> InvoiceRow:
    return InvoiceRow(id_, customer, "draft", created, None, {"total": "1.00"}, {})


def entry(seq: int, entry_id: str, amount: str, balance: str, kind: str = "top_up") -> LedgerEntry:
    return LedgerEntry("c1", "USD", seq, entry_id, kind, D(amount), D(balance), seq * 10)


def event(eid: str, exporter: str = "hook") -> OutboxEvent:
    return OutboxEvent(exporter, eid, "threshold_reached", b'{"id":"' + eid.encode() + b'"}', 5)


def test_a_finalized_invoice_keeps_its_bytes_and_cannot_be_finalized_or_redrafted(
    store: BillingStore,
) -> None:
    store.invoice_create(draft("inv-1"))
    with pytest.raises(ConflictError):
        store.invoice_create(draft("inv-1"))
    assert store.invoice_update_draft("inv-1", {"total": "2.00"})
    done = store.invoice_finalize(
        draft("inv-1"),
        99,
        [],
        lambda n: FinalInvoice(
            {"total": "2.00"}, {"json": b"{}\n", "csv": b"a,b\r\n"}, [event("e1")]
        ),
    )
    assert done is not None
    again = lambda n: FinalInvoice({"total": "3"}, {"json": b"x"}, [])  # noqa: E731
    assert store.invoice_finalize(draft("inv-1"), 100, [], again) is None
    assert not store.invoice_update_draft("inv-1", {"total": "4.00"})
    row = store.invoice_get("inv-1")
    assert row is not None
    assert (row.status, row.finalized_ns, row.document) == ("finalized", 99, {"total": "2.00"})
    assert row.renditions == {"json": b"{}\n", "csv": b"a,b\r\n"}
    assert [i.event_id for i in store.outbox_claim("hook", 10, 10)] == ["e1"]


def test_invoices_list_by_customer_in_creation_order_with_a_cursor(store: BillingStore) -> None:
    for i, cust in enumerate(["c1", "c2", "c1", "c1"]):
        store.invoice_create(draft(f"inv-{i}", cust, created=100 - i))
    rows = store.invoice_list("c1", None, 2)
    assert [r.id for r in rows] == ["inv-3", "inv-2"]
    assert all(r.renditions == {} for r in rows)
    more = store.invoice_list("c1", (rows[-1].created_ns, rows[-1].id), 10)
    assert [r.id for r in more] == ["inv-0"]
    assert len(store.invoice_list(None, None, 10)) == 4


def test_wallet_entries_are_sequential_idempotent_and_exact(store: BillingStore) -> None:
    assert store.wallet_last("c1", "USD") is None
    assert store.wallet_append([entry(1, "t1", "10.10", "10.10")])
    assert not store.wallet_append([entry(2, "t1", "10.10", "20.20")])  # same top-up again
    with pytest.raises(ConflictError):
        store.wallet_append([entry(1, "t2", "5", "5")])  # seq taken: someone else was first
    with pytest.raises(ConflictError):
        store.wallet_append([entry(3, "t2", "5", "5")])  # a gap
    assert store.wallet_append([entry(2, "t2", "0.000000000000000001", "10.100000000000000001")])
    last = store.wallet_last("c1", "USD")
    assert last is not None
    assert last.balance == D("10.100000000000000001")
    assert [e.entry_id for e in store.wallet_entries("c1", None, 0, 10)] == ["t1", "t2"]
    assert [e.seq for e in store.wallets()] == [2]


def test_finalize_rolls_back_everything_when_the_wallet_moved(store: BillingStore) -> None:
    store.invoice_create(draft("inv-1"))
    store.wallet_append([entry(1, "t1", "10", "10")])
    stale = entry(1, "invoice:inv-1", "-1", "9", kind="invoice")
    with pytest.raises(ConflictError):
        store.invoice_finalize(
            draft("inv-1"), 5, [stale], lambda n: FinalInvoice({}, {"json": b"{}"}, [event("e1")])
        )
    row = store.invoice_get("inv-1")
    assert row is not None
    assert (row.status, row.renditions) == ("draft", {})
    assert store.outbox_claim("hook", 10, 10) == []


def test_job_commit_writes_state_and_events_once(store: BillingStore) -> None:
    store.job_commit({"meter/a": {"fired": ["x"]}}, [event("e1"), event("e1", "file")], None, 1)
    store.job_commit({"meter/a": {"fired": ["x", "y"]}}, [event("e1"), event("e2")], None, 2)
    assert store.job_state("meter/") == {"meter/a": {"fired": ["x", "y"]}}
    assert [i.event_id for i in store.outbox_claim("hook", 10, 10)] == ["e1", "e2"]
    store.job_commit({"meter/a": None}, [], None, 3)
    assert store.job_state("meter/") == {}


def test_outbox_bookkeeping(store: BillingStore) -> None:
    store.job_commit({}, [event("e1"), event("e2"), event("e3")], None, 1)
    first, second, third = store.outbox_claim("hook", 10, 10)
    store.outbox_failed("hook", first.seq, "connection refused", 50, 10)
    store.outbox_delivered("hook", [second.seq], 11)
    store.outbox_failed("hook", third.seq, "410 gone", None, 12)  # given up
    assert store.outbox_claim("hook", 49, 10) == []
    (again,) = store.outbox_claim("hook", 50, 10)
    assert (again.event_id, again.attempts, again.last_error) == ("e1", 1, "connection refused")
    (stats,) = store.outbox_stats()
    assert (stats.exporter, stats.pending, stats.oldest_pending_ns, stats.dead) == ("hook", 1, 5, 1)
    assert store.outbox_purge(12) == 1
    store.outbox_delivered("hook", [again.seq], 60)
    assert store.outbox_stats()[0].pending == 0


def test_a_wallet_append_holding_one_entry_twice_writes_nothing(store: BillingStore) -> None:
    # SQLite numbered entries by ``entries.index(e)``: the second of two equal entries counted
    # as the first, so the call answered False (a retry) after writing the first one.
    e = entry(1, "t1", "10", "10")
    with pytest.raises(ConflictError, match="already recorded"):
        store.wallet_append([e, e])
    assert store.wallet_last("c1", "USD") is None


def test_a_later_entry_already_recorded_rolls_the_whole_append_back(store: BillingStore) -> None:
    assert store.wallet_append([entry(1, "t1", "10", "10")])
    with pytest.raises(ConflictError, match="'t1' already recorded"):
        store.wallet_append([entry(2, "t2", "1", "11"), entry(3, "t1", "1", "12")])
    assert [e.entry_id for e in store.wallet_entries("c1", "USD", 0, 10)] == ["t1"]


def test_only_a_taken_id_is_a_conflict_other_constraints_are_not(store: BillingStore) -> None:
    bad = InvoiceRow("inv-1", None, "draft", 1, None, {}, {})  # type: ignore[arg-type]
    with pytest.raises(Exception, match=r"(?i)not.null") as raised:
        store.invoice_create(bad)
    assert not isinstance(raised.value, ConflictError)
    assert store.invoice_get("inv-1") is None


def test_a_failed_delivery_keeps_its_error_as_text_the_store_can_hold(store: BillingStore) -> None:
    store.job_commit({}, [event("e1")], None, 1)
    (item,) = store.outbox_claim("hook", 10, 10)
    store.outbox_failed("hook", item.seq, "bad\x00byte " + "x" * 3000, 20, 10)
    (again,) = store.outbox_claim("hook", 20, 10)
    assert again.last_error is not None
    assert len(again.last_error) == 2000
    assert again.last_error.startswith(("bad\x00byte", "bad\ufffdbyte"))  # PostgreSQL: no NUL


def test_the_catalog_version_is_kept_by_the_database(reopen: Opener) -> None:
    s: CatalogStore = reopen()
    v = s.catalog_version()
    s.catalog_put("customers", "c1", {"id": "c1"}, expect_version=v)
    with s.catalog_lock():
        s.catalog_put("customers", "c2", {"id": "c2"}, expect_version=v + 1)
    again = reopen()  # SQLite counted it in memory from 0 at open
    assert again.catalog_version() == v + 2
    with pytest.raises(ConflictError, match="catalog changed"):
        again.catalog_delete("customers", "c1", expect_version=v)
    assert again.catalog_load() == {"customers": {"c1": {"id": "c1"}, "c2": {"id": "c2"}}}


def test_fenced_job_commits_hold_only_for_the_lease_holder(store: Store) -> None:
    leases: LeaseStore = store
    billing: BillingStore = store
    assert leases.lease("meters", "a", 15 * SEC, NOW)
    billing.job_commit({"m/1": {"period": 1}}, [event("e1")], ("meters", "a"), NOW + SEC)
    assert leases.lease("meters", "b", 15 * SEC, NOW + 16 * SEC)  # a's lease expired
    if type(store).__name__ == "PostgresStore":
        with pytest.raises(LeaseLostError, match="held by 'b'"):
            billing.job_commit({"m/1": {"period": 2}}, [], ("meters", "a"), NOW + 16 * SEC)
        leases.release("meters", "b")
        with pytest.raises(LeaseLostError, match="absent"):
            billing.job_commit({"m/1": {"period": 2}}, [], ("meters", "b"), NOW + 17 * SEC)
    else:  # SQLite: one process owns the database (its lock file), so it holds every lease
        assert leases.lease("meters", "a", 15 * SEC, NOW + 16 * SEC)
    assert billing.job_state("m/") == {"m/1": {"period": 1}}
