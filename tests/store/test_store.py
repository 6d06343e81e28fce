"""Every store (SQLite or PostgreSQL, per METER_TEST_STORE): atomic commits, dedup that
survives restarts and expires with its window, rejected records, receiver state that moves only
with its records, compare-and-set state, leases and fenced job commits."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from meter_gateway.model import Batch, Reason, RecordError, Source
from meter_gateway.store.base import ConflictError, LeaseLostError, OutboxEvent
from tests.helpers import open_store, rec, ts

NOW = ts("2026-05-02T00:00:00")
NOT_NULL = "(?i)not.null"  # SQLite: "NOT NULL constraint"; PostgreSQL: "not-null constraint"
SEC = 10**9


def test_duplicates_within_a_group_and_across_commits(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    b1 = Batch(
        Source.REST,
        [rec("2026-05-01T10:00:00", "1", rid="a"), rec("2026-05-01T10:00:00", "1", rid="a")],
    )
    b2 = Batch(
        Source.REST,
        [rec("2026-05-01T10:00:00", "1", rid="a"), rec("2026-05-01T10:00:00", "5", rid="b")],
    )
    r1, r2 = s.commit([b1, b2], NOW)
    assert (r1.accepted, r1.duplicates, r2.accepted, r2.duplicates) == (1, 1, 1, 1)
    [r3] = s.commit([Batch(Source.REST, [rec("2026-05-01T10:00:00", "1", rid="b")])], NOW)
    assert (r3.accepted, r3.duplicates) == (0, 1)
    assert [r.value for r in s.raw("c1", "d1", 0, 2**62)] == [Decimal(1), Decimal(5)]
    s.close()


def test_dedup_survives_restart_and_expires_after_the_window(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    s.commit([Batch(Source.REST, [rec("2026-05-01T10:00:00", "1", rid="a")])], NOW)
    s.close()
    s = open_store(tmp_path, now="2026-05-03T00:00:00")
    [r] = s.commit(
        [Batch(Source.REST, [rec("2026-05-01T10:00:00", "1", rid="a")])], ts("2026-05-03T00:00:00")
    )
    assert r.duplicates == 1
    s.close()
    later = ts("2026-06-07T00:00:00")  # 36 days on: past the 35-day window
    s = open_store(tmp_path, now="2026-06-07T00:00:00")
    [r] = s.commit([Batch(Source.REST, [rec("2026-05-01T10:00:00", "1", rid="a")])], later)
    assert r.accepted == 1
    s.close()


def test_failed_commit_marks_no_key_and_stores_nothing(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    bad = rec("2026-05-01T10:00:00", "1", rid="a")
    bad.customer_id = None  # type: ignore[assignment]  # violates NOT NULL inside the txn
    good = rec("2026-05-01T10:00:00", "2", rid="b")
    with pytest.raises(Exception, match=NOT_NULL):
        s.commit([Batch(Source.REST, [good, bad])], NOW)
    assert s.raw("c1", "d1", 0, 2**62) == []
    assert s.rollups("c1", "d1", 0, 2**62) == []
    [r] = s.commit([Batch(Source.REST, [good])], NOW)
    assert r.accepted == 1  # "b" was not left marked by the failed commit
    s.close()


def test_rejected_records_are_kept_with_reasons(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    err = RecordError(
        3, "recordValue", "'x' is not a decimal number", Reason.INVALID_VALUE, '{"recordValue":"x"}'
    )
    [r] = s.commit([Batch(Source.REST, [], [err])], NOW)
    assert r.rejected == 1
    [row] = s.rejected(None, 10, None)
    assert (row.reason, row.field, row.raw) == (
        "invalid_value",
        "recordValue",
        '{"recordValue":"x"}',
    )
    assert s.rejected(None, 10, "too_late") == []
    s.close()


def test_receiver_state_commits_with_its_records_and_only_then(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    b = Batch(Source.OTLP, [rec("2026-05-01T10:00:00", "1")], state={"otlp/a": b"1", "x/b": b"2"})
    s.commit([b], NOW)
    assert s.state_get(["otlp/a", "x/b", "missing"]) == {"otlp/a": b"1", "x/b": b"2"}
    assert s.state_scan("otlp/") == {"otlp/a": b"1"}
    bad = rec("2026-05-01T10:00:00", "1")
    bad.customer_id = None  # type: ignore[assignment]
    with pytest.raises(Exception, match=NOT_NULL):
        s.commit([Batch(Source.OTLP, [bad], state={"otlp/a": b"99", "x/b": None})], NOW)
    assert s.state_get(["otlp/a", "x/b"]) == {"otlp/a": b"1", "x/b": b"2"}
    s.commit([Batch(Source.OTLP, [], state={"x/b": None})], NOW)
    s.close()
    s = open_store(tmp_path)
    assert s.state_scan("") == {"otlp/a": b"1"}
    s.close()


def test_state_expectations_are_compare_and_set_per_batch(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    first = Batch(
        Source.OTLP,
        [rec("2026-05-01T10:00:00", "1", rid="x1")],
        state={"otlp/a": b"1"},
        state_expect={"otlp/a": None},
    )
    [r] = s.commit([first], NOW)
    assert (r.accepted, r.conflict) == (1, False)
    # Converted against the old (absent) state: left out whole, even its records' dedup keys;
    # the other batch of the group commits.
    stale = Batch(
        Source.OTLP,
        [rec("2026-05-01T10:00:00", "5", rid="x2")],
        [RecordError(0, "value", "bad", Reason.INVALID_VALUE)],
        state={"otlp/a": b"2"},
        state_expect={"otlp/a": None},
    )
    other = Batch(Source.REST, [rec("2026-05-01T10:00:00", "7", rid="x3")])
    r1, r2 = s.commit([stale, other], NOW)
    assert (r1.conflict, r1.accepted, r1.rejected) == (True, 0, 0)
    assert (r2.conflict, r2.accepted) == (False, 1)
    assert s.state_get(["otlp/a"]) == {"otlp/a": b"1"}
    assert [p.value for p in s.raw("c1", "d1", 0, 2**62)] == [Decimal(1), Decimal(7)]
    assert s.rejected(None, 10, None) == []
    # Against the state it now holds it commits; two batches of one group chain.
    again = Batch(
        Source.OTLP,
        [rec("2026-05-01T10:00:00", "5", rid="x2")],
        state={"otlp/a": b"2"},
        state_expect={"otlp/a": b"1"},
    )
    then = Batch(Source.OTLP, [], state={"otlp/a": None}, state_expect={"otlp/a": b"2"})
    r3, r4 = s.commit([again, then], NOW)
    assert (r3.accepted, r3.conflict, r4.conflict) == (1, False, False)
    assert s.state_get(["otlp/a"]) == {}
    s.close()


def test_leases_are_exclusive_until_they_expire_or_are_released(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    assert s.lease("job", "a", 15 * SEC, NOW)
    assert s.lease("job", "a", 15 * SEC, NOW + 5 * SEC)  # renewal: until NOW + 20 s
    # SQLite: one process owns the database, so its single replica holds every lease.
    if type(s).__name__ == "PostgresStore":
        assert not s.lease("job", "b", 15 * SEC, NOW + 19 * SEC)
        assert s.lease("job", "b", 15 * SEC, NOW + 20 * SEC)
        s.release("job", "a")  # not a's any more: no effect
        assert not s.lease("job", "a", 15 * SEC, NOW + 21 * SEC)
        s.release("job", "b")
        assert s.lease("job", "a", 15 * SEC, NOW + 21 * SEC)
    s.close()


def test_fenced_job_commits_write_only_while_the_lease_is_held(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    event = OutboxEvent("hook", "e1", "reset", b"{}", NOW)
    assert s.lease("meters", "a", 15 * SEC, NOW)
    s.job_commit({"m/1": {"period": 1}}, [event], ("meters", "a"), NOW + SEC)
    s.job_commit({"m/1": {"period": 1}}, [event], ("meters", "a"), NOW + SEC)  # retried
    assert s.job_state("m/") == {"m/1": {"period": 1}}
    assert [i.event_id for i in s.outbox_claim("hook", NOW + SEC, 10)] == ["e1"]
    if type(s).__name__ == "PostgresStore":
        assert s.lease("meters", "b", 15 * SEC, NOW + 16 * SEC)
        with pytest.raises(LeaseLostError):
            s.job_commit({"m/1": {"period": 2}}, [], ("meters", "a"), NOW + 16 * SEC)
        assert s.job_state("m/") == {"m/1": {"period": 1}}
    s.close()


def test_every_committed_catalog_change_moves_the_catalog_version_by_one(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    v = s.catalog_version()
    s.catalog_put("customers", "c1", {"id": "c1", "name": "C1"})
    assert s.catalog_version() == v + 1
    s.catalog_put("customers", "c1", {"id": "c1", "name": "C1 renamed"})  # a replacement too
    assert s.catalog_version() == v + 2
    with pytest.raises(Exception, match=NOT_NULL):  # rolled back: nothing moves
        s.catalog_put(None, "c2", {"id": "c2", "name": "C2"})  # type: ignore[arg-type]
    assert s.catalog_version() == v + 2
    assert not s.catalog_delete("customers", "nobody")  # nothing deleted: nothing moves
    assert s.catalog_version() == v + 2
    assert s.catalog_load() == {"customers": {"c1": {"id": "c1", "name": "C1 renamed"}}}
    assert s.catalog_delete("customers", "c1")
    assert s.catalog_version() == v + 3
    assert s.catalog_load() == {}
    s.close()


def test_catalog_writes_can_be_compare_and_set_on_the_version(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    v = s.catalog_version()
    s.catalog_put("offerings", "o1", {"id": "o1", "name": "O1"}, expect_version=v)
    assert s.catalog_version() == v + 1
    # validated at v, but the catalog has moved since: refused, nothing written or moved
    with pytest.raises(ConflictError, match="catalog changed"):
        s.catalog_put("customers", "c1", {"id": "c1", "offering": "o1"}, expect_version=v)
    with pytest.raises(ConflictError, match="catalog changed"):
        s.catalog_delete("offerings", "o1", expect_version=v)
    assert s.catalog_version() == v + 1
    assert s.catalog_load() == {"offerings": {"o1": {"id": "o1", "name": "O1"}}}
    assert s.catalog_delete("offerings", "o1", expect_version=v + 1)
    assert s.catalog_version() == v + 2
    s.close()


def test_one_rollup_column_reads_what_the_whole_rows_hold(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    try:
        s.commit(
            [
                Batch(
                    Source.REST,
                    [
                        rec("2026-05-01T10:05:00", "1.25"),
                        rec("2026-05-01T10:35:00", "-3"),
                        rec("2026-05-01T12:00:00", "0.000000000000000001"),
                        rec("2026-05-01T12:00:00", "7", dimension="other"),
                    ],
                )
            ],
            ts("2026-05-02T00:00:00"),
        )
        lo, hi = ts("2026-05-01T00:00:00"), ts("2026-05-02T00:00:00")
        rows = s.rollups("c1", "d1", lo, hi)
        assert [r.bucket_ns for r in rows] == [ts("2026-05-01T10:00:00"), ts("2026-05-01T12:00:00")]
        for column in ("count", "sum", "min", "max"):
            cells = s.rollup_column("c1", "d1", lo, hi, column)  # type: ignore[arg-type]
            assert cells == [(r.bucket_ns, getattr(r, column)) for r in rows], column
            assert all(type(v) is (int if column == "count" else Decimal) for _, v in cells)
        assert s.rollup_column("c1", "d1", lo, ts("2026-05-01T11:00:00"), "sum") == [
            (ts("2026-05-01T10:00:00"), Decimal("-1.75"))
        ]
        with pytest.raises(ValueError, match="not a rollup column"):
            s.rollup_column("c1", "d1", lo, hi, "wsum; DROP TABLE records")  # type: ignore[arg-type]
    finally:
        s.close()
