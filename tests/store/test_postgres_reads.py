"""The PostgreSQL store's hot reads (rollups, a rollup column, raw points, distinct values) go
as statements prepared per connection straight through libpq: they must answer exactly what a
query through psycopg answers, on every pooled connection, and nothing for keys no row can
hold."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal

import psycopg
import pytest

from meter_gateway.model import Batch, Source
from meter_gateway.store.base import RawPoint, RollupRow
from meter_gateway.store.postgres import PostgresStore
from tests import pgdb
from tests.helpers import rec, ts

NOW = ts("2026-05-02T00:00:00")
WINDOW_S = 35 * 86400
VALUES = ["1", "-0.000000000001", "12345678901234567890.123456789", "1E+3", "0", "7.50"]


@pytest.fixture
def url() -> Iterator[str]:
    u = pgdb.create_database()
    yield u
    pgdb.drop_database(u)


@pytest.fixture
def store(url: str) -> Iterator[PostgresStore]:
    s = PostgresStore(url, WINDOW_S, NOW, pool_min=1, pool_max=4)
    records = [
        replace(
            rec(f"2026-05-01T{10 + i % 2}:{i:02d}:00", v, customer="c é", unique=f"u{i % 3} é"),
            metadata={"user": f"u{i % 3}"},
        )
        for i, v in enumerate(VALUES)
    ]
    s.commit([Batch(Source.REST, records)], NOW)
    yield s
    s.close()


def through_psycopg(url: str, sql: str, args: tuple[object, ...]) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, args).fetchall()


def test_reads_answer_what_psycopg_answers(store: PostgresStore, url: str) -> None:
    lo, hi = ts("2026-05-01T00:00:00"), ts("2026-05-02T00:00:00")
    rows = through_psycopg(
        url,
        "SELECT bucket, count, sum, min, max, last_ts, last_seq, last_value, wsum FROM rollups "
        "WHERE customer = %s AND dimension = %s ORDER BY bucket",
        ("c é", "d1"),
    )
    assert len(rows) == 2
    assert store.rollups("c é", "d1", lo, hi) == [RollupRow(*r) for r in rows]  # type: ignore[arg-type]
    for column, i in (("count", 1), ("sum", 2), ("min", 3), ("max", 4)):
        got = store.rollup_column("c é", "d1", lo, hi, column)  # type: ignore[arg-type]
        assert got == [(r[0], r[i]) for r in rows]
        assert [type(v) for _, v in got] == [int if column == "count" else Decimal] * 2
    points = through_psycopg(
        url,
        "SELECT ts, seq, value, metadata FROM records WHERE customer = %s ORDER BY ts, seq",
        ("c é",),
    )
    assert store.raw("c é", "d1", lo, hi) == [RawPoint(t, s, v, None) for t, s, v, _ in points]  # type: ignore[arg-type]
    by_time = sorted(range(len(VALUES)), key=lambda i: (i % 2, i))  # hour 10, then 11
    assert [p.unique for p in store.raw("c é", "d1", lo, hi, "user")] == [
        f"u{i % 3}" for i in by_time
    ]
    assert [p.value for p in store.raw("c é", "d1", lo, hi)] == [
        Decimal(VALUES[i]) for i in by_time
    ]
    hour = ts("2026-05-01T10:00:00")
    assert sorted(store.distinct("c é", "d1", lo, hi)) == sorted(
        through_psycopg(url, "SELECT bucket, value FROM rollup_distinct", ())  # type: ignore[arg-type]
    )
    assert sorted(store.distinct("c é", "d1", hour, hour + 3600 * 10**9)) == [
        (hour, "u0 é"),
        (hour, "u1 é"),
        (hour, "u2 é"),
    ]
    # the range is half open, on buckets and on times
    assert len(store.rollups("c é", "d1", lo, ts("2026-05-01T11:00:00"))) == 1
    assert len(store.raw("c é", "d1", lo, points[1][0])) == 1  # type: ignore[arg-type]


def test_keys_no_row_can_hold_find_nothing(store: PostgresStore) -> None:
    for customer, dimension in (("c é\x00", "d1"), ("c é", "d1\x00"), ("nobody", "d1")):
        assert store.rollups(customer, dimension, 0, 2**62) == []
        assert store.rollup_column(customer, dimension, 0, 2**62, "sum") == []
        assert store.raw(customer, dimension, 0, 2**62) == []
        assert store.raw(customer, dimension, 0, 2**62, "user") == []
        assert store.distinct(customer, dimension, 0, 2**62) == []


def test_every_pooled_connection_prepares_its_own_and_reads_run_concurrently(
    store: PostgresStore,
) -> None:
    want = store.rollups("c é", "d1", 0, 2**62)
    failures: list[BaseException] = []
    barrier = threading.Barrier(6)

    def reader() -> None:
        try:
            barrier.wait()
            for _ in range(50):
                assert store.rollups("c é", "d1", 0, 2**62) == want
                assert len(store.raw("c é", "d1", 0, 2**62, "user")) == len(VALUES)
        except BaseException as exc:  # reported by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert store._pool.get_stats()["pool_size"] > 1  # several connections prepared their own


def test_a_database_error_in_a_read_is_psycopgs_error(store: PostgresStore, url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER TABLE rollups RENAME TO rollups_gone")
        try:
            with pytest.raises(psycopg.errors.UndefinedTable):
                PostgresStore.rollups(store, "c é", "d1", 0, 2**62)
        finally:
            conn.execute("ALTER TABLE rollups_gone RENAME TO rollups")


def test_reads_prepare_again_after_their_statements_are_deallocated(url: str) -> None:
    """psycopg deallocates every prepared statement of a connection after a ROLLBACK, a
    rollback to a savepoint (a dedup copy that met a known key) included."""
    store = PostgresStore(url, WINDOW_S, NOW, pool_min=1, pool_max=1)
    try:
        store.commit([Batch(Source.REST, [rec("2026-05-01T10:00:00", "1", rid="a")])], NOW)
        want = store.rollups("c1", "d1", 0, 2**62)
        assert [r.count for r in want] == [1]
        with store._conn() as conn:
            conn.execute("DEALLOCATE ALL")
        assert store.rollups("c1", "d1", 0, 2**62) == want
        # a known key: the copy rolls back to its savepoint, psycopg then deallocates all
        [r] = store.commit([Batch(Source.REST, [rec("2026-05-01T10:00:00", "1", rid="a")])], NOW)
        assert r.duplicates == 1
        store.commit([Batch(Source.REST, [rec("2026-05-01T10:00:00", "2", rid="b")])], NOW)
        assert [r.count for r in store.rollups("c1", "d1", 0, 2**62)] == [2]
        assert [p.value for p in store.raw("c1", "d1", 0, 2**62)] == [1, 2]
    finally:
        store.close()
