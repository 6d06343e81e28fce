"""A period sweep (``store.base.sweeping``: the period gauges rating every customer) reads
the PostgreSQL store in blocks of customers: every read must answer exactly what it answers
alone, whatever a block holds, cuts or leaves out, and only in the sweep's own context."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest

from meter_gateway.model import Batch, Source
from meter_gateway.store import postgres
from meter_gateway.store.base import READ_SWEEP, sweeping
from meter_gateway.store.postgres import PostgresStore
from tests import pgdb
from tests.helpers import rec, ts

NOW = ts("2026-05-02T00:00:00")
WINDOW_S = 35 * 86400
LO, HI = ts("2026-05-01T00:00:00"), ts("2026-05-02T00:00:00")
CUT = ts("2026-05-01T11:30:00")  # inside an hour: raw reads end there
# byte order differs from a naive one: 'Z' < 'a' < 'é'; one customer without any usage of d2
CUSTOMERS = ["a", "b é", "c", "Zed", "é", "c\\q", 'q"u']


@pytest.fixture
def store() -> Iterator[PostgresStore]:
    url = pgdb.create_database()
    s = PostgresStore(url, WINDOW_S, NOW, pool_min=1, pool_max=4)
    records = []
    for k, c in enumerate(CUSTOMERS):
        for i in range(3 + k):
            for d in ("d1", "d2") if c != "c" else ("d1",):
                records.append(
                    replace(
                        rec(
                            f"2026-05-01T{10 + i % 3}:{i * 7 % 60:02d}:00",
                            f"{k}.{i}",
                            c,
                            d,
                            unique=f"u{i % 2}",
                        ),
                        metadata={"user": f"u{i % 2}"},
                    )
                )
    s.commit([Batch(Source.REST, records)], NOW)
    yield s
    s.close()
    pgdb.drop_database(url)


def reads(store: PostgresStore, customer: str, dimension: str) -> list[Any]:
    return [
        store.pairs(customer, None, HI),
        store.pairs(customer, dimension, HI),
        store.rollups(customer, dimension, LO, HI),
        *(store.rollup_column(customer, dimension, LO, HI, c) for c in ("count", "sum", "max")),
        store.raw(customer, dimension, LO, CUT),
        store.raw(customer, dimension, LO, CUT, "user"),
        sorted(store.distinct(customer, dimension, LO, HI)),
    ]


@contextmanager
def counting(store: PostgresStore) -> Iterator[list[int]]:
    """The statements ``store`` runs meanwhile: ``[n]``, read after the block."""
    calls = [0]
    exec_ = store._exec

    def counted(*args: Any) -> Any:
        calls[0] += 1
        return exec_(*args)

    store._exec = counted  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        del store._exec  # type: ignore[method-assign]


def sweep(store: PostgresStore, keys: list[tuple[str, str]]) -> tuple[list[Any], int]:
    """``reads`` of each key inside a sweep (after its pairs() of all pairs); statements run."""
    with counting(store) as calls:
        token = READ_SWEEP.set({})
        try:
            assert store.pairs(None, None, HI) == sorted(store.pairs(None, None, HI))
            return [reads(store, c, d) for c, d in keys], calls[0]
        finally:
            READ_SWEEP.reset(token)


KEYS = [(c, d) for c in sorted(CUSTOMERS) for d in ("d1", "d2", "d3")] + [("nobody", "d1")]


def test_a_sweep_answers_what_each_read_answers_alone_in_fewer_statements(
    store: PostgresStore,
) -> None:
    alone = [reads(store, c, d) for c, d in KEYS]
    assert sum(len(r[2]) for r in alone) > 0
    assert sum(len(r[6]) for r in alone) > 0
    swept, statements = sweep(store, KEYS)
    assert swept == alone
    # seven reads: one block each for d1 and d2; pairs without usage (all of d3, c's d2,
    # nobody's d1) are read alone
    without = [k for k, r in zip(KEYS, alone, strict=True) if not r[1]]
    assert len(without) == 7 + 1 + 1
    assert statements == 7 * 2 + 7 * len(without)


def test_blocks_cut_by_their_row_limit_or_size_still_answer_exactly(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    alone = [reads(store, c, d) for c, d in KEYS]
    for customers, rows in ((2, 50_000), (200, 5), (200, 1), (1, 1)):
        monkeypatch.setattr(postgres, "SWEEP_CUSTOMERS", customers)
        monkeypatch.setattr(postgres, "SWEEP_ROWS", rows)
        assert sweep(store, KEYS)[0] == alone, (customers, rows)


def test_a_pair_the_sweep_did_not_know_is_read_alone(store: PostgresStore) -> None:
    token = READ_SWEEP.set({})
    try:
        assert ("late", "d1") not in store.pairs(None, None, HI)
        assert store.rollups("a", "d1", LO, HI)  # a block of d1 read
        store.commit([Batch(Source.REST, [rec("2026-05-01T10:00:00", "5", "late")])], NOW)
        assert [r.sum for r in store.rollups("late", "d1", LO, HI)] == [5]
        # what the sweep read stays its answer: one rating at one instant
        assert store.pairs("late", None, HI) == []
    finally:
        READ_SWEEP.reset(token)
    assert store.pairs("late", None, HI) == [("late", "d1")]


def test_reads_outside_the_sweeps_context_see_every_commit(store: PostgresStore) -> None:
    seen: list[Any] = []
    token = READ_SWEEP.set({})
    try:
        store.pairs(None, None, HI)
        before = store.rollups("a", "d1", LO, HI)

        def other_thread() -> None:  # a request served meanwhile, in its own context
            store.commit([Batch(Source.REST, [rec("2026-05-01T10:00:00", "1", "a")])], NOW)
            seen.append(store.rollups("a", "d1", LO, HI))
            seen.append(store.pairs("a", None, HI))

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert store.rollups("a", "d1", LO, HI) == before  # the sweep's block
    finally:
        READ_SWEEP.reset(token)
    assert seen[0][0].count == before[0].count + 1
    assert seen[0] == store.rollups("a", "d1", LO, HI)
    assert seen[1] == [("a", "d1"), ("a", "d2")]


def test_a_split_hour_is_read_in_blocks_and_answers_what_it_answers_alone(
    store: PostgresStore,
) -> None:
    """``split_tail`` (the hour ``as_of`` cuts: its cell and its later records) goes through the
    sweep's blocks like the other reads: the same answers, a statement per block."""
    hour = CUT - CUT % 3_600_000_000_000

    def tails(s: PostgresStore) -> list[Any]:
        return [
            s.split_tail(c, d, hour, CUT, column)
            for column in ("count", "sum", "max")
            for c, d in KEYS
        ]

    alone = tails(store)
    assert any(t is not None and t[1] for t in alone)  # some hour has records after CUT
    with counting(store) as calls, sweeping():
        store.pairs(None, None, HI)
        assert tails(store) == alone
    # per column, one block each for d1 and d2, and the nine pairs without usage alone (as the
    # other reads: see the first test), against 22 statements each without the sweep
    assert calls[0] == 3 * (2 + 9)
    assert len(alone) == 3 * 22
