"""The SQLite store: atomic commits, dedup that survives restarts, one process per file."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from meter_gateway.model import Batch, Reason, RecordError, Source
from meter_gateway.store.sqlite import SQLiteStore, StoreLockedError, path_from_url
from tests.helpers import open_store, rec, ts

NOW = ts("2026-05-02T00:00:00")


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
    s = SQLiteStore(str(tmp_path / "t.db"), 35 * 86400, NOW + 86400 * 10**9)
    [r] = s.commit(
        [Batch(Source.REST, [rec("2026-05-01T10:00:00", "1", rid="a")])], NOW + 86400 * 10**9
    )
    assert r.duplicates == 1
    s.close()
    later = NOW + 36 * 86400 * 10**9
    s = SQLiteStore(str(tmp_path / "t.db"), 35 * 86400, later)
    [r] = s.commit([Batch(Source.REST, [rec("2026-05-01T10:00:00", "1", rid="a")])], later)
    assert r.accepted == 1
    s.close()


def test_failed_commit_marks_no_key_and_stores_nothing(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    bad = rec("2026-05-01T10:00:00", "1", rid="a")
    bad.customer_id = None  # type: ignore[assignment]  # violates NOT NULL inside the txn
    good = rec("2026-05-01T10:00:00", "2", rid="b")
    with pytest.raises(Exception, match="NOT NULL"):
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


def test_a_second_process_cannot_open_the_same_file(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    with pytest.raises(StoreLockedError, match="in use"):
        open_store(tmp_path)
    s.close()
    open_store(tmp_path).close()


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///./x.db", "./x.db"),
        ("sqlite:////var/lib/x.db", "/var/lib/x.db"),
        ("sqlite:///x.db", "x.db"),
    ],
)
def test_sqlite_urls(url: str, path: str) -> None:
    assert path_from_url(url) == path


def test_receiver_state_commits_with_its_records_and_only_then(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    b = Batch(Source.OTLP, [rec("2026-05-01T10:00:00", "1")], state={"otlp/a": b"1", "x/b": b"2"})
    s.commit([b], NOW)
    assert s.state_get(["otlp/a", "x/b", "missing"]) == {"otlp/a": b"1", "x/b": b"2"}
    assert s.state_scan("otlp/") == {"otlp/a": b"1"}
    bad = rec("2026-05-01T10:00:00", "1")
    bad.customer_id = None  # type: ignore[assignment]
    with pytest.raises(Exception, match="NOT NULL"):
        s.commit([Batch(Source.OTLP, [bad], state={"otlp/a": b"99", "x/b": None})], NOW)
    assert s.state_get(["otlp/a", "x/b"]) == {"otlp/a": b"1", "x/b": b"2"}
    s.commit([Batch(Source.OTLP, [], state={"x/b": None})], NOW)
    s.close()
    s = open_store(tmp_path)
    assert s.state_scan("") == {"otlp/a": b"1"}
    s.close()
