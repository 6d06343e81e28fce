"""The PostgreSQL commit's COPY paths: dedup keys are copied first and marked by the upsert only
when one is there already (or a concurrent transaction commits it meanwhile); records go as
COPY text written in one join. Counts stay exact and stored text comes back as sent."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace

import psycopg
import pytest

from meter_gateway.model import Batch, Source, UsageRecord, dedup_key
from meter_gateway.store.base import StoredRecord
from meter_gateway.store.postgres import DEDUP_COPY_PAUSE, PostgresStore
from tests import pgdb
from tests.helpers import rec, ts

NOW = ts("2026-05-02T00:00:00")
WINDOW_S = 35 * 86400
AWKWARD = ["a\tb", "c\nd", "e\\f", "\\N", "g\rh", "", "é☃\U0001f600", '"q"', "\\.", "x\\Ny"]


@pytest.fixture
def url() -> Iterator[str]:
    u = pgdb.create_database()
    yield u
    pgdb.drop_database(u)


def batch(*ids: str) -> Batch:
    return Batch(Source.REST, [rec("2026-05-01T10:00:00", "1", rid=i) for i in ids])


def test_a_group_with_a_known_key_is_marked_by_the_upsert_and_counted_exactly(url: str) -> None:
    store = PostgresStore(url, WINDOW_S, NOW)
    try:
        [r] = store.commit([batch("a", "b")], NOW)
        assert (r.accepted, r.duplicates) == (2, 0)
        assert store._copy_pause == 0  # copied
        # "b" is there: the copy fails, rolls back to its savepoint, the upsert decides
        [r1, r2] = store.commit([batch("c", "b"), batch("d", "c")], NOW)
        assert (r1.accepted, r1.duplicates, r2.accepted, r2.duplicates) == (1, 1, 1, 1)
        assert store._copy_pause == DEDUP_COPY_PAUSE
        for _ in range(DEDUP_COPY_PAUSE):  # the pause goes by the upsert, fresh ids or not
            [r] = store.commit([batch(f"p{store._copy_pause}")], NOW)
            assert r.accepted == 1
        assert store._copy_pause == 0
        [r] = store.commit([batch("e", "a")], NOW)
        assert (r.accepted, r.duplicates) == (1, 1)
        assert [p.value for p in store.raw("c1", "d1", 0, 2**62)] == [1] * (5 + DEDUP_COPY_PAUSE)
        assert store.stats() == {
            "records": 5 + DEDUP_COPY_PAUSE,
            "dedup_keys": 5 + DEDUP_COPY_PAUSE,
        }
    finally:
        store.close()


@pytest.mark.parametrize("other_commits", [True, False])
def test_a_copy_waits_for_a_replica_marking_the_same_key_and_follows_its_outcome(
    url: str, other_commits: bool
) -> None:
    """Another replica's transaction has marked "k" and not ended: the copy waits on the
    unique index; if that transaction commits, "k" is a duplicate here, if it rolls back,
    "k" is new here."""
    store = PostgresStore(url, WINDOW_S, NOW)
    other = psycopg.connect(url)
    try:
        other.execute(
            "INSERT INTO dedup_keys (key, seen_s) VALUES (%s, %s)",
            (dedup_key("id", "k"), NOW // 10**9),
        )
        results = []
        worker = threading.Thread(
            target=lambda: results.extend(store.commit([batch("j", "k", "l")], NOW))
        )
        worker.start()
        worker.join(0.5)
        assert worker.is_alive()  # waiting on the other transaction's key
        if other_commits:
            other.commit()
        else:
            other.rollback()
        worker.join(10)
        [r] = results
        assert (r.accepted, r.duplicates) == ((2, 1) if other_commits else (3, 0))
        assert store.stats()["dedup_keys"] == 3
    finally:
        other.close()
        store.close()


def _commit_and_list(url: str, records: list[UsageRecord]) -> tuple[int, list[StoredRecord]]:
    """Commit ``records`` as one REST batch on a fresh store: accepted, and what it lists."""
    store = PostgresStore(url, WINDOW_S, NOW)
    try:
        [r] = store.commit([Batch(Source.REST, records)], NOW)
        return r.accepted, store.records(None, None, 0, 2**62, None, 100)
    finally:
        store.close()


def test_awkward_record_ids_and_metadata_are_stored_as_sent(url: str) -> None:
    records = [
        replace(
            rec(f"2026-05-01T10:{i:02d}:00", "1", rid=s),
            metadata={"k": s, s: i} if i % 2 else None,
        )
        for i, s in enumerate(AWKWARD)
    ]
    records.append(rec("2026-05-01T11:00:00", "2"))  # no id, no metadata: NULLs
    accepted, stored = _commit_and_list(url, records)
    assert accepted == len(records)
    assert [(s.record_id, s.metadata) for s in stored] == [
        (x.record_id, x.metadata) for x in records
    ]


def test_plain_record_ids_and_metadata_take_the_unescaped_path_exactly(url: str) -> None:
    records = [
        replace(
            rec(f"2026-05-01T10:{i:02d}:00", f"{i}.5", rid=f"id-{i}"),
            metadata={"user_id": f"u-{i}", "region": "eu"} if i % 3 else None,
        )
        for i in range(50)
    ]
    accepted, stored = _commit_and_list(url, records)
    assert accepted == 50
    assert [(s.record_id, s.metadata, s.value, s.timestamp_ns) for s in stored] == [
        (x.record_id, x.metadata, x.value, x.timestamp_ns) for x in records
    ]
