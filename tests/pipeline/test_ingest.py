"""Group commit and back-pressure of the Ingestor, over a real SQLite store."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from meter_gateway.clock import FixedClock
from meter_gateway.model import Batch, CommitResult, Source
from meter_gateway.pipeline.ingest import CommitFailed, Ingestor, Overloaded, ShuttingDown
from meter_gateway.store.sqlite import SQLiteStore
from meter_gateway.telemetry import Telemetry
from tests.helpers import eventually, open_store, rec, ts


class GatedStore:
    """A real store whose commits wait for a gate, so a test can hold the writer busy."""

    def __init__(self, inner: SQLiteStore) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.groups: list[int] = []
        self.fail = False

    def commit(self, batches: Sequence[Batch], now_ns: int) -> list[CommitResult]:
        self.entered.set()
        self.gate.wait(10)
        self.groups.append(len(batches))
        if self.fail:
            raise OSError("disk full")
        return self.inner.commit(batches, now_ns)


def batch(n: int, prefix: str) -> Batch:
    return Batch(
        Source.REST, [rec("2026-05-01T10:00:00", "1", rid=f"{prefix}{i}") for i in range(n)]
    )


@pytest.fixture
def store(tmp_path: Path) -> GatedStore:
    return GatedStore(open_store(tmp_path))


def make(store: GatedStore, max_queue: int = 100) -> Ingestor:
    return Ingestor(
        store, FixedClock(ts("2026-05-02T00:00:00")), Telemetry(), max_queue, 10_000, 1.0
    )  # type: ignore[arg-type]


def ingestor_on(
    store: object,
    max_queue: int = 1000,
    max_commit: int = 1000,
    now: str = "2026-05-01T12:00:00",
    **kwargs: Any,
) -> Ingestor:
    """An ingestor over any store (or stand-in), its clock fixed at ``now``."""
    return Ingestor(
        store,  # type: ignore[arg-type]
        FixedClock(ts(now)),
        Telemetry(),
        max_queue,
        max_commit,
        1.0,
        **kwargs,
    )


async def queued(ing: Ingestor, records: int) -> None:
    """Wait until ``records`` records are queued (held ones included), polling on a thread so
    the event loop keeps running the submitting tasks."""
    await asyncio.get_running_loop().run_in_executor(
        None, eventually, lambda: ing.queued_records == records, f"{records} records queued", 5
    )


def test_full_queue_answers_overloaded_instead_of_growing(store: GatedStore) -> None:
    ing = make(store, max_queue=100)

    async def scenario() -> None:
        first = asyncio.ensure_future(ing.submit(batch(60, "a")))
        await asyncio.get_running_loop().run_in_executor(None, store.entered.wait, 5)
        second = asyncio.ensure_future(ing.submit(batch(30, "b")))  # queued behind the first
        await queued(ing, 90)
        with pytest.raises(Overloaded):
            await ing.submit(batch(20, "c"))  # 60 + 30 + 20 > 100
        store.gate.set()
        assert (await first).accepted == 60
        assert (await second).accepted == 30

    asyncio.run(scenario())
    ing.close()
    store.inner.close()


def test_waiting_batches_commit_together_in_one_group(store: GatedStore) -> None:
    ing = make(store, max_queue=10_000)

    async def scenario() -> list[CommitResult]:
        first = asyncio.ensure_future(ing.submit(batch(1, "first")))
        await asyncio.get_running_loop().run_in_executor(None, store.entered.wait, 5)
        rest = [asyncio.ensure_future(ing.submit(batch(10, f"r{i}-"))) for i in range(5)]
        await queued(ing, 1 + 5 * 10)  # all five wait behind the first before it ends
        store.gate.set()
        await first
        return list(await asyncio.gather(*rest))

    results = asyncio.run(scenario())
    assert [r.accepted for r in results] == [10] * 5
    assert store.groups == [1, 5]  # the five waiting batches shared one transaction
    ing.close()
    store.inner.close()


def test_failed_commit_fails_every_waiter_and_stores_nothing(store: GatedStore) -> None:
    ing = make(store)
    store.fail = True
    store.gate.set()
    with pytest.raises(CommitFailed, match="disk full"):
        ing.submit_sync(batch(5, "x"), timeout=5)
    store.fail = False
    assert ing.submit_sync(batch(5, "x"), timeout=5).accepted == 5  # no key was left marked
    ing.close()
    with pytest.raises(ShuttingDown):
        ing.submit_sync(batch(1, "y"))
    store.inner.close()


@pytest.mark.parametrize("pipelined", [True, False])
def test_on_commit_sees_every_committed_group(tmp_path: Path, pipelined: bool) -> None:
    """The two-stage pipeline (a store with prepare/apply) and the plain commit call the hook
    alike: once per committed group, with its batches and results, before the answer."""
    inner = SQLiteStore(str(tmp_path / "h.db"), 86400, ts("2026-05-01T12:00:00"))
    store = inner if pipelined else GatedStore(inner)
    if not pipelined:
        store.gate.set()
    seen: list[tuple[int, int]] = []

    def hook(batches: list[Batch], results: list[CommitResult]) -> None:
        seen.append((len(batches), sum(r.accepted for r in results)))

    ingestor = ingestor_on(store, on_commit=hook)
    try:
        first = ingestor.submit_sync(batch(3, "a"), 10)
        assert seen == [(1, 3)]
        again = ingestor.submit_sync(batch(3, "a"), 10)
        assert (first.accepted, again.duplicates) == (3, 3)
        assert seen == [(1, 3), (1, 0)]
    finally:
        ingestor.close()
        inner.close()


class GatedPipeline:
    """A real SQLite store on the two-stage path whose applies wait for a gate; it notes how
    many batches each prepared group holds."""

    def __init__(self, inner: SQLiteStore) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.groups: list[int] = []

    def prepare(self, batches: Sequence[Batch], now_ns: int) -> object:
        self.groups.append(len(batches))
        return self.inner.prepare(batches, now_ns)

    def apply(self, prepared: object) -> list[CommitResult]:
        assert self.gate.wait(10), "the test never opened the gate"
        return self.inner.apply(prepared)  # type: ignore[arg-type]

    def commit(self, batches: Sequence[Batch], now_ns: int) -> list[CommitResult]:
        return self.apply(self.prepare(batches, now_ns))


def test_the_next_group_is_formed_once_no_prepared_group_waits(tmp_path: Path) -> None:
    """While one group is applied and the next waits prepared, batches that arrive are not cut
    into a group of their own yet: they wait and go together, once the waiting group is taken
    (larger groups cost less per record to apply)."""
    store = GatedPipeline(SQLiteStore(str(tmp_path / "p.db"), 86400, ts("2026-05-01T12:00:00")))
    ingestor = ingestor_on(store)
    threads: list[threading.Thread] = []

    def send(prefix: str) -> None:
        t = threading.Thread(target=ingestor.submit_sync, args=(batch(2, prefix), 10))
        t.start()
        threads.append(t)

    try:
        send("a")
        eventually(lambda: store.groups == [1], "the first group prepared and held in apply")
        send("b")
        eventually(lambda: store.groups == [1, 1], "the second group prepared, waiting")
        send("c")
        send("d")
        eventually(lambda: ingestor.queued_records == 8, "c and d queued beside a and b")
        assert store.groups == [1, 1]  # c and d wait: no group is cut while b waits
        store.gate.set()
        for t in threads:
            t.join(10)
        assert store.groups == [1, 1, 2]
        stored = store.inner.records(None, None, 0, 2**62, None, 100)
        assert len(stored) == 8
    finally:
        store.gate.set()
        ingestor.close()
        store.inner.close()


class ConcurrentStore:
    """A store that declares two writers: each commit waits at a barrier for the other
    writer's, so commits only go through when two are in flight at once (then one at a time
    into the real store)."""

    commit_threads = 2

    def __init__(self, inner: SQLiteStore) -> None:
        self.inner = inner
        self.barrier = threading.Barrier(2, timeout=10)
        self.lock = threading.Lock()

    def commit(self, batches: Sequence[Batch], now_ns: int) -> list[CommitResult]:
        self.barrier.wait()  # BrokenBarrierError if only one writer ever commits
        with self.lock:
            return self.inner.commit(batches, now_ns)


def test_a_store_with_two_commit_threads_gets_two_writers(tmp_path: Path) -> None:
    store = ConcurrentStore(SQLiteStore(str(tmp_path / "c.db"), 86400, ts("2026-05-01T12:00:00")))
    # a group is one batch of 2: the two batches go to the two writers
    ingestor = ingestor_on(store, max_commit=2)
    results: list[CommitResult] = []
    try:
        threads = [
            threading.Thread(
                target=lambda p=p: results.append(ingestor.submit_sync(batch(2, p), 10))
            )
            for p in ("a", "b")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        assert sorted(r.accepted for r in results) == [2, 2]
        assert len(store.inner.records(None, None, 0, 2**62, None, 100)) == 4
    finally:
        ingestor.close()
        store.inner.close()


def test_concurrent_senders_count_every_id_once(tmp_path: Path) -> None:
    """Many senders, overlapping ids, through the store the suite runs on (PostgreSQL commits
    with two writers at once, SQLite through its pipeline): every id is stored once and every
    answer says what it added."""
    inner = open_store(tmp_path)
    ingestor = ingestor_on(inner, 100_000, 300, now="2026-05-02T00:00:00")
    answers: list[CommitResult] = []
    lock = threading.Lock()

    def sender(k: int) -> None:
        for j in range(10):
            # ids 0..59 over and over, from every sender: most are sent more than once
            ids = [f"id{(k * 7 + j * 13 + i) % 60}" for i in range(25)]
            b = Batch(Source.REST, [rec("2026-05-01T10:00:00", "1", rid=i) for i in ids])
            got = ingestor.submit_sync(b, 30)
            with lock:
                answers.append(got)

    try:
        threads = [threading.Thread(target=sender, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(answers) == 80
        assert sum(a.accepted for a in answers) == 60  # each id once, whoever sent it first
        assert sum(a.accepted + a.duplicates for a in answers) == 80 * 25
        stored = inner.records(None, None, 0, 2**62, None, 10_000)
        assert sorted(r.record_id or "" for r in stored) == sorted(f"id{i}" for i in range(60))
    finally:
        ingestor.close()
        inner.close()
