"""The PostgreSQL store's own rules, with several stores (as several replicas would) on one
real database: exact dedup and rollups under concurrent commits, compare-and-set state across
stores, migrations that many replicas start at once, the dedup window purge."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from decimal import Decimal, localcontext

import psycopg
import pytest

from meter_gateway.decimals import EXACT
from meter_gateway.model import Batch, Source
from meter_gateway.store.postgres import (
    MIGRATIONS,
    SEQ_BLOCK,
    PostgresStore,
    SchemaTooNewError,
    migrate,
)
from tests import pgdb
from tests.helpers import rec, ts

NOW = ts("2026-05-02T00:00:00")
WINDOW_S = 35 * 86400


@pytest.fixture
def url() -> Iterator[str]:
    u = pgdb.create_database()
    yield u
    pgdb.drop_database(u)


def test_replicas_committing_the_same_ids_at_once_count_each_once(url: str) -> None:
    stores = [PostgresStore(url, WINDOW_S, NOW) for _ in range(3)]
    ids = [f"id-{i}" for i in range(600)]
    results: list[int] = []
    lock = threading.Lock()

    def sender(k: int) -> None:
        # every sender commits every id, in its own order and grouping, through "its" replica
        store = stores[k % len(stores)]
        order = ids[k * 37 % len(ids) :] + ids[: k * 37 % len(ids)]
        accepted = 0
        for start in range(0, len(order), 50):
            chunk = order[start : start + 50]
            minute = [int(i.split("-")[1]) % 60 for i in chunk]
            batch = Batch(
                Source.REST,
                [
                    rec(f"2026-05-01T10:{m:02d}:00", "0.1", customer=f"c{m % 3}", rid=rid)
                    for rid, m in zip(chunk, minute, strict=True)
                ],
            )
            accepted += store.commit([batch], NOW)[0].accepted
        with lock:
            results.append(accepted)

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(results) == len(ids)
    total = Decimal(0)
    count = 0
    for c in ("c0", "c1", "c2"):
        for row in stores[0].rollups(c, "d1", 0, 2**62):
            total += row.sum
            count += row.count
        assert len(stores[1].raw(c, "d1", 0, 2**62)) == sum(
            1 for i in ids if int(i.split("-")[1]) % 60 % 3 == int(c[1])
        )
    assert (count, total) == (600, Decimal("60.0"))
    for s in stores:
        s.close()


def test_rollups_merge_exactly_and_keep_the_last_record_by_time_then_seq(url: str) -> None:
    a, b = PostgresStore(url, WINDOW_S, NOW), PostgresStore(url, WINDOW_S, NOW)
    a.commit([Batch(Source.REST, [rec("2026-05-01T10:30:00", "0.000000000000000001")])], NOW)
    b.commit([Batch(Source.REST, [rec("2026-05-01T10:30:00", "999999999999999999999")])], NOW)
    a.commit([Batch(Source.REST, [rec("2026-05-01T10:10:00", "-3")])], NOW)
    [row] = b.rollups("c1", "d1", 0, 2**62)
    assert row.count == 3
    assert row.sum == Decimal("999999999999999999996.000000000000000001")
    assert (row.min, row.max) == (Decimal(-3), Decimal("999999999999999999999"))
    # two records at 10:30: the one committed later (higher seq) is the last
    assert row.last_value == Decimal("999999999999999999999")
    bucket_end = ts("2026-05-01T11:00:00")
    with localcontext(EXACT):
        expected_wsum = (
            Decimal("0.000000000000000001") * (bucket_end - ts("2026-05-01T10:30:00"))
            + Decimal("999999999999999999999") * (bucket_end - ts("2026-05-01T10:30:00"))
            - 3 * (bucket_end - ts("2026-05-01T10:10:00"))
        )
    assert row.wsum == expected_wsum
    a.close()
    b.close()


def test_a_replica_converting_against_stale_state_is_told_to_retry(url: str) -> None:
    a, b = PostgresStore(url, WINDOW_S, NOW), PostgresStore(url, WINDOW_S, NOW)
    # both replicas read "absent" for the series, then both commit a conversion against it
    first = Batch(Source.OTLP, [rec("2026-05-01T10:00:00", "1")], state={"otlp/s": b"t1"})
    first.state_expect = {"otlp/s": None}
    second = Batch(Source.OTLP, [rec("2026-05-01T10:00:00", "1")], state={"otlp/s": b"t2"})
    second.state_expect = {"otlp/s": None}
    barrier = threading.Barrier(2)
    out: dict[str, bool] = {}

    def run(name: str, store: PostgresStore, batch: Batch) -> None:
        barrier.wait()
        out[name] = store.commit([batch], NOW)[0].conflict

    threads = [
        threading.Thread(target=run, args=("a", a, first)),
        threading.Thread(target=run, args=("b", b, second)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(out.values()) == [False, True]
    winner = b"t1" if not out["a"] else b"t2"
    assert a.state_get(["otlp/s"]) == {"otlp/s": winner}
    assert len(a.raw("c1", "d1", 0, 2**62)) == 1
    a.close()
    b.close()


def test_replicas_starting_together_migrate_once(url: str) -> None:
    errors: list[BaseException] = []
    versions: list[int] = []

    def start() -> None:
        try:
            versions.append(migrate(url))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert versions == [len(MIGRATIONS)] * 5
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT version FROM meter_gateway_schema ORDER BY 1").fetchall()
    assert [r[0] for r in rows] == list(range(1, len(MIGRATIONS) + 1))


def test_a_schema_newer_than_the_code_is_refused(url: str) -> None:
    migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO meter_gateway_schema VALUES (%s, 0)", (len(MIGRATIONS) + 1,))
    with pytest.raises(SchemaTooNewError, match="upgrade meter-gateway"):
        PostgresStore(url, WINDOW_S, NOW)


def test_the_purge_drops_keys_past_the_window_only(url: str) -> None:
    s = PostgresStore(url, WINDOW_S, NOW)
    s.commit([Batch(Source.REST, [rec("2026-05-01T10:00:00", "1", rid="old")])], NOW)
    later = NOW + 20 * 86400 * 10**9
    s.commit([Batch(Source.REST, [rec("2026-05-20T10:00:00", "1", rid="new")])], later)
    assert s.purge_dedup(NOW + 36 * 86400 * 10**9) == 1
    assert s.stats()["dedup_keys"] == 1
    [r] = s.commit(
        [Batch(Source.REST, [rec("2026-05-20T10:00:00", "1", rid="new")])],
        NOW + 36 * 86400 * 10**9,
    )
    assert r.duplicates == 1
    s.close()


def test_catalog_changes_through_any_replica_move_the_one_catalog_version(url: str) -> None:
    stores = [PostgresStore(url, WINDOW_S, NOW) for _ in range(3)]
    v = stores[0].catalog_version()
    stores[1].catalog_put("customers", "c1", {"id": "c1", "name": "C1"})
    # another replica sees the version move, then (loading after reading it) the change
    assert stores[2].catalog_version() == v + 1
    assert stores[2].catalog_load() == {"customers": {"c1": {"id": "c1", "name": "C1"}}}

    def writer(k: int) -> None:
        for i in range(20):
            stores[k].catalog_put("customers", f"w{k}-{i % 4}", {"id": f"w{k}", "name": str(i)})
            if i % 4 == 3:
                assert stores[k].catalog_delete("customers", f"w{k}-{i % 4}")

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # concurrent changes, each counted once: 60 puts and 15 deletes
    assert {s.catalog_version() for s in stores} == {v + 1 + 60 + 15}
    for s in stores:
        s.close()


def test_seqs_come_in_blocks_after_migration_6_and_stay_unique_beside_an_older_replica(
    url: str,
) -> None:
    # a database at version 5, with records whose seqs came one nextval a record
    pgdb.schema_at(url, 5)
    with psycopg.connect(url, autocommit=True) as conn:
        old = [
            r[0] for r in conn.execute("SELECT nextval('records_seq') FROM generate_series(1, 3)")
        ]
    assert old == [1, 2, 3]
    store = PostgresStore(url, WINDOW_S, NOW)
    try:
        assert migrate(url) == len(MIGRATIONS)
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT increment_by FROM pg_sequences WHERE sequencename = 'records_seq'"
            ).fetchone()
        assert row == (SEQ_BLOCK,)
        seen: list[int] = []
        for n in (1, SEQ_BLOCK - 1, SEQ_BLOCK + 1, 3):
            batch = Batch(
                Source.REST,
                [rec(f"2026-05-01T10:{i % 60:02d}:00", "1", rid=f"{n}-{i}") for i in range(n)],
            )
            assert store.commit([batch], NOW)[0].accepted == n
            # an older replica between commits: one nextval a record
            with psycopg.connect(url) as conn:
                seen.extend(
                    r[0]
                    for r in conn.execute(
                        "SELECT nextval('records_seq') FROM generate_series(1, 2)"
                    )
                )
        stored = [r.seq for r in store.records(None, None, 0, 2**62, None, 10_000)]
        assert len(stored) == 1 + (SEQ_BLOCK - 1) + (SEQ_BLOCK + 1) + 3
        assert len(set(stored) | set(seen) | set(old)) == len(stored) + len(seen) + len(old)
        assert min(stored) > max(old)
        # within a commit, seqs rise in ingest order
        by_id = {r.record_id: r.seq for r in store.records(None, None, 0, 2**62, None, 10_000)}
        n = SEQ_BLOCK + 1
        assert [by_id[f"{n}-{i}"] for i in range(n)] == sorted(by_id[f"{n}-{i}"] for i in range(n))
    finally:
        store.close()
