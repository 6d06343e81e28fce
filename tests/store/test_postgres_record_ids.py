"""Record ids on PostgreSQL are indexed behind the commits (``record_ids`` up to a mark):
a cancellation by id finds every record whether its id is indexed, pending or in the tail,
the mark never passes a seq a still-open transaction holds, and a version-5 database
upgrades with its ids indexed."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from meter_gateway.model import Batch, Source
from meter_gateway.store import postgres
from meter_gateway.store.postgres import PostgresStore, migrate
from tests import pgdb
from tests.helpers import rec, ts

NOW = ts("2026-05-02T00:00:00")
WINDOW_S = 35 * 86400


@pytest.fixture
def url() -> Iterator[str]:
    u = pgdb.create_database()
    yield u
    pgdb.drop_database(u)


def _commit(store: PostgresStore, ids: list[str]) -> None:
    batch = Batch(Source.REST, [rec("2026-05-01T10:00:00", "1", rid=i) for i in ids])
    [result] = store.commit([batch], NOW)
    assert result.accepted == len(ids)


def _indexed(url: str) -> tuple[set[str], int]:
    with psycopg.connect(url) as conn:
        ids = {r[0] for r in conn.execute("SELECT record_id FROM record_ids").fetchall()}
        mark = conn.execute("SELECT seq FROM record_ids_upto").fetchone()
    assert mark is not None
    return ids, int(mark[0])


def test_cancellations_find_ids_indexed_pending_and_not_yet(url: str) -> None:
    store = PostgresStore(url, WINDOW_S, NOW)
    try:
        _commit(store, ["a1", "a2"])
        assert store.index_record_ids() == 0  # sets a1, a2 pending
        _commit(store, ["b1", "b2"])
        assert store.index_record_ids() == 2  # indexes a1, a2; sets b1, b2 pending
        _commit(store, ["c1", "c2"])
        assert _indexed(url) == ({"a1", "a2"}, 2)
        done = store.cancel_records(["a1", "b1", "c1", "zz"], "test", NOW, {})
        assert [r.status for r in done] == ["cancelled", "cancelled", "cancelled", "not_found"]
        assert store.index_record_ids() == 1  # b2 (b1 is cancelled); sets c2 pending
        assert store.index_record_ids() == 1  # c2
        assert _indexed(url) == ({"a1", "a2", "b2", "c2"}, 6)
        done = store.cancel_records(["a1", "a2", "b2", "c2"], None, NOW, {})
        assert [r.status for r in done] == ["already_cancelled"] + ["cancelled"] * 3
    finally:
        store.close()


def test_the_mark_waits_for_a_transaction_holding_a_smaller_seq(url: str) -> None:
    store = PostgresStore(url, WINDOW_S, NOW)
    try:
        with psycopg.connect(url) as late:  # a commit that took its seq and has not ended
            late.execute("SELECT pg_current_xact_id()")
            row = late.execute("SELECT nextval('records_seq')").fetchone()
            assert row is not None
            _commit(store, ["after"])
            assert store.index_record_ids() == 0  # sets "after" pending
            assert store.index_record_ids() == 0  # not ready: "late" may still commit below it
            assert _indexed(url) == (set(), 0)
            late.execute(
                "INSERT INTO records (seq, ts, customer, dimension, value, record_id, source, "
                "received_ns) VALUES (%s, %s, 'c1', 'd1', 1, 'late', 'rest', 0)",
                (row[0], ts("2026-05-01T10:00:00")),
            )
        assert store.index_record_ids() == 2
        assert _indexed(url) == ({"late", "after"}, 2)
        done = store.cancel_records(["late", "after"], None, NOW, {})
        assert [r.status for r in done] == ["cancelled", "cancelled"]
    finally:
        store.close()


def test_a_version_5_database_upgrades_with_its_ids_indexed(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as m:
        m.setattr(postgres, "MIGRATIONS", postgres.MIGRATIONS[:5])
        assert migrate(url) == 5
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO records (seq, ts, customer, dimension, value, record_id, source, "
            "received_ns) SELECT nextval('records_seq'), %s, 'c1', 'd1', 1, "
            "CASE WHEN i %% 2 = 0 THEN 'old-' || i END, 'rest', 0 "
            "FROM generate_series(1, 10) AS i",
            (ts("2026-05-01T10:00:00"),),
        )
    store = PostgresStore(url, WINDOW_S, NOW)  # migrates to the latest version
    try:
        assert _indexed(url) == ({f"old-{i}" for i in range(2, 11, 2)}, 10)
        with psycopg.connect(url) as conn:
            gone = conn.execute("SELECT to_regclass('records_record_id')").fetchone()
        assert gone == (None,)
        _commit(store, ["new"])
        done = store.cancel_records(["old-4", "new", "old-3"], None, NOW, {})
        assert [r.status for r in done] == ["cancelled", "cancelled", "not_found"]
    finally:
        store.close()


def test_commits_start_a_pass_in_the_background_every_so_many_records(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres, "RECORD_IDS_EVERY", 2)
    store = PostgresStore(url, WINDOW_S, NOW)
    _commit(store, ["x1"])  # 1 of 2: no pass
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT pending_seq FROM record_ids_upto").fetchone() == (None,)
    _commit(store, ["x2"])  # a pass starts; close waits for it
    store.close()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT pending_seq FROM record_ids_upto").fetchone() == (2,)
