"""Admission by bytes in flight (pipeline.admission) and the Ingestor's bounds on what waits:
the memory budget, records pending and the oldest batch's wait, over a real store whose
commits a test can hold."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from meter_gateway.clock import FixedClock
from meter_gateway.model import Batch, CommitResult, Source
from meter_gateway.pipeline.admission import RECORD_BYTES, Budget, Overloaded, TooLarge, Workers
from meter_gateway.pipeline.ingest import Ingestor
from meter_gateway.store import Store
from meter_gateway.telemetry import Telemetry
from tests.helpers import open_store, rec, ts

NOW = ts("2026-05-02T00:00:00")


# --- the budget alone --------------------------------------------------------------------------


def test_reservations_that_fit_are_granted_and_the_next_one_is_refused() -> None:
    seen: list[int] = []
    budget = Budget(1000, 3.0, seen.append)
    a = budget.reserve(600)
    b = budget.reserve(400)  # exactly full
    with pytest.raises(Overloaded) as refused:
        budget.reserve(1)
    assert refused.value.retry_after == 3.0
    assert budget.in_use == 1000  # a refusal takes nothing
    a.release()
    a.release()  # idempotent
    c = budget.reserve(500)
    assert budget.in_use == 900
    b.release()
    c.release()
    assert budget.in_use == 0
    assert seen == [600, 1000, 400, 900, 500, 0]


def test_a_request_alone_is_admitted_past_the_budget_but_not_a_body_larger_than_it() -> None:
    budget = Budget(1000, 1.0)
    # an estimate past the budget goes in when nothing else is in flight (never starved) ...
    with budget.reserve(5000, wire_bytes=900):
        assert budget.in_use == 5000
        with pytest.raises(Overloaded):
            budget.reserve(1)
    # ... but a body that alone exceeds the whole budget could never be admitted: 413
    with pytest.raises(TooLarge, match=r"ingest\.max_inflight_bytes"):
        budget.reserve(6000, wire_bytes=1001)
    assert budget.in_use == 0


def test_growing_past_the_budget_keeps_what_was_held() -> None:
    budget = Budget(1000, 1.0)
    other = budget.reserve(300)
    r = budget.reserve(500)
    r.resize(700)  # fits exactly
    with pytest.raises(Overloaded):
        r.resize(701)
    assert (r.nbytes, budget.in_use) == (700, 1000)
    r.resize(100)  # shrinking always succeeds
    assert budget.in_use == 400
    other.release()
    r.resize(5000)  # alone again: may grow past it
    r.release()
    assert budget.in_use == 0


def test_concurrent_reservations_never_overbook() -> None:
    budget = Budget(10_000, 1.0)
    granted: list[int] = []
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        for _ in range(500):
            try:
                r = budget.reserve(1000)
            except Overloaded:
                continue
            granted.append(budget.in_use)
            r.release()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert granted
    assert max(granted) <= 10_000
    assert budget.in_use == 0


# --- the ingestor's bounds ---------------------------------------------------------------------


class GatedStore:
    """A real store whose commits wait for a gate, so a test can hold the writer busy (one
    transaction per group: the two-stage prepare/apply path is hidden, and so are PostgreSQL's
    concurrent writers: one writer held busy holds every commit)."""

    prepare = None
    apply = None
    commit_threads = 1

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.entered = threading.Event()

    def commit(self, batches: Sequence[Batch], now_ns: int) -> list[CommitResult]:
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return self.inner.commit(batches, now_ns)

    def __getattr__(self, name: str) -> Any:  # reads for the assertions
        return getattr(self.inner, name)


class Clock:
    """Monotonic seconds the test moves."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def store(tmp_path: Path) -> Iterator[GatedStore]:
    s = GatedStore(open_store(tmp_path))
    yield s
    s.gate.set()
    s.inner.close()


def batch(n: int, prefix: str) -> Batch:
    return Batch(
        Source.REST, [rec("2026-05-01T10:00:00", "1", rid=f"{prefix}{i}") for i in range(n)]
    )


def make(
    store: GatedStore, budget: Budget | None, delay: float | None = None, clock: Clock | None = None
) -> Ingestor:
    return Ingestor(
        store,
        FixedClock(NOW),
        Telemetry(),
        1_000_000,
        10_000,
        1.0,
        budget=budget,
        max_queue_delay_s=delay,
        monotonic=clock or Clock(),
    )


def stored_ids(store: GatedStore) -> set[str]:
    rows = store.inner.records(None, None, 0, NOW * 2, None, 100_000)
    return {r.record_id for r in rows if r.record_id is not None}


def test_a_spent_budget_refuses_at_once_without_queuing_and_commits_give_it_back(
    store: GatedStore,
) -> None:
    budget = Budget(100 * RECORD_BYTES, 1.0)
    ing = make(store, budget)

    async def scenario() -> None:
        first = asyncio.ensure_future(ing.submit(batch(60, "a")))  # held in the commit
        await asyncio.get_running_loop().run_in_executor(None, store.entered.wait, 5)
        second = asyncio.ensure_future(ing.submit(batch(40, "b")))  # fills the budget
        await asyncio.sleep(0)
        assert budget.in_use == 100 * RECORD_BYTES
        with pytest.raises(Overloaded, match="memory budget"):
            await ing.submit(batch(1, "c"))
        assert ing.queued_records == 100  # the refused batch was never queued
        store.gate.set()
        assert (await first).accepted == 60
        assert (await second).accepted == 40
        assert budget.in_use == 0  # released once committed
        assert (await ing.submit(batch(100, "d"))).accepted == 100

    asyncio.run(scenario())
    ing.close()
    ids = stored_ids(store)
    assert len(ids) == 200
    assert not any(i.startswith("c") for i in ids)


def test_a_handed_over_reservation_is_released_at_commit_or_at_once_when_refused(
    store: GatedStore,
) -> None:
    budget = Budget(10_000, 1.0)
    ing = make(store, budget)
    store.gate.set()
    r = budget.reserve(6000)
    assert ing.submit_sync(batch(3, "a"), 10, r).accepted == 3
    assert budget.in_use == 0  # the ingestor took nothing more, and gave it back
    ing.close()
    r = budget.reserve(6000)
    with pytest.raises(Exception, match="shutting down"):
        ing.submit_sync(batch(1, "b"), 10, r)
    assert budget.in_use == 0


def test_batches_wait_no_longer_than_the_queue_delay(store: GatedStore) -> None:
    clock = Clock()
    ing = make(store, None, delay=2.0, clock=clock)

    async def scenario() -> None:
        first = asyncio.ensure_future(ing.submit(batch(5, "a")))  # held in the commit
        await asyncio.get_running_loop().run_in_executor(None, store.entered.wait, 5)
        second = asyncio.ensure_future(ing.submit(batch(5, "b")))  # waits from t=100
        await asyncio.sleep(0)
        clock.t += 2.0
        third = asyncio.ensure_future(ing.submit(batch(5, "c")))  # 2 s: not past the bound
        await asyncio.sleep(0)
        clock.t += 0.5
        with pytest.raises(Overloaded, match="behind"):
            await ing.submit(batch(5, "d"))
        store.gate.set()
        assert [(await f).accepted for f in (first, second, third)] == [5, 5, 5]
        assert (await ing.submit(batch(5, "e"))).accepted == 5  # nothing waits: admitted

    asyncio.run(scenario())
    ing.close()
    assert not any(i.startswith("d") for i in stored_ids(store))


# --- the decode workers ------------------------------------------------------------------------


def test_decode_workers_refuse_new_work_while_the_oldest_task_waits_too_long() -> None:
    clock = Clock()
    workers = Workers(1, 2.0, 1.0, monotonic=clock)
    gate, started = threading.Event(), threading.Event()

    def hold() -> str:
        started.set()
        assert gate.wait(30)
        return "held"

    async def scenario() -> None:
        busy = asyncio.ensure_future(workers.run(hold))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 30)
        waiting = asyncio.ensure_future(workers.run(str.upper, "queued"))  # no thread for it
        await asyncio.sleep(0)
        workers.admit()  # it has only just begun waiting
        clock.t += 2.5
        with pytest.raises(Overloaded, match="decoding is behind"):
            workers.admit()
        gate.set()
        assert (await busy, await waiting) == ("held", "QUEUED")
        workers.admit()  # nothing waits any more

    asyncio.run(scenario())
    workers.shutdown()
