"""SQLite lists records by time through ``record_times``, filled behind the commits in sorted
batches, plus the records not indexed yet (migration 9): every page of every listing is what
one sort of the stored records by (ts, seq) gives, wherever the indexed part ends."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter_gateway.model import Batch, Source, UsageRecord, dedup_key
from meter_gateway.store import open_store
from meter_gateway.store import sqlite as sqlite_store
from meter_gateway.store.base import StoredRecord
from tests.helpers import sqlite_at_version, ts

NOW = ts("2026-05-02T00:00:00")
BASE = ts("2026-05-01T00:00:00")
MIN = 60 * 1_000_000_000


def rec(n: int, minute: int, customer: str, dim: str) -> UsageRecord:
    rid = f"r{n}"
    return UsageRecord(
        BASE + minute * MIN, customer, dim, Decimal(n), rid, {"user_id": f"u{n % 3}"},
        Source.REST, dedup_key("id", rid), f"u{n % 3}",
    )  # fmt: skip


def listing(
    s: sqlite_store.SQLiteStore,
    customer: str | None,
    dim: str | None,
    lo: int,
    hi: int,
    page: int,
) -> Iterator[StoredRecord]:
    """Every record of a listing, page by page, as the API pages it (after the last (ts, seq))."""
    after: tuple[int, int] | None = None
    while True:
        got = s.records(customer, dim, lo, hi, after, page)
        yield from got
        if len(got) < page:
            return
        after = (got[-1].timestamp_ns, got[-1].seq)


def expected(
    s: sqlite_store.SQLiteStore, customer: str | None, dim: str | None, lo: int, hi: int
) -> list[tuple[int, int, str]]:
    rows = s._conn.execute("SELECT ts, seq, record_id, customer, dimension FROM records").fetchall()
    return sorted(
        (t, q, rid)
        for t, q, rid, c, d in rows
        if lo <= t < hi and customer in (None, c) and dim in (None, d)
    )


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_store, "_IDS_BATCH", 5)
    monkeypatch.setattr(sqlite_store, "_IDS_CHUNK", 7)


commits = st.lists(
    st.lists(
        st.tuples(
            st.integers(0, 120), st.sampled_from(["c1", "c2"]), st.sampled_from(["d1", "d2"])
        ),
        min_size=1,
        max_size=6,
    ),
    min_size=1,
    max_size=12,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    commits=commits,
    cancel=st.sets(st.integers(0, 80), max_size=6),
    window=st.tuples(st.integers(0, 130), st.integers(0, 130)),
    page=st.integers(1, 9),
)
def test_every_listing_is_the_sorted_records_wherever_indexing_stands(
    tmp_path_factory: pytest.TempPathFactory,
    small_batches: None,
    commits: list[list[tuple[int, str, str]]],
    cancel: set[int],
    window: tuple[int, int],
    page: int,
) -> None:
    path = tmp_path_factory.mktemp("times") / "t.db"
    s = open_store(f"sqlite:///{path}", 35 * 86400, NOW)
    assert isinstance(s, sqlite_store.SQLiteStore)
    try:
        n = 0
        for group in commits:
            batch = [rec(n + i, m, c, d) for i, (m, c, d) in enumerate(group)]
            n += len(batch)
            s.commit([Batch(Source.REST, batch)], NOW)
        if cancel:
            s.cancel_records([f"r{i}" for i in sorted(cancel)], None, NOW, {})
        upto = s._conn.execute("SELECT seq FROM record_ids_upto").fetchone()[0]
        indexed = s._conn.execute("SELECT count(*) FROM record_times").fetchone()[0]
        assert indexed == min(upto, n)  # the indexed part: every record up to the mark
        lo, hi = BASE + min(window) * MIN, BASE + max(window) * MIN
        for customer, dim in ((None, None), (None, "d1"), ("c1", None), ("c2", "d2")):
            pages = listing(s, customer, dim, lo, hi, page)
            got = [(r.timestamp_ns, r.seq, r.record_id) for r in pages]
            assert got == expected(s, customer, dim, lo, hi)
    finally:
        s.close()


def test_listing_spans_the_indexed_part_and_the_rest_and_survives_reopening(
    tmp_path: Path, small_batches: None
) -> None:
    path = tmp_path / "t.db"
    s = open_store(f"sqlite:///{path}", 35 * 86400, NOW)
    assert isinstance(s, sqlite_store.SQLiteStore)
    # minutes scattered (out of order), one record per commit: 12 commits, indexing at 5 and 10
    minutes = [7, 3, 11, 0, 9, 3, 1, 12, 5, 2, 8, 6]
    for n, m in enumerate(minutes):
        s.commit([Batch(Source.REST, [rec(n, m, "c1", "d1")])], NOW)
    upto = s._conn.execute("SELECT seq FROM record_ids_upto").fetchone()[0]
    assert 0 < upto < len(minutes)  # some indexed, some not: the listing reads both
    want = [f"r{n}" for n, _ in sorted(enumerate(minutes), key=lambda x: (x[1], x[0]))]
    assert [r.record_id for r in listing(s, None, None, 0, 2**62, 4)] == want
    s.close()
    s = open_store(f"sqlite:///{path}", 35 * 86400, NOW)
    assert isinstance(s, sqlite_store.SQLiteStore)
    try:
        assert [r.record_id for r in listing(s, None, None, 0, 2**62, 5)] == want
        s.commit([Batch(Source.REST, [rec(99, 4, "c2", "d1")])], NOW)
        got = [r.record_id for r in listing(s, None, "d1", BASE + 4 * MIN, BASE + 6 * MIN, 1)]
        assert got == ["r99", "r8"]  # minute 4 (the newest record), then minute 5
    finally:
        s.close()


def test_listing_by_time_reads_record_times_not_a_scan(tmp_path: Path) -> None:
    """The plan: the indexed part in (ts, seq) order from ``record_times``, the rest by seq."""
    path = tmp_path / "t.db"
    open_store(f"sqlite:///{path}", 35 * 86400, NOW).close()
    conn = sqlite3.connect(path)
    plan = " ".join(
        str(row[3])
        for row in conn.execute(
            "EXPLAIN QUERY PLAN SELECT t.ts FROM record_times t JOIN records r ON r.seq = t.seq "
            "WHERE t.ts >= 1 AND t.ts < 2 ORDER BY t.ts, t.seq LIMIT 10"
        )
    )
    assert "SEARCH t USING PRIMARY KEY (ts>? AND ts<?)" in plan
    assert "TEMP B-TREE" not in plan  # no sort: the key's order is the listing's
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "records_ts" not in names  # no index on ts left on the hot table
    conn.close()


def test_a_version_8_database_gets_its_times_indexed(tmp_path: Path) -> None:
    """Migration 9 fills ``record_times`` with the records up to ``record_ids_upto`` (the rest
    are read by seq) and drops the index on ``records.ts``."""
    path = tmp_path / "old.db"
    conn = sqlite_at_version(
        path, 8, [(1, BASE + 5 * MIN, "x"), (2, BASE + 1 * MIN, "y"), (3, BASE + 3 * MIN, "z")]
    )
    conn.execute("UPDATE record_ids_upto SET seq = 2")  # record 3 not indexed yet
    conn.close()
    s = open_store(f"sqlite:///{path}", 35 * 86400, NOW)
    assert isinstance(s, sqlite_store.SQLiteStore)
    try:
        times = s._conn.execute("SELECT ts, seq FROM record_times").fetchall()
        assert times == [(BASE + 1 * MIN, 2), (BASE + 5 * MIN, 1)]
        assert [r.record_id for r in s.records(None, None, 0, 2**62, None, 10)] == ["y", "z", "x"]
    finally:
        s.close()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(groups=st.lists(st.tuples(st.booleans(), st.integers(1, 6)), min_size=1, max_size=15))
def test_record_ids_are_indexed_whichever_groups_carry_them(
    tmp_path_factory: pytest.TempPathFactory,
    small_batches: None,
    groups: list[tuple[bool, int]],
) -> None:
    """Spans of records without ids are not scanned for ids (remote write, OTLP): the ids of
    the groups that have them are indexed all the same, and every id is found."""
    path = tmp_path_factory.mktemp("ids") / "t.db"
    s = open_store(f"sqlite:///{path}", 35 * 86400, NOW)
    assert isinstance(s, sqlite_store.SQLiteStore)
    scans: list[str] = []
    s._conn.set_trace_callback(
        lambda sql: (
            scans.append(sql) if sql.startswith("INSERT OR IGNORE INTO record_ids") else None
        )
    )
    try:
        n, sent = 0, []
        for with_ids, size in groups:
            batch = [rec(n + i, i, "c1", "d1") for i in range(size)]
            if not with_ids:
                batch = [replace(r, record_id=None, dedup_key=None) for r in batch]
            sent += [r.record_id for r in batch if r.record_id is not None]
            n += size
            s.commit([Batch(Source.REST, batch)], NOW)
        upto = s._conn.execute("SELECT seq FROM record_ids_upto").fetchone()[0]
        indexed = {r[0] for r in s._conn.execute("SELECT record_id FROM record_ids")}
        stored = s._conn.execute(
            "SELECT record_id FROM records WHERE seq <= ? AND record_id IS NOT NULL", (upto,)
        ).fetchall()
        assert indexed == {r[0] for r in stored}
        if not sent:
            assert scans == []  # nothing had an id: no span was scanned for one
        results = s.cancel_records(sent, None, NOW, {})
        assert [r.status for r in results] == ["cancelled"] * len(sent)
    finally:
        s.close()
