"""A failed group never poisons the next (issue 13), on every store (METER_TEST_STORE).

A record the store cannot keep is rejected alone (``unstorable``, in the rejected store) while
the rest of its batch and of its group commit; groups voided by an earlier failure are prepared
again; a store outage fails the requests it hits and makes the ingestor unhealthy (``/readyz``
503) until a commit succeeds again. Last, the same against a running gateway.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from meter_gateway.clock import FixedClock
from meter_gateway.model import Batch, CommitResult, Reason, Source, UsageRecord
from meter_gateway.pipeline.ingest import PROBE_KEY, CommitFailed, Ingestor
from meter_gateway.store.base import Store
from meter_gateway.store.sqlite import SQLiteStore, path_from_url
from meter_gateway.telemetry import Telemetry
from tests.gatewayproc import GatewayProcess
from tests.helpers import eventually, open_store, rec, record, ts

NOW = ts("2026-05-02T00:00:00")
DAY = (ts("2026-05-01T00:00:00"), NOW)


def nested(depth: int) -> dict[str, Any]:
    value: Any = 1
    for _ in range(depth):
        value = {"k": value}
    return value  # type: ignore[no-any-return]


def deep(rid: str, depth: int = 253) -> UsageRecord:
    r = rec("2026-05-01T10:00:00", "100", rid=rid)
    r.metadata = nested(depth)
    return r


def good(rid: str, value: str = "1") -> UsageRecord:
    return rec("2026-05-01T10:00:00", value, rid=rid)


class Held:
    """The real store, whose first commit (or prepare) waits until released: batches enqueued
    meanwhile go into one group. Everything else is the store's own."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.release = threading.Event()
        self.entered = threading.Event()
        self.first = True

    def _hold(self) -> None:
        if self.first:
            self.first = False
            self.entered.set()
            assert self.release.wait(10)

    def commit(self, batches: Sequence[Batch], now_ns: int) -> list[CommitResult]:
        self._hold()
        return self.inner.commit(batches, now_ns)

    def prepare(self, batches: Sequence[Batch], now_ns: int) -> Any:
        self._hold()
        return self.inner.prepare(batches, now_ns)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(tmp_path)
    yield s
    s.close()


def ingestor(store: Any, probe_interval_s: float = 1.0) -> Ingestor:
    return Ingestor(
        store, FixedClock(NOW), Telemetry(), 100_000, 10_000, 1.0, probe_interval_s=probe_interval_s
    )


def test_an_unstorable_record_is_rejected_alone_and_the_next_request_commits(
    store: Store,
) -> None:
    ing = ingestor(store)
    try:
        batch = Batch(Source.REST, [good("a"), deep("bad"), good("b", "2")])
        r = ing.submit_sync(batch, 30)
        assert (r.accepted, r.duplicates, r.rejected) == (2, 0, 1)
        (err,) = batch.errors  # the answer lists it, at its place in the request
        assert (err.index, err.field, err.reason) == (1, "metadata", Reason.UNSTORABLE)
        assert "251 levels" in err.error
        # every later request commits: nothing is wedged
        for i in range(3):
            r = ing.submit_sync(Batch(Source.REST, [good(f"next{i}")]), 30)
            assert r.accepted == 1
        assert ing.healthy
    finally:
        ing.close()
    (row,) = store.rejected(None, 10, Reason.UNSTORABLE.value)
    assert row.field == "metadata"
    assert '"id": "bad"' in (row.raw or "")
    ids = sorted(x.record_id or "" for x in store.records(None, None, *DAY, None, 100))
    assert ids == ["a", "b", "next0", "next1", "next2"]
    (roll,) = store.rollups("c1", "d1", *DAY)
    assert (roll.count, str(roll.sum)) == (5, "6")
    # the bad record's id was never marked: sent again without the bad metadata, it counts
    (r,) = store.commit([Batch(Source.REST, [good("bad", "100")])], NOW)
    assert r.accepted == 1


def test_an_atomic_batch_with_an_unstorable_record_stores_nothing(store: Store) -> None:
    ing = ingestor(store)
    try:
        batch = Batch(Source.REST, [good("a"), deep("bad"), good("b", "2")], atomic=True)
        r = ing.submit_sync(batch, 30)
        assert r.accepted == 0
        (err,) = batch.errors
        assert (err.index, err.reason) == (1, Reason.UNSTORABLE)
        # the good ones were not stored, so they count when sent again
        r = ing.submit_sync(Batch(Source.REST, [good("a"), good("b", "2")]), 30)
        assert r.accepted == 2
    finally:
        ing.close()
    ids = sorted(x.record_id or "" for x in store.records(None, None, *DAY, None, 100))
    assert ids == ["a", "b"]


def test_a_group_of_many_requests_splits_by_request(store: Store) -> None:
    held = Held(store)
    ing = ingestor(held)
    results: dict[int, CommitResult | BaseException] = {}
    done = threading.Event()
    batches = [
        Batch(Source.REST, [good("first")]),  # held: the rest queue up behind it
        *(Batch(Source.REST, [good(f"g{i}"), good(f"h{i}")]) for i in range(5)),
        Batch(Source.REST, [good("x1"), deep("bad1"), deep("bad2", 300), good("x2")]),
        *(Batch(Source.REST, [good(f"k{i}")]) for i in range(5)),
    ]

    def settle(i: int) -> Callable[[CommitResult | BaseException], None]:
        def done_(result: CommitResult | BaseException) -> None:
            results[i] = result
            if len(results) == len(batches):
                done.set()

        return done_

    try:
        ing.enqueue(batches[0], settle(0))
        assert held.entered.wait(10)
        for i, b in enumerate(batches[1:], start=1):
            ing.enqueue(b, settle(i))
        held.release.set()
        assert done.wait(30)
    finally:
        ing.close()
    got = [results[i] for i in range(len(batches))]
    assert all(isinstance(r, CommitResult) for r in got), got
    counts = [(r.accepted, r.rejected) for r in got if isinstance(r, CommitResult)]
    assert counts == [(1, 0), *[(2, 0)] * 5, (2, 2), *[(1, 0)] * 5]
    assert [(e.index, e.reason) for e in batches[6].errors] == [
        (1, Reason.UNSTORABLE),
        (2, Reason.UNSTORABLE),
    ]
    stored = store.records(None, None, *DAY, None, 100)
    assert len(stored) == 18
    assert {"bad1", "bad2"}.isdisjoint(r.record_id for r in stored)
    assert len(store.rejected(None, 10, Reason.UNSTORABLE.value)) == 2


class Outage:
    """Makes the store's commits fail as an outage would, through the store's own failure
    path: SQLite's write lock held elsewhere (busy timeout 0), PostgreSQL's records table gone."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.undo: Callable[[], None] | None = None

    def start(self) -> None:
        s = self.store
        if isinstance(s, SQLiteStore):
            s._conn.execute("PRAGMA busy_timeout=0")
            blocker = sqlite3.connect(s.path, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")

            def undo() -> None:
                blocker.execute("ROLLBACK")
                blocker.close()
                s._conn.execute("PRAGMA busy_timeout=30000")

        else:
            url = s.url  # type: ignore[attr-defined]
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("ALTER TABLE records RENAME TO records_away")

            def undo() -> None:
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute("ALTER TABLE records_away RENAME TO records")

        self.undo = undo

    def stop(self) -> None:
        assert self.undo is not None
        self.undo()


def test_an_outage_fails_its_requests_and_health_returns_with_the_store(store: Store) -> None:
    ing = ingestor(store, probe_interval_s=0.05)
    outage = Outage(store)
    try:
        assert ing.submit_sync(Batch(Source.REST, [good("before")]), 30).accepted == 1
        outage.start()
        try:
            with pytest.raises(CommitFailed):
                ing.submit_sync(Batch(Source.REST, [good("during")]), 30)
            assert not ing.healthy
            assert ing.last_failure
        finally:
            outage.stop()
        # nothing is sent: the probe finds the store back
        eventually(lambda: ing.healthy, "a probe commit succeeds", 10)
        assert PROBE_KEY in store.state_get([PROBE_KEY])
        r = ing.submit_sync(Batch(Source.REST, [good("during"), good("after")]), 30)
        assert (r.accepted, r.duplicates) == (2, 0)  # "during" was never marked
    finally:
        ing.close()


def test_groups_prepared_behind_a_failed_one_are_prepared_again(tmp_path: Path) -> None:
    """SQLite's two-stage pipeline: a failed transaction voids the groups prepared on it; they
    were never tried, so they commit on their own instead of failing with it."""
    inner = SQLiteStore(str(tmp_path / "v.db"), 86400, NOW)
    prepared = threading.Semaphore(0)
    outage = Outage(inner)

    class FailsFirstApply:
        first = True

        def prepare(self, batches: Sequence[Batch], now_ns: int) -> Any:
            p = inner.prepare(batches, now_ns)
            prepared.release()
            return p

        def apply(self, p: Any) -> list[CommitResult]:
            if not self.first:
                return inner.apply(p)
            self.first = False
            assert prepared.acquire(timeout=10)  # this group's
            assert prepared.acquire(timeout=10)  # and one prepared on top of it
            outage.start()
            try:
                return inner.apply(p)
            finally:
                outage.stop()

        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

    ing = ingestor(FailsFirstApply())
    out: dict[str, CommitResult | BaseException] = {}
    both = threading.Event()

    def settle(name: str) -> Callable[[CommitResult | BaseException], None]:
        def done_(result: CommitResult | BaseException) -> None:
            out[name] = result
            if len(out) == 2:
                both.set()

        return done_

    try:
        ing.enqueue(Batch(Source.REST, [good("one")]), settle("failed"))
        eventually(lambda: ing.queued_records == 1 and not ing._pending, "'one' taken", 10)
        ing.enqueue(Batch(Source.REST, [good("two")]), settle("voided"))
        assert both.wait(30)
    finally:
        ing.close()
    assert isinstance(out["failed"], CommitFailed)
    voided = out["voided"]
    assert isinstance(voided, CommitResult)
    assert voided.accepted == 1
    assert [r.record_id for r in inner.records(None, None, *DAY, None, 10)] == ["two"]
    inner.close()


# --- against a running gateway ---------------------------------------------------------------


def test_gateway_deep_metadata_never_wedges_ingest(client: httpx.Client) -> None:
    for depth in (251, 252, 253, 254):
        r = client.post(
            "/v1/usage", json=[record(value="1", metadata=nested(depth)), record(value="2")]
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["accepted"] + body["rejected"] == 2
        assert body["accepted"] >= 1
        ok = client.post("/v1/usage", json=record(value="3"))
        assert ok.status_code == 200, ok.text
        assert ok.json()["accepted"] == 1
    page = client.get("/v1/usage", params={"window": "raw", "limit": "1000"})
    assert page.status_code == 200, page.text
    assert client.get("/readyz").status_code == 200


def test_gateway_readyz_is_503_while_commits_fail(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path).start()
    try:
        with gw.client() as c:
            assert c.post("/v1/usage", json=record()).status_code == 200
            undo = _break_store(str(gw.config["store"]["url"]))
            try:
                r = c.post("/v1/usage", json=record())
                assert r.status_code == 503, r.text
                assert c.get("/readyz").status_code == 503
            finally:
                undo()
            eventually(lambda: c.get("/readyz").status_code == 200, "ready again", 20)
            assert c.post("/v1/usage", json=record()).status_code == 200
    finally:
        gw.stop()


def _break_store(url: str) -> Callable[[], None]:
    """Make the gateway's commits fail as a broken store would: its records table is gone."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(path_from_url(url), isolation_level=None)
        conn.execute("ALTER TABLE records RENAME TO records_away")

        def undo() -> None:
            conn.execute("ALTER TABLE records_away RENAME TO records")
            conn.close()

        return undo
    with psycopg.connect(url, autocommit=True) as pg:
        pg.execute("ALTER TABLE records RENAME TO records_away")

    def undo_pg() -> None:
        with psycopg.connect(url, autocommit=True) as pg:
            pg.execute("ALTER TABLE records_away RENAME TO records")

    return undo_pg
