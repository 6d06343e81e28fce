"""SQLite's rollups are merged after each commit and written behind it (migration 11): reads
see every answered commit, a crash before a flush loses nothing (the records past the mark are
merged again at open), and a failed flush costs a retry, not a number."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter_gateway.decimals import EXACT
from meter_gateway.model import Batch, Source, UsageRecord
from meter_gateway.store import sqlite as sqlite_store
from meter_gateway.store.base import RollupRow
from meter_gateway.store.sqlite import SQLiteStore
from meter_gateway.timebuckets import BUCKET_NS
from tests.helpers import rec, sqlite_at_version, ts

NOW = ts("2026-05-01T13:00:00")
DAY = (ts("2026-05-01T00:00:00"), ts("2026-05-02T00:00:00"))


def open_at(path: Path) -> SQLiteStore:
    return SQLiteStore(str(path / "g.db"), 86400, NOW)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = open_at(tmp_path)
    yield s
    s.close()


def commit(s: SQLiteStore, *records: UsageRecord) -> None:
    (result,) = s.commit([Batch(Source.REST, list(records))], NOW)
    assert result.accepted == len(records)


def on_disk(path: Path) -> tuple[int, list[tuple[Any, ...]]]:
    """The mark and the rollup rows as the database holds them (another connection)."""
    conn = sqlite3.connect(path / "g.db")
    try:
        (mark,) = conn.execute("SELECT seq FROM rollups_upto").fetchone()
        rows = conn.execute(
            "SELECT customer, dimension, bucket, count, sum FROM rollups ORDER BY 1, 2, 3"
        ).fetchall()
    finally:
        conn.close()
    return int(mark), rows


def crash_image(src: Path, dst: Path) -> Path:
    """The files a kill -9 would leave now: each commit is fsynced, so a copy of the database
    and its WAL is what the next process opens."""
    dst.mkdir()
    for name in ("g.db", "g.db-wal"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return dst


def expected(records: list[UsageRecord]) -> dict[tuple[str, str, int], RollupRow]:
    """Every rollup row recomputed from the records, seqs 1.. in commit order."""
    out: dict[tuple[str, str, int], RollupRow] = {}
    for seq, r in enumerate(records, start=1):
        b = r.timestamp_ns - r.timestamp_ns % BUCKET_NS
        key = (r.customer_id, r.dimension_id, b)
        w = EXACT.multiply(r.value, Decimal(b + BUCKET_NS - r.timestamp_ns))
        old = out.get(key)
        if old is None:
            out[key] = RollupRow(b, 1, r.value, r.value, r.value, r.timestamp_ns, seq, r.value, w)
            continue
        later = (r.timestamp_ns, seq) > (old.last_ts, old.last_seq)
        out[key] = RollupRow(
            b,
            old.count + 1,
            EXACT.add(old.sum, r.value),
            min(old.min, r.value),
            max(old.max, r.value),
            r.timestamp_ns if later else old.last_ts,
            seq if later else old.last_seq,
            r.value if later else old.last_value,
            EXACT.add(old.wsum, w),
        )
    return out


def read_all(s: SQLiteStore) -> dict[tuple[str, str, int], RollupRow]:
    return {
        (c, d, row.bucket_ns): row
        for c in ("c1", "c2")
        for d in ("d1", "d2")
        for row in s.rollups(c, d, *DAY)
    }


def test_a_read_sees_every_commit_the_database_has_not_yet(
    store: SQLiteStore, tmp_path: Path
) -> None:
    commit(store, rec("2026-05-01T12:10:00", "2"), rec("2026-05-01T12:20:00", "3"))
    commit(store, rec("2026-05-01T12:30:00", "4", customer="c2"))
    assert on_disk(tmp_path) == (0, [])  # merged in memory, not written yet
    (row,) = store.rollups("c1", "d1", *DAY)
    assert (row.count, row.sum) == (2, Decimal(5))
    # the read wrote every merged row and moved the mark to the last record
    assert on_disk(tmp_path) == (
        3,
        [
            ("c1", "d1", ts("2026-05-01T12:00:00"), 2, "5"),
            ("c2", "d1", ts("2026-05-01T12:00:00"), 1, "4"),
        ],
    )


def test_rows_are_written_behind_once_enough_wait(
    store: SQLiteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit(store, rec("2026-05-01T12:10:00", "2"))
    assert on_disk(tmp_path)[0] == 0
    monkeypatch.setattr(sqlite_store, "_ROLLUP_FLUSH_ROWS", 2)
    commit(store, rec("2026-05-01T12:10:00", "1", customer="c2"))  # two rows wait: written
    assert on_disk(tmp_path)[0] == 2
    monkeypatch.setattr(sqlite_store, "_ROLLUP_FLUSH_ROWS", 100)
    monkeypatch.setattr(sqlite_store, "_ROLLUP_FLUSH_S", 0.0)
    commit(store, rec("2026-05-01T12:40:00", "5"))  # one row, waited long enough: written
    assert on_disk(tmp_path) == (
        3,
        [
            ("c1", "d1", ts("2026-05-01T12:00:00"), 2, "7"),
            ("c2", "d1", ts("2026-05-01T12:00:00"), 1, "1"),
        ],
    )


def test_a_crash_before_the_flush_loses_nothing(tmp_path: Path) -> None:
    s = open_at(tmp_path / "a")
    records = [rec("2026-05-01T12:10:00", "2"), rec("2026-05-01T11:59:00", "7")]
    commit(s, *records)
    s.rollups("c1", "d1", *DAY)  # written up to seq 2
    more = [rec("2026-05-01T12:05:00", "1.5"), rec("2026-05-01T11:00:00", "3", dimension="d2")]
    commit(s, *more)  # merged, not written
    image = crash_image(tmp_path / "a", tmp_path / "b")
    s.close()
    assert on_disk(image)[0] == 2
    again = open_at(image)
    try:
        assert on_disk(image)[0] == 4  # replayed at open, written, marked
        assert read_all(again) == expected(records + more)
        commit(again, rec("2026-05-01T12:50:00", "1"))  # merges on the replayed rows
        assert read_all(again) == expected([*records, *more, rec("2026-05-01T12:50:00", "1")])
    finally:
        again.close()


def test_a_failed_merge_keeps_the_partials_for_the_next(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = rec("2026-05-01T12:10:00", "2")
    commit(store, first)
    store.rollups("c1", "d1", *DAY)
    real = SQLiteStore._merge_rollups
    calls = 0

    def failing_once(self: SQLiteStore, acc: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return real(self, acc)

    monkeypatch.setattr(SQLiteStore, "_merge_rollups", failing_once)
    failed = rec("2026-05-01T12:20:00", "3")
    commit(store, failed)
    with pytest.raises(sqlite3.OperationalError):
        store.rollups("c1", "d1", *DAY)  # reading the rows to merge with failed
    later = rec("2026-05-01T12:30:00", "4")
    commit(store, later)  # folded on the partials the failed flush kept
    assert read_all(store) == expected([first, failed, later])


def test_a_failed_flush_keeps_the_rows_for_the_next(
    store: SQLiteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = [rec("2026-05-01T12:10:00", "2"), rec("2026-05-01T12:20:00", "3", customer="c2")]
    commit(store, *records)
    monkeypatch.setattr(sqlite_store, "_ROLLUP_FLUSH_S", 0.0)
    store._conn.execute("PRAGMA busy_timeout=0")
    blocker = sqlite3.connect(tmp_path / "g.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        store.write_behind()  # logged, not raised: the commit it follows was answered
        with pytest.raises(sqlite3.OperationalError):
            store.rollups("c1", "d1", *DAY)  # a read that cannot be current says so
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert on_disk(tmp_path)[0] == 0
    assert read_all(store) == expected(records)
    assert on_disk(tmp_path)[0] == 2


def test_a_split_bucket_reads_the_records_its_rollup_holds(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit(store, rec("2026-05-01T12:10:00", "2"), rec("2026-05-01T12:40:00", "3"))
    store.rollups("c1", "d1", *DAY)
    commit(store, rec("2026-05-01T12:50:00", "100"))  # committed, its rows not written
    # as if this group had committed between the read's flush and its query
    monkeypatch.setattr(store, "_settle_rollups", lambda: None)
    cell, later = store.split_tail(
        "c1", "d1", ts("2026-05-01T12:00:00"), ts("2026-05-01T12:30:00"), "sum"
    )
    assert (cell, later) == (Decimal(5), [Decimal(3)])  # the part before 12:30 is 2


def test_migration_marks_the_rows_an_older_version_wrote(tmp_path: Path) -> None:
    conn = sqlite_at_version(tmp_path / "g.db", 10, [(1, ts("2026-05-01T12:10:00"), None)])
    conn.execute(
        "INSERT INTO rollups VALUES ('c1', 'd1', ?, 1, '1', '1', '1', ?, 1, '1', '1')",
        (ts("2026-05-01T12:00:00"), ts("2026-05-01T12:10:00")),
    )
    conn.close()
    s = open_at(tmp_path)
    try:
        (row,) = s.rollups("c1", "d1", *DAY)
        assert row.count == 1  # the record the row already held is not merged again
        assert on_disk(tmp_path)[0] == 1
    finally:
        s.close()


# --- generated: commits, flushes, reads and crashes against the records ------------------------

_TIMES = [f"2026-05-01T{h:02d}:{m:02d}:00" for h in (10, 11, 12) for m in (0, 15, 59)]
_RECORD = st.builds(
    lambda when, value, customer, dimension: rec(when, value, customer, dimension),
    st.sampled_from(_TIMES),
    st.sampled_from(["0", "1", "2.5", "7", "-3", "0.001"]),
    st.sampled_from(["c1", "c2"]),
    st.sampled_from(["d1", "d2"]),
)
_STEP = st.one_of(
    st.tuples(st.just("commit"), st.lists(_RECORD, min_size=1, max_size=6)),
    st.tuples(st.just("read"), st.none()),
    st.tuples(st.just("flush"), st.none()),
    st.tuples(st.just("crash"), st.none()),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=st.lists(_STEP, min_size=1, max_size=10))
def test_generated_steps_keep_the_rollups_exact(
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    steps: list[tuple[str, Any]],
) -> None:
    base = tmp_path_factory.mktemp("steps")
    monkeypatch.setattr(sqlite_store, "_ROLLUP_FLUSH_S", 3600.0)  # only the steps flush
    n = 0
    s = open_at(base / f"s{n}")
    committed: list[UsageRecord] = []
    try:
        for kind, arg in steps:
            if kind == "commit":
                commit(s, *arg)
                committed += arg
            elif kind == "read":
                assert read_all(s) == expected(committed)
            elif kind == "flush":
                with monkeypatch.context() as m:
                    m.setattr(sqlite_store, "_ROLLUP_FLUSH_S", 0.0)
                    s.write_behind()
            else:
                image = crash_image(base / f"s{n}", base / f"s{n + 1}")
                s.close()
                n += 1
                s = open_at(image)
        assert read_all(s) == expected(committed)
    finally:
        s.close()
