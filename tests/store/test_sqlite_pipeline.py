"""SQLiteStore's two-stage commit: a group prepared while another is in flight sees it as
committed, and a failed transaction voids every group prepared on top of it."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from meter_gateway.model import Batch, SeriesMetadata, Source, UsageRecord
from meter_gateway.store.sqlite import SQLiteStore
from tests.helpers import NS, rec, ts

NOW = ts("2026-05-01T13:00:00")


def batch(*records: UsageRecord) -> Batch:
    return Batch(Source.REST, list(records))


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
    # Another connection holds the write lock past the busy timeout: p1's transaction fails.
    store._conn.execute("PRAGMA busy_timeout=0")
    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError):
        store.apply(p1)
    blocker.execute("ROLLBACK")
    blocker.close()
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
