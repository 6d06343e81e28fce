"""Group commit: many concurrent requests, one transaction and one fsync per group.

Requests hand their validated ``Batch`` to ``Ingestor.submit`` and await the result. A single
writer thread takes everything pending (up to ``max_commit_records``), commits it through the
store in one transaction and resolves every waiter; a 2xx is only ever sent after that commit.
Pending records are bounded: past ``max_queue_records`` submit raises ``Overloaded`` at once
(the API answers 429 with Retry-After) instead of letting memory grow.

Stores that split a commit into ``prepare`` (Python: dedup decisions, rows, rollups) and
``apply`` (the transaction and its fsync, which hold no GIL) are driven as a two-stage
pipeline: the writer prepares the next group while a second thread applies the previous one.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from meter_gateway.clock import Clock
from meter_gateway.model import Batch, CommitResult
from meter_gateway.store.base import Store
from meter_gateway.telemetry import Telemetry

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The commit queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"ingest queue is full; retry after {retry_after:g}s")
        self.retry_after = retry_after


class CommitFailed(Exception):
    """The store could not commit; nothing of the batch was stored or marked."""


class ShuttingDown(Exception):
    """The gateway is draining and takes no new batches."""


class PipelinedStore(Protocol):
    def prepare(self, batches: list[Batch], now_ns: int) -> Any: ...

    def apply(self, prepared: Any) -> list[CommitResult]: ...


@dataclass(slots=True)
class _Pending:
    batch: Batch
    done: Callable[[CommitResult | BaseException], None]
    size: int


class Ingestor:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        telemetry: Telemetry,
        max_queue_records: int,
        max_commit_records: int,
        retry_after_s: float,
        on_commit: Callable[[list[Batch], list[CommitResult]], None] | None = None,
    ) -> None:
        self._store = store
        self._on_commit = on_commit  # after every successful commit, before answering
        self._clock = clock
        self._telemetry = telemetry
        self._max_queue = max_queue_records
        self._max_commit = max_commit_records
        self._retry_after = retry_after_s
        self._pending: deque[_Pending] = deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._closing = False
        pipelined = callable(getattr(store, "prepare", None)) and callable(
            getattr(store, "apply", None)
        )
        self._applier: threading.Thread | None = None
        if pipelined:
            # One prepared group waits while another is applied: enough to overlap the two.
            self._prepared: queue.Queue[tuple[list[_Pending], Any, float] | None] = queue.Queue(1)
            self._applier = threading.Thread(
                target=self._apply_loop, name="meter-gateway-applier", daemon=True
            )
            self._applier.start()
        self._thread = threading.Thread(
            target=self._prepare_loop if pipelined else self._run,
            name="meter-gateway-writer",
            daemon=True,
        )
        self._thread.start()

    @property
    def queued_records(self) -> int:
        return self._queued

    async def submit(self, batch: Batch) -> CommitResult:
        """Commit a batch durably; raises Overloaded, CommitFailed or ShuttingDown."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[CommitResult] = loop.create_future()

        def done(result: CommitResult | BaseException) -> None:
            loop.call_soon_threadsafe(_settle, fut, result)

        self.enqueue(batch, done)
        return await fut

    def submit_sync(self, batch: Batch, timeout: float | None = None) -> CommitResult:
        """The same for callers on plain threads (gRPC, schedulers)."""
        event = threading.Event()
        box: list[CommitResult | BaseException] = []

        def done(result: CommitResult | BaseException) -> None:
            box.append(result)
            event.set()

        self.enqueue(batch, done)
        if not event.wait(timeout):
            raise CommitFailed("commit did not finish in time")
        result = box[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def enqueue(self, batch: Batch, done: Callable[[CommitResult | BaseException], None]) -> None:
        if batch.cumulative:  # a programming error: they would be lost silently
            raise ValueError("running totals must be converted (pipeline.cumulative) first")
        size = len(batch.records) + len(batch.errors)
        with self._cond:
            if self._closing:
                raise ShuttingDown("the gateway is shutting down")
            # One batch larger than the whole queue still goes in when the queue is empty.
            if self._queued and self._queued + size > self._max_queue:
                self._telemetry.overloaded.labels(batch.source.value).inc()
                raise Overloaded(self._retry_after)
            self._pending.append(_Pending(batch, done, size))
            self._queued += size
            self._telemetry.queue_records.set(self._queued)
            self._cond.notify()

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking batches, commit everything pending, stop the writer."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._applier is not None:
            self._applier.join(timeout)

    def _take(self) -> list[_Pending] | None:
        with self._cond:
            while not self._pending and not self._closing:
                self._cond.wait()
            if not self._pending:
                return None
            group: list[_Pending] = []
            n = 0
            while self._pending and (not group or n + self._pending[0].size <= self._max_commit):
                p = self._pending.popleft()
                group.append(p)
                n += p.size
            return group

    def _run(self) -> None:
        while (group := self._take()) is not None:
            start = time.perf_counter()
            try:
                results = self._store.commit([p.batch for p in group], self._clock.now_ns())
            except Exception as exc:
                self._failed(group, exc)
                continue
            self._settled(group, results, time.perf_counter() - start)

    def _prepare_loop(self) -> None:
        store: PipelinedStore = self._store  # type: ignore[assignment]
        try:
            while (group := self._take()) is not None:
                start = time.perf_counter()
                try:
                    prepared = store.prepare([p.batch for p in group], self._clock.now_ns())
                except Exception as exc:
                    self._failed(group, exc)
                    continue
                self._prepared.put((group, prepared, time.perf_counter() - start))
        finally:
            self._prepared.put(None)

    def _apply_loop(self) -> None:
        store: PipelinedStore = self._store  # type: ignore[assignment]
        while (item := self._prepared.get()) is not None:
            group, prepared, spent = item
            start = time.perf_counter()
            try:
                results = store.apply(prepared)
            except Exception as exc:
                self._failed(group, exc)
                continue
            self._settled(group, results, spent + time.perf_counter() - start)

    def _failed(self, group: list[_Pending], exc: Exception) -> None:
        log.exception("commit of %d batches failed", len(group), exc_info=exc)
        self._telemetry.commit_failures.inc()
        failure = CommitFailed(f"the store could not commit: {exc}")
        for p in group:
            p.done(failure)
        self._release(group)

    def _settled(self, group: list[_Pending], results: list[CommitResult], elapsed: float) -> None:
        if self._on_commit is not None:
            try:
                self._on_commit([p.batch for p in group], results)
            except Exception:  # a hook must never fail a commit that happened
                log.exception("on_commit hook failed")
        t = self._telemetry
        t.commit_seconds.observe(elapsed)
        t.commit_records.observe(sum(p.size for p in group))
        for p, r in zip(group, results, strict=True):
            src = p.batch.source.value
            t.accepted.labels(src).inc(r.accepted)
            t.duplicates.labels(src).inc(r.duplicates)
            for e in p.batch.errors:
                t.rejected.labels(src, e.reason.value).inc()
            p.done(r)
        self._release(group)

    def _release(self, group: list[_Pending]) -> None:
        with self._cond:
            self._queued -= sum(p.size for p in group)
            self._telemetry.queue_records.set(self._queued)


def _settle(fut: asyncio.Future[CommitResult], result: CommitResult | BaseException) -> None:
    if fut.done():
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)
