"""The billing part of the store protocol, against the SQLite store: invoices, wallet ledger,
job state with outbox events, outbox delivery bookkeeping."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal as D
from pathlib import Path

import pytest

from meter_gateway.store.base import ConflictError, InvoiceRow, LedgerEntry, OutboxEvent
from meter_gateway.store.sqlite import SQLiteStore
from tests.helpers import open_store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = open_store(tmp_path)
    yield s
    s.close()


def draft(id_: str, customer: str = "c1", created: int = 1) -> InvoiceRow:
    return InvoiceRow(id_, customer, "draft", created, None, {"total": "1.00"}, {})


def entry(seq: int, entry_id: str, amount: str, balance: str, kind: str = "top_up") -> LedgerEntry:
    return LedgerEntry("c1", "USD", seq, entry_id, kind, D(amount), D(balance), seq * 10)


def event(eid: str, exporter: str = "hook") -> OutboxEvent:
    return OutboxEvent(exporter, eid, "threshold_reached", b'{"id":"' + eid.encode() + b'"}', 5)


def test_a_finalized_invoice_keeps_its_bytes_and_cannot_be_finalized_or_redrafted(
    store: SQLiteStore,
) -> None:
    store.invoice_create(draft("inv-1"))
    with pytest.raises(ConflictError):
        store.invoice_create(draft("inv-1"))
    assert store.invoice_update_draft("inv-1", {"total": "2.00"})
    done = store.invoice_finalize(
        "inv-1", {"total": "2.00"}, {"json": b"{}\n", "csv": b"a,b\r\n"}, 99, [], [event("e1")]
    )
    assert done
    assert not store.invoice_finalize("inv-1", {"total": "3"}, {"json": b"x"}, 100, [], [])
    assert not store.invoice_update_draft("inv-1", {"total": "4.00"})
    row = store.invoice_get("inv-1")
    assert row is not None
    assert (row.status, row.finalized_ns, row.document) == ("finalized", 99, {"total": "2.00"})
    assert row.renditions == {"json": b"{}\n", "csv": b"a,b\r\n"}
    assert [i.event_id for i in store.outbox_claim("hook", 10, 10)] == ["e1"]


def test_invoices_list_by_customer_in_creation_order_with_a_cursor(store: SQLiteStore) -> None:
    for i, cust in enumerate(["c1", "c2", "c1", "c1"]):
        store.invoice_create(draft(f"inv-{i}", cust, created=100 - i))
    rows = store.invoice_list("c1", None, 2)
    assert [r.id for r in rows] == ["inv-3", "inv-2"]
    assert all(r.renditions == {} for r in rows)
    more = store.invoice_list("c1", (rows[-1].created_ns, rows[-1].id), 10)
    assert [r.id for r in more] == ["inv-0"]
    assert len(store.invoice_list(None, None, 10)) == 4


def test_wallet_entries_are_sequential_idempotent_and_exact(store: SQLiteStore) -> None:
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


def test_finalize_rolls_back_everything_when_the_wallet_moved(store: SQLiteStore) -> None:
    store.invoice_create(draft("inv-1"))
    store.wallet_append([entry(1, "t1", "10", "10")])
    stale = entry(1, "invoice:inv-1", "-1", "9", kind="invoice")
    with pytest.raises(ConflictError):
        store.invoice_finalize("inv-1", {}, {"json": b"{}"}, 5, [stale], [event("e1")])
    row = store.invoice_get("inv-1")
    assert row is not None
    assert (row.status, row.renditions) == ("draft", {})
    assert store.outbox_claim("hook", 10, 10) == []


def test_job_commit_writes_state_and_events_once(store: SQLiteStore) -> None:
    store.job_commit({"meter/a": {"fired": ["x"]}}, [event("e1"), event("e1", "file")], None, 1)
    store.job_commit({"meter/a": {"fired": ["x", "y"]}}, [event("e1"), event("e2")], None, 2)
    assert store.job_state("meter/") == {"meter/a": {"fired": ["x", "y"]}}
    assert [i.event_id for i in store.outbox_claim("hook", 10, 10)] == ["e1", "e2"]
    store.job_commit({"meter/a": None}, [], None, 3)
    assert store.job_state("meter/") == {}


def test_outbox_bookkeeping(store: SQLiteStore) -> None:
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
