"""SQLiteStore's two-stage commit: a group prepared while another is in flight sees it as
committed, and a failed transaction voids every group prepared on top of it."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meter_gateway.model import Batch, SeriesMetadata, Source, UsageRecord
from meter_gateway.store.sqlite import SQLiteStore
from tests.helpers import NS, rec, ts

NOW = ts("2026-05-01T13:00:00")


def batch(*records: UsageRecord) -> Batch:
    return Batch(Source.REST, list(records))


def apply_failing(store: SQLiteStore, group: Any) -> None:
    """Apply ``group`` while another connection holds the write lock past the busy timeout, so
    its transaction fails."""
    store._conn.execute("PRAGMA busy_timeout=0")
    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sqlite3.OperationalError):
            store.apply(group)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(str(tmp_path / "p.db"), 86400, NOW)
    yield s
    s.close()


def test_prepared_groups_build_on_each_other(store: SQLiteStore) -> None:
    meta = SeriesMetadata(metric="m", attributes={"tenant": "a"})
    first = rec("2026-05-01T12:00:00", "1.5", rid="a")
    first.metadata = meta
    second = rec("2026-05-01T12:30:00", "2", rid="b")
    second.metadata = meta
    p1 = store.prepare([batch(first)], NOW)
    # prepared before p1 committed: the same id is a duplicate, the rollup adds on p1's
    p2 = store.prepare([batch(rec("2026-05-01T12:00:00", "1.5", rid="a"), second)], NOW)
    assert store.apply(p1)[0].accepted == 1
    (r2,) = store.apply(p2)
    assert (r2.accepted, r2.duplicates) == (1, 1)
    (row,) = store.rollups("c1", "d1", ts("2026-05-01T12:00:00"), ts("2026-05-01T13:00:00"))
    assert (row.count, row.sum, row.last_value) == (2, Decimal("3.5"), Decimal(2))
    got = store.records("c1", "d1", 0, NOW, None, 10)
    assert [r.seq for r in got] == [1, 2]
    assert [r.metadata for r in got] == [meta, meta]
    assert store._reader().execute("SELECT count(*) FROM metadata").fetchone()[0] == 1


def test_a_failed_commit_voids_the_groups_prepared_on_it(store: SQLiteStore) -> None:
    p1 = store.prepare([batch(rec("2026-05-01T12:00:00", "1", rid="a"))], NOW)
    p2 = store.prepare([batch(rec("2026-05-01T12:10:00", "2", rid="b"))], NOW)
    apply_failing(store, p1)
    with pytest.raises(RuntimeError, match="void"):
        store.apply(p2)
    # Nothing of either moved: both ids are new again, sequence numbers start over.
    (r,) = store.commit([batch(rec("2026-05-01T12:00:00", "1", rid="a"))], NOW)
    assert r.accepted == 1
    (r,) = store.commit([batch(rec("2026-05-01T12:10:00", "2", rid="b"))], NOW + NS)
    assert r.accepted == 1
    assert [x.seq for x in store.records("c1", "d1", 0, NOW, None, 10)] == [1, 2]
    (row,) = store.rollups("c1", "d1", ts("2026-05-01T12:00:00"), ts("2026-05-01T13:00:00"))
    assert (row.count, row.sum) == (2, Decimal(3))


def test_a_committed_group_survives_a_failure_of_the_next_before_memory_moved(
    store: SQLiteStore,
) -> None:
    # apply only commits; memory moves at the next prepare. A failure in between must keep
    # what the committed group did (its id stays a duplicate, its seq stays taken).
    p1 = store.prepare([batch(rec("2026-05-01T12:00:00", "1", rid="a"))], NOW)
    p2 = store.prepare([batch(rec("2026-05-01T12:10:00", "2", rid="b"))], NOW)
    store.apply(p1)
    apply_failing(store, p2)
    (again,) = store.commit([batch(rec("2026-05-01T12:00:00", "1", rid="a"))], NOW)
    assert (again.accepted, again.duplicates) == (0, 1)
    (retried,) = store.commit([batch(rec("2026-05-01T12:10:00", "2", rid="b"))], NOW)
    assert retried.accepted == 1
    assert [(x.seq, x.record_id) for x in store.records("c1", "d1", 0, NOW, None, 10)] == [
        (1, "a"),
        (2, "b"),
    ]
    (row,) = store.rollups("c1", "d1", ts("2026-05-01T12:00:00"), ts("2026-05-01T13:00:00"))
    assert (row.count, row.sum, row.last_seq) == (2, Decimal(3), 2)


@pytest.mark.parametrize("layout", ["lean", "full", "mixed sources", "full, mixed sources"])
def test_every_row_layout_stores_every_field(store: SQLiteStore, layout: str) -> None:
    """A group's rows leave out record ids and metadata when none has any, and the source when
    all share one; whichever layout a group gets, each record reads back as it was."""
    meta = SeriesMetadata(metric="m", attributes={"tenant": "a"})
    records = []
    for i, source in enumerate([Source.OTLP, Source.VECTOR, Source.OTLP]):
        r = rec(f"2026-05-01T12:0{i}:00", f"{i}.25", customer=f"c{i}")
        r.source = source if "mixed" in layout else Source.OTLP
        r.metadata = meta
        r.dedup_key = bytes([i]) * 16
        records.append(r)
    if "full" in layout:
        records[1].record_id = "rid-1"
        records[1].metadata = {"own": {"n": 1}}
    store.commit([Batch(Source.OTLP, records[:2]), Batch(Source.OTLP, records[2:])], NOW)
    got = {r.customer_id: r for r in store.records(None, None, 0, NOW, None, 10)}
    assert [got[f"c{i}"].seq for i in range(3)] == [1, 2, 3]
    for r in records:
        g = got[r.customer_id]
        assert (g.timestamp_ns, g.dimension_id, g.value, g.source, g.received_ns) == (
            r.timestamp_ns,
            r.dimension_id,
            r.value,
            r.source.value,
            NOW,
        )
        assert (g.record_id, g.metadata) == (r.record_id, r.metadata)


def test_a_reopened_store_finds_shared_metadata_in_a_few_queries(tmp_path: Path) -> None:
    """Series metadata stored before is found by its digest, not stored twice, and a group of
    many series seen before looks them up in batches (a query per 500), not one each."""
    path = str(tmp_path / "m.db")
    t = ts("2026-05-01T12:00:00")
    metas = [SeriesMetadata(metric="m", attributes={"pod": f"p{i}"}) for i in range(1_200)]

    def one(customer: str, value: int, meta: SeriesMetadata) -> UsageRecord:
        # an equal copy: a new object, as a restarted receiver would hand
        copy = SeriesMetadata(meta)
        return UsageRecord(t, customer, "d", Decimal(value), None, copy, Source.REMOTE_WRITE)

    def group(value: int) -> Batch:
        return batch(*(one(f"c{i}", value, m) for i, m in enumerate(metas)))

    s = SQLiteStore(path, 86400, NOW)
    s.commit([group(1)], NOW)
    s.close()
    s = SQLiteStore(path, 86400, NOW)
    try:
        lookups: list[str] = []
        s._prep.set_trace_callback(lambda sql: lookups.append(sql) if "metadata" in sql else None)
        fresh = SeriesMetadata(metric="m", attributes={"pod": "new"})
        s.commit([group(2), batch(one("c-new", 3, fresh))], NOW)
        assert len(lookups) == 3  # 1,201 digests, 500 a query
        rows = s._conn.execute("SELECT count(*), count(DISTINCT digest) FROM metadata")
        assert rows.fetchone() == (1_201, 1_201)
        pairs = s._conn.execute(
            "SELECT count(DISTINCT meta_id), count(*) FROM records WHERE customer != 'c-new'"
        ).fetchone()
        assert pairs == (1_200, 2_400)  # each series' two records share its one row
    finally:
        s.close()
