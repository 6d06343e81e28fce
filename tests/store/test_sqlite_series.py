"""SQLite numbers each (customer, dimension) once in ``series`` and indexes records by (series,
ts) (migration 10): every record of a pair carries the pair's one number, whichever way it came
(an old database migrated, a group still in flight, a store reopened), and reads by customer go
through that index."""

from __future__ import annotations

import sqlite3
from decimal import Decimal
from pathlib import Path

from meter_gateway.model import Batch, Source, UsageRecord, dedup_key
from meter_gateway.store import open_store
from meter_gateway.store import sqlite as sqlite_store
from tests.helpers import sqlite_at_version, ts

NOW = ts("2026-05-02T00:00:00")
BASE = ts("2026-05-01T00:00:00")
MIN = 60 * 1_000_000_000
WINDOW_S = 35 * 86400


def rec(rid: str, minute: int, customer: str, dim: str, value: int = 1) -> UsageRecord:
    return UsageRecord(
        BASE + minute * MIN, customer, dim, Decimal(value), rid, None, Source.REST,
        dedup_key("id", rid),
    )  # fmt: skip


def numbering(path: Path) -> tuple[dict[tuple[str, str], int], list[tuple[str, str, int]]]:
    """The ``series`` table as a dict, and every record's (customer, dimension, series)."""
    conn = sqlite3.connect(path)
    try:
        pairs = {
            (c, d): i for i, c, d in conn.execute("SELECT id, customer, dimension FROM series")
        }
        rows = conn.execute("SELECT customer, dimension, series FROM records ORDER BY seq")
        return pairs, [(c, d, s) for c, d, s in rows]
    finally:
        conn.close()


def assert_consistent(path: Path) -> dict[tuple[str, str], int]:
    pairs, rows = numbering(path)
    assert len(set(pairs.values())) == len(pairs)  # one number a pair
    assert all(pairs[(c, d)] == s for c, d, s in rows)  # every record its pair's number
    return pairs


def open_sqlite(path: Path) -> sqlite_store.SQLiteStore:
    s = open_store(f"sqlite:///{path}", WINDOW_S, NOW)
    assert isinstance(s, sqlite_store.SQLiteStore)
    return s


def test_a_version_9_database_gets_its_pairs_numbered_and_read_by_them(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite_at_version(path, 9, [(1, BASE + 5 * MIN, "x"), (2, BASE + 1 * MIN, "y")])
    conn.execute("INSERT INTO records VALUES (3, ?, 'c2', 'd1', '7', 'z', NULL, 'rest', 0, NULL)",
                 (BASE + 2 * MIN,))  # fmt: skip
    conn.close()
    s = open_sqlite(path)
    try:
        assert set(assert_consistent(path)) == {("c1", "d1"), ("c2", "d1")}
        assert [p.seq for p in s.raw("c1", "d1", 0, 2**62)] == [2, 1]
        before = s.last_before("c1", "d1", BASE + 3 * MIN)
        assert before is not None
        assert before.seq == 2
        assert [r.record_id for r in s.records("c2", None, 0, 2**62, None, 10)] == ["z"]
        # records of a migrated pair take its number; a new pair gets the next one
        s.commit([Batch(Source.REST, [rec("n1", 0, "c1", "d1"), rec("n2", 0, "c3", "d1")])], NOW)
        pairs = assert_consistent(path)
        assert pairs[("c3", "d1")] == max(pairs.values())
        assert s.raw("c1", "d1", 0, 2**62)[0].seq == 4  # minute 0: the new one
    finally:
        s.close()


def test_groups_in_flight_share_a_new_pairs_number(tmp_path: Path) -> None:
    """The second group is prepared while the first, which numbered the pair, is not yet
    committed: both use its number, and the pair is stored once."""
    path = tmp_path / "s.db"
    s = open_sqlite(path)
    try:
        first = s.prepare([Batch(Source.REST, [rec("a", 1, "c1", "d1")])], NOW)
        second = s.prepare(
            [Batch(Source.REST, [rec("b", 2, "c1", "d1"), rec("c", 3, "c1", "d2")])], NOW
        )
        assert [sid for sid, _, _ in first.series_new] == [1]
        assert [sid for sid, _, _ in second.series_new] == [2]  # d2 only: d1 is in flight
        s.apply(first)
        s.apply(second)
        assert assert_consistent(path) == {("c1", "d1"): 1, ("c1", "d2"): 2}
        assert [p.seq for p in s.raw("c1", "d1", 0, 2**62)] == [1, 2]
    finally:
        s.close()


def test_a_voided_groups_numbers_are_given_again(tmp_path: Path) -> None:
    """A group that never commits leaves no number behind: the next group numbers from where
    the committed ones end, and nothing refers to the lost number."""
    path = tmp_path / "s.db"
    s = open_sqlite(path)
    try:
        s.commit([Batch(Source.REST, [rec("a", 1, "c1", "d1")])], NOW)
        doomed = s.prepare([Batch(Source.REST, [rec("b", 2, "c9", "d9")])], NOW)
        assert [sid for sid, _, _ in doomed.series_new] == [2]
        s._conn.execute(
            "CREATE TRIGGER fail BEFORE INSERT ON series BEGIN SELECT RAISE(ABORT, 'x'); END"
        )
        try:
            s.apply(doomed)
        except sqlite3.Error:
            pass
        else:
            raise AssertionError("the group should have failed")
        s._conn.execute("DROP TRIGGER fail")
        s.commit([Batch(Source.REST, [rec("c", 3, "c8", "d8"), rec("b", 2, "c9", "d9")])], NOW)
        assert assert_consistent(path) == {("c1", "d1"): 1, ("c8", "d8"): 2, ("c9", "d9"): 3}
    finally:
        s.close()


def test_a_reopened_store_finds_stored_numbers(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    s = open_sqlite(path)
    s.commit([Batch(Source.REST, [rec("a", 1, "c1", "d1"), rec("b", 1, "c2", "d1")])], NOW)
    s.close()
    s = open_sqlite(path)
    try:
        s.commit([Batch(Source.REST, [rec("c", 2, "c2", "d1"), rec("d", 2, "c3", "d1")])], NOW)
        assert assert_consistent(path) == {("c1", "d1"): 1, ("c2", "d1"): 2, ("c3", "d1"): 3}
        assert [p.seq for p in s.raw("c2", "d1", 0, 2**62)] == [2, 3]
    finally:
        s.close()


def test_reads_by_pair_use_the_series_index(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    open_sqlite(path).close()
    conn = sqlite3.connect(path)
    try:
        plan = " ".join(
            str(row[3])
            for row in conn.execute(
                f"EXPLAIN QUERY PLAN SELECT ts FROM records WHERE {sqlite_store._SERIES} "
                "AND ts >= 1 AND ts < 2 ORDER BY ts, seq",
                ("c1", "d1"),
            )
        )
        assert "INDEX records_series (series=? AND ts>? AND ts<?)" in plan
        assert "TEMP B-TREE" not in plan
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "records_cdt" not in names  # the wide per-pair index is gone from the hot table
    finally:
        conn.close()
