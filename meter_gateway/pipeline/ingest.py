"""Group commit: many concurrent requests, one transaction and one fsync per group.

Requests hand their validated ``Batch`` to ``Ingestor.submit`` and await the result. A single
writer thread takes everything pending (up to ``max_commit_records``), commits it through the
store in one transaction and resolves every waiter; a 2xx is only ever sent after that commit.
What waits is bounded three ways, each raising ``Overloaded`` at once (the API answers 429 with
Retry-After) instead of letting a queue grow: bytes in flight (``admission.Budget``: a batch
brings the reservation its request took, or takes ``RECORD_BYTES`` a record here), records
pending (``max_queue_records``) and how long the oldest pending batch has waited
(``max_queue_delay_s``: past it the store is not keeping up and senders are asked to retry).

Stores that split a commit into ``prepare`` (Python: dedup decisions, rows, rollups) and
``apply`` (the transaction and its fsync, which hold no GIL) are driven as a two-stage
pipeline: the writer prepares the next group while a second thread applies the previous one.

A failed group never poisons the next. A group that fails because of what a record holds
(``Unstorable``) is split, batch by batch, and each record the store cannot keep is rejected
alone (reason ``unstorable``, kept in the rejected store) while the rest of its batch commits
in one transaction. Groups voided by an earlier group's failure are prepared again. Any other
failure is the store's (disk full, database down): those requests fail (503) and ``healthy``
is False until a commit succeeds again; while nothing is pending, a small probe commit is
tried every ``probe_interval_s`` so that readiness comes back with the store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import reprlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from meter_gateway.clock import Clock
from meter_gateway.model import Batch, CommitResult, Reason, RecordError, Source, UsageRecord
from meter_gateway.pipeline.admission import RECORD_BYTES, Budget, Overloaded, Reservation
from meter_gateway.store.base import GroupVoided, IngestStore, Unstorable, unstorable_reason
from meter_gateway.telemetry import Telemetry

log = logging.getLogger(__name__)

# Receiver state the health probe writes (a real write: an empty commit would succeed on a
# full disk).
PROBE_KEY = "meter-gateway/commit-probe"
MAX_RAW = 8192  # of a rejected record's text, as validation clips it


class CommitFailed(Exception):
    """The store could not commit; nothing of the batch was stored or marked."""


class ShuttingDown(Exception):
    """The gateway is draining and takes no new batches."""


class PipelinedStore(Protocol):
    def prepare(self, batches: list[Batch], now_ns: int) -> Any: ...

    def apply(self, prepared: Any) -> list[CommitResult]: ...


__all__ = ["CommitFailed", "Ingestor", "Overloaded", "ShuttingDown"]


@dataclass(slots=True)
class _Pending:
    batch: Batch
    done: Callable[[CommitResult | BaseException], None]
    size: int
    reservation: Reservation | None = None  # given back once the batch is settled
    since: float = 0.0  # monotonic seconds when it was queued


class Ingestor:
    def __init__(
        self,
        store: IngestStore,
        clock: Clock,
        telemetry: Telemetry,
        max_queue_records: int,
        max_commit_records: int,
        retry_after_s: float,
        on_commit: Callable[[list[Batch], list[CommitResult]], None] | None = None,
        probe_interval_s: float = 1.0,
        *,
        budget: Budget | None = None,
        max_queue_delay_s: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._on_commit = on_commit  # after every successful commit, before answering
        self._clock = clock
        self._telemetry = telemetry
        self._max_queue = max_queue_records
        self._max_commit = max_commit_records
        self._retry_after = retry_after_s
        self._budget = budget
        self._max_delay = max_queue_delay_s
        self._monotonic = monotonic
        self._pending: deque[_Pending] = deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._closing = False
        # Groups the applier handed back, taken before new ones: (group, split it).
        self._retry: deque[tuple[list[_Pending], bool]] = deque()
        self._in_pipeline = 0  # groups prepared and not settled yet
        self._failure: str | None = None  # the last commit's failure; None once one succeeds
        self._probe_interval = probe_interval_s
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
        # A store that takes concurrent commits (PostgreSQL: the database orders them, as it
        # does across replicas) gets several writers, so one group's Python work overlaps
        # another's transaction; a pipelined store overlaps them itself, with one writer.
        writers = 1 if pipelined else max(1, int(getattr(store, "commit_threads", 1)))
        self._threads = [
            threading.Thread(
                target=self._prepare_loop if pipelined else self._run,
                name="meter-gateway-writer",
                daemon=True,
            )
            for _ in range(writers)
        ]
        for t in self._threads:
            t.start()

    @property
    def queued_records(self) -> int:
        return self._queued

    @property
    def healthy(self) -> bool:
        """False from a commit failed by the store (not by a record) until one succeeds."""
        return self._failure is None

    @property
    def last_failure(self) -> str | None:
        return self._failure

    @property
    def budget(self) -> Budget | None:
        return self._budget

    async def submit(self, batch: Batch, reservation: Reservation | None = None) -> CommitResult:
        """Commit a batch durably; raises Overloaded, CommitFailed or ShuttingDown.

        ``reservation`` (what the batch's request took of the budget) is handed over: it is
        released once the batch is settled, or at once if the batch is refused.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[CommitResult] = loop.create_future()

        def done(result: CommitResult | BaseException) -> None:
            loop.call_soon_threadsafe(_settle, fut, result)

        self.enqueue(batch, done, reservation)
        return await fut

    def submit_sync(
        self, batch: Batch, timeout: float | None = None, reservation: Reservation | None = None
    ) -> CommitResult:
        """The same for callers on plain threads (gRPC, schedulers)."""
        event = threading.Event()
        box: list[CommitResult | BaseException] = []

        def done(result: CommitResult | BaseException) -> None:
            box.append(result)
            event.set()

        self.enqueue(batch, done, reservation)
        if not event.wait(timeout):
            raise CommitFailed("commit did not finish in time")
        result = box[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def enqueue(
        self,
        batch: Batch,
        done: Callable[[CommitResult | BaseException], None],
        reservation: Reservation | None = None,
    ) -> None:
        """Queue ``batch``; ``done`` is called with its result. Takes ``reservation`` over
        (released at settle, or now if this raises); without one, the batch reserves
        ``RECORD_BYTES`` a record of the budget here."""
        try:
            if batch.cumulative:  # a programming error: they would be lost silently
                raise ValueError("running totals must be converted (pipeline.cumulative) first")
            size = len(batch.records) + len(batch.errors)
            if reservation is None and self._budget is not None:
                try:
                    reservation = self._budget.reserve(size * RECORD_BYTES)
                except Overloaded:
                    self._telemetry.overloaded.labels(batch.source.value).inc()
                    raise
            now = self._monotonic()
            with self._cond:
                if self._closing:
                    raise ShuttingDown("the gateway is shutting down")
                # One batch larger than the whole queue still goes in when the queue is empty.
                if self._queued and self._queued + size > self._max_queue:
                    self._telemetry.overloaded.labels(batch.source.value).inc()
                    raise Overloaded(self._retry_after)
                # The oldest batch has waited too long for a commit to take it: the store
                # does not keep up, and queueing more would only make every sender wait.
                if (
                    self._max_delay is not None
                    and self._pending
                    and now - self._pending[0].since > self._max_delay
                ):
                    self._telemetry.overloaded.labels(batch.source.value).inc()
                    raise Overloaded(self._retry_after, "ingest commits are behind")
                self._pending.append(_Pending(batch, done, size, reservation, now))
                self._queued += size
                self._telemetry.queue_records.set(self._queued)
                self._cond.notify()
        except BaseException:
            if reservation is not None:
                reservation.release()
            raise

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking batches, commit everything pending, stop the writer."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if self._applier is not None:
            self._applier.join(timeout)

    def _take(self) -> tuple[list[_Pending], bool] | None:
        """The next group to commit and whether to split it; None once closed and done."""
        with self._cond:
            while True:
                if self._retry:
                    return self._retry.popleft()
                if self._pending:
                    break
                if self._closing:
                    if self._in_pipeline == 0:
                        return None
                    self._cond.wait()  # the applier may hand groups back
                elif self._failure is not None:
                    if not self._cond.wait(self._probe_interval) and not (
                        self._pending or self._retry or self._closing
                    ):
                        return [self._probe()], False
                else:
                    self._cond.wait()
            group: list[_Pending] = []
            n = 0
            while self._pending and (not group or n + self._pending[0].size <= self._max_commit):
                p = self._pending.popleft()
                group.append(p)
                n += p.size
            return group, False

    def _probe(self) -> _Pending:
        stamp = str(self._clock.now_ns()).encode()
        return _Pending(Batch(Source.REST, state={PROBE_KEY: stamp}), lambda _: None, 0)

    def _run(self) -> None:
        while (item := self._take()) is not None:
            self._commit_now(item[0])

    def _prepare_loop(self) -> None:
        store: PipelinedStore = self._store  # type: ignore[assignment]
        try:
            while True:
                self._wait_for_room()
                if (item := self._take()) is None:
                    break
                group, split = item
                if split:
                    self._drain()
                    self._split(group)
                    continue
                start = time.perf_counter()
                try:
                    prepared = store.prepare([p.batch for p in group], self._clock.now_ns())
                except Unstorable:
                    self._drain()  # then commit the parts one after another, here
                    self._split(group)
                    continue
                except Exception as exc:
                    self._failed(group, exc)
                    continue
                with self._cond:
                    self._in_pipeline += 1
                self._prepared.put((group, prepared, time.perf_counter() - start))
        finally:
            self._prepared.put(None)

    def _wait_for_room(self) -> None:
        """Form the next group only once no prepared group waits for the applier: what
        arrives meanwhile joins it. A group prepared while another waited would be cut early
        (every group would be smaller), and the apply costs less per record the larger the
        group (the pages a group's rows and rollups touch are written once per commit)."""
        with self._cond:
            while self._in_pipeline > 1 and not self._closing:
                self._cond.wait()

    def _apply_loop(self) -> None:
        store: PipelinedStore = self._store  # type: ignore[assignment]
        # Work a store does behind its commits (SQLite writes merged rollups), once a group's
        # answers are out.
        behind: Callable[[], None] | None = getattr(store, "write_behind", None)
        while (item := self._prepared.get()) is not None:
            group, prepared, spent = item
            start = time.perf_counter()
            try:
                results = store.apply(prepared)
            except GroupVoided:  # never tried: an earlier group failed
                self._hand_back(group, split=False)
            except Unstorable:
                self._hand_back(group, split=True)
            except Exception as exc:
                self._failed(group, exc)
            else:
                self._settled(group, results, spent + time.perf_counter() - start)
            finally:
                with self._cond:
                    self._in_pipeline -= 1
                    self._cond.notify_all()
            if behind is not None:
                behind()

    def _hand_back(self, group: list[_Pending], split: bool) -> None:
        with self._cond:
            self._retry.append((group, split))
            self._cond.notify_all()

    def _drain(self) -> None:
        """Wait until every prepared group is applied, so this thread may commit alone."""
        with self._cond:
            while self._in_pipeline:
                self._cond.wait()

    # --- the failure path: commits one after another, on the writer thread ----------------

    def _commit_now(self, group: list[_Pending]) -> None:
        start = time.perf_counter()
        try:
            results = self._store.commit([p.batch for p in group], self._clock.now_ns())
        except Unstorable:
            self._split(group)
            return
        except Exception as exc:
            self._failed(group, exc)
            return
        self._settled(group, results, time.perf_counter() - start)

    def _split(self, group: list[_Pending]) -> None:
        """Commit a group that holds something the store cannot keep: halves of it apart (each
        batch keeps its own transaction), down to the batch, whose bad records are rejected."""
        if len(group) > 1:
            mid = len(group) // 2
            self._commit_now(group[:mid])
            self._commit_now(group[mid:])
            return
        (p,) = group
        if not self._reject_unstorable(p.batch):
            # The store refused it but no record is to blame that we can name: fail this
            # batch alone (503) rather than reject records that might be fine.
            self._failed(group, Unstorable("the store refused the batch; no record is at fault"))
            return
        start = time.perf_counter()
        try:
            results = self._store.commit([p.batch], self._clock.now_ns())
        except Exception as exc:  # Unstorable again: a cause we cannot name
            self._failed(group, exc)
            return
        self._settled(group, results, time.perf_counter() - start)

    def _reject_unstorable(self, batch: Batch) -> bool:
        """Move the records no store can keep from the batch's records to its errors (so the
        answer and the rejected store carry them); False if there is none."""
        reasons = [unstorable_reason(r) for r in batch.records]
        if not any(reasons):
            return False
        indexes = _request_indexes(batch)
        kept: list[UsageRecord] = []
        for r, i, reason in zip(batch.records, indexes, reasons, strict=True):
            if reason is None:
                kept.append(r)
                continue
            field, error = reason
            log.warning("record %d of a %s batch cannot be stored: %s", i, batch.source, error)
            batch.errors.append(RecordError(i, field, error, Reason.UNSTORABLE, _describe(r)))
        # An atomic batch stores nothing once one of its records cannot be kept; the receiver
        # answers it as refused (the errors say which record).
        batch.records = [] if batch.atomic else kept
        batch.errors.sort(key=lambda e: e.index)
        return True

    def _failed(self, group: list[_Pending], exc: Exception) -> None:
        if group[0].size == 0 and PROBE_KEY in group[0].batch.state:
            log.debug("the store still fails: %s", exc)  # logged once, when it began
        else:
            log.exception("commit of %d batches failed", len(group), exc_info=exc)
        self._telemetry.commit_failures.inc()
        if not isinstance(exc, Unstorable):  # the store's own failure: not ready
            self._failure = str(exc) or type(exc).__name__
        failure = CommitFailed(f"the store could not commit: {exc}")
        self._release(group)  # before answering: an answered sender may send again at once
        for p in group:
            p.done(failure)

    def _settled(self, group: list[_Pending], results: list[CommitResult], elapsed: float) -> None:
        if self._failure is not None:
            log.warning("commits succeed again (after: %s)", self._failure)
            self._failure = None
        if self._on_commit is not None:
            try:
                self._on_commit([p.batch for p in group], results)
            except Exception:  # a hook must never fail a commit that happened
                log.exception("on_commit hook failed")
        t = self._telemetry
        t.commit_seconds.observe(elapsed)
        t.commit_records.observe(sum(p.size for p in group))
        self._release(group)  # before answering: an answered sender may send again at once
        for p, r in zip(group, results, strict=True):
            src = p.batch.source.value
            t.accepted.labels(src).inc(r.accepted)
            t.duplicates.labels(src).inc(r.duplicates)
            for e in p.batch.errors:
                t.rejected.labels(src, e.reason.value).inc()
            p.done(r)

    def _release(self, group: list[_Pending]) -> None:
        with self._cond:
            self._queued -= sum(p.size for p in group)
            self._telemetry.queue_records.set(self._queued)
        for p in group:
            if p.reservation is not None:
                p.reservation.release()


def _settle(fut: asyncio.Future[CommitResult], result: CommitResult | BaseException) -> None:
    if fut.done():
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)


def _request_indexes(batch: Batch) -> list[int]:
    """Each record's position in its request, as far as the batch tells: records fill the
    positions its errors leave free, in order (true of REST and OTLP requests; a receiver that
    drops items silently shifts them)."""
    taken = {e.index for e in batch.errors}
    out: list[int] = []
    i = 0
    for _ in batch.records:
        while i in taken:
            i += 1
        out.append(i)
        i += 1
    return out


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 8, 200, 200


def _describe(r: UsageRecord) -> str:
    """The record's text for the rejected store: whatever made it unstorable (nesting,
    surrogates, NUL) escaped or cut short."""
    return json.dumps(
        {
            "id": r.record_id,
            "timestamp_ns": r.timestamp_ns,
            "customerId": r.customer_id,
            "dimensionId": r.dimension_id,
            "recordValue": str(r.value),
            "metadata": None if r.metadata is None else _SHORT.repr(r.metadata),
        }
    )[:MAX_RAW]
