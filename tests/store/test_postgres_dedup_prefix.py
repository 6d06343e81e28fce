"""PostgreSQL's dedup index is on a 64-bit prefix of each key (migration 7): keys that share a
prefix are still told apart, by ``dedup_collisions``, on every path (the copy, the upsert, a
group holding several of them, keys past the window) and across the migration."""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter_gateway.model import Batch, Source
from meter_gateway.store.postgres import PostgresStore
from tests import pgdb
from tests.helpers import rec, ts

NOW = ts("2026-05-02T00:00:00")
NOW_S = NOW // 10**9
WINDOW_S = 35 * 86400
PREFIX = bytes.fromhex("0123456789abcdef")


def key(tail: str) -> bytes:
    """A 16-byte dedup key with the shared prefix."""
    return PREFIX + bytes.fromhex(tail * 8)


@pytest.fixture
def url() -> Iterator[str]:
    u = pgdb.create_database()
    yield u
    pgdb.drop_database(u)


def batch(*keys: bytes) -> Batch:
    r = rec("2026-05-01T10:00:00", "1")
    return Batch(Source.REST, [replace(r, record_id=k.hex(), dedup_key=k) for k in keys])


def counts(store: PostgresStore, *groups: tuple[bytes, ...]) -> list[tuple[int, int]]:
    """(accepted, duplicates) of each group, committed one after the other."""
    out = []
    for keys in groups:
        [r] = store.commit([batch(*keys)], NOW)
        out.append((r.accepted, r.duplicates))
    return out


def table(url: str, name: str) -> dict[bytes, int]:
    with psycopg.connect(url) as conn:
        return {bytes(k): s for k, s in conn.execute(f"SELECT key, seen_s FROM {name}")}


def test_keys_sharing_a_prefix_are_each_new_once(url: str) -> None:
    store = PostgresStore(url, WINDOW_S, NOW)
    try:
        a, b, c, d = key("aa"), key("bb"), key("cc"), key("dd")
        assert counts(store, (a,), (b,), (a, b), (c, d), (d, c, a)) == [
            (1, 0),  # copied
            (1, 0),  # its prefix is a's: the copy fails, the upsert finds a collision
            (0, 2),
            (2, 0),  # two of a group on one slot: one at a time
            (0, 3),
        ]
        assert table(url, "dedup_keys") == {a: NOW_S}
        assert table(url, "dedup_collisions") == dict.fromkeys((b, c, d), NOW_S)
        assert store.stats() == {"records": 4, "dedup_keys": 4}
    finally:
        store.close()


def test_a_copied_key_kept_as_a_collision_is_a_duplicate(url: str) -> None:
    """The slot's key went (purged) while b, which shares its prefix, is still in the window:
    b's copy succeeds on the free slot, and the check against ``dedup_collisions`` undoes it."""
    store = PostgresStore(url, WINDOW_S, NOW)
    try:
        a, b = key("aa"), key("bb")
        assert counts(store, (a,), (b,)) == [(1, 0), (1, 0)]
        store._copy_pause = 0  # (b's copy failed: the next commits would go to the upsert)
        with psycopg.connect(url) as conn:
            conn.execute("DELETE FROM dedup_keys WHERE key = %s", (a,))
        assert counts(store, (b, bytes(16))) == [(1, 1)]  # the zero key new, b not
        assert store._copy_pause == 0  # the copy did not fail: it was checked and undone
        assert b not in table(url, "dedup_keys")
        assert table(url, "dedup_collisions")[b] == NOW_S
    finally:
        store.close()


def test_keys_past_the_window_give_up_their_slot_and_count_as_new(url: str) -> None:
    store = PostgresStore(url, WINDOW_S, NOW)
    try:
        a, b, e = key("aa"), key("bb"), key("ee")
        assert counts(store, (a,), (b,)) == [(1, 0), (1, 0)]
        with psycopg.connect(url) as conn:
            conn.execute("UPDATE dedup_keys SET seen_s = %s", (NOW_S - WINDOW_S - 1,))
            conn.execute("UPDATE dedup_collisions SET seen_s = %s", (NOW_S - WINDOW_S - 1,))
        # e takes a's slot (a is past the window), then a and b are new again: collisions now
        assert counts(store, (e,), (a, b), (a, b, e)) == [(1, 0), (2, 0), (0, 3)]
        assert table(url, "dedup_keys") == {e: NOW_S}
        assert table(url, "dedup_collisions") == {a: NOW_S, b: NOW_S}
        assert store.purge_dedup(NOW + (WINDOW_S + 1) * 10**9) == 3
        assert store.stats()["dedup_keys"] == 0
    finally:
        store.close()


def test_migration_7_keeps_every_key_of_the_window_including_colliding_ones(url: str) -> None:
    a, b, other = key("aa"), key("bb"), bytes(range(16))
    pgdb.schema_at(url, 6)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO dedup_keys (key, seen_s) VALUES (%s, %s), (%s, %s), (%s, %s)",
            (a, NOW_S - 10, b, NOW_S - 5, other, NOW_S),
        )
    store = PostgresStore(url, WINDOW_S, NOW)
    try:
        assert table(url, "dedup_keys") == {b: NOW_S - 5, other: NOW_S}  # the later one stays
        assert table(url, "dedup_collisions") == {a: NOW_S - 10}
        assert counts(store, (a, b, other), (key("cc"),)) == [(0, 3), (1, 0)]
        assert store.stats()["dedup_keys"] == 4
    finally:
        store.close()


# Generated runs against a model: a key is new when it was never marked or last marked before
# the window; marking a duplicate does not move its time. Keys come from two prefixes and four
# tails, so most of a run's keys share a prefix with another; the copy is tried or skipped at
# random, and purges come in between.
TAILS = ("11", "22", "33", "44")
FORWARD = st.sampled_from([0, 1, WINDOW_S // 2, WINDOW_S // 2 + 1, WINDOW_S, WINDOW_S + 1])  # s
STEP = st.one_of(
    st.tuples(
        st.just("commit"),
        st.lists(st.tuples(st.integers(0, 1), st.sampled_from(TAILS)), min_size=1, max_size=5),
        FORWARD,
        st.booleans(),  # try the copy first
    ),
    st.tuples(st.just("purge"), st.just([]), FORWARD, st.just(False)),
)


@pytest.fixture(scope="module")
def shared_store() -> Iterator[PostgresStore]:
    u = pgdb.create_database()
    store = PostgresStore(u, WINDOW_S, NOW)
    yield store
    store.close()
    pgdb.drop_database(u)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    database=None,
)
@given(steps=st.lists(STEP, min_size=1, max_size=12))
def test_marking_keys_that_share_prefixes_agrees_with_a_model(
    shared_store: PostgresStore,
    steps: list[tuple[str, list[tuple[int, str]], int, bool]],
) -> None:
    store = shared_store
    salt = uuid.uuid4().bytes[:7]  # keys of this example only (the store is shared)
    now_s = NOW_S
    marked: dict[bytes, int] = {}  # the model: key -> when it was last marked new
    for op, picks, forward, copy in steps:
        now_s += forward
        if op == "purge":
            store.purge_dedup(now_s * 10**9)
            continue
        keys = sorted({salt + bytes([p]) + bytes.fromhex(t * 8) for p, t in picks})
        want_new = {k for k in keys if k not in marked or marked[k] < now_s - WINDOW_S}
        store._copy_pause = 0 if copy else 1
        r = rec("2026-05-01T10:00:00", "1")
        batch = Batch(Source.REST, [replace(r, record_id=k.hex(), dedup_key=k) for k in keys])
        [got] = store.commit([batch], now_s * 10**9)
        assert (got.accepted, got.duplicates) == (len(want_new), len(keys) - len(want_new))
        marked.update(dict.fromkeys(want_new, now_s))


def test_replicas_marking_keys_that_share_prefixes_at_once_accept_each_key_once(url: str) -> None:
    """Two replicas commit groups drawn from twelve keys on two prefixes at the same time: the
    slots, the collision rows and the copies race, and every key is accepted exactly once."""
    stores = [PostgresStore(url, WINDOW_S, NOW) for _ in range(2)]
    pool = [
        bytes([p]) * 8 + bytes.fromhex(t * 8)
        for p in (1, 2)
        for t in ("a1", "b2", "c3", "d4", "e5", "f6")
    ]
    accepted = [0, 0]

    def replica(n: int) -> None:
        rnd = random.Random(n)
        for _ in range(40):
            keys = sorted(set(rnd.sample(pool, rnd.randint(1, 5))))
            stores[n]._copy_pause = rnd.choice((0, 1))
            r = rec("2026-05-01T10:00:00", "1")
            batch = Batch(Source.REST, [replace(r, record_id=k.hex(), dedup_key=k) for k in keys])
            [got] = stores[n].commit([batch], NOW)
            accepted[n] += got.accepted

    threads = [threading.Thread(target=replica, args=(n,)) for n in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sum(accepted) == len(pool)
        assert stores[0].stats() == {"records": len(pool), "dedup_keys": len(pool)}
        assert len(table(url, "dedup_keys")) == 2  # one slot a prefix, the rest collisions
    finally:
        for s in stores:
            s.close()
