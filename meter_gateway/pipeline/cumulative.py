"""Cumulative counters → deltas per series, against state that commits with the records.

Every receiver that takes running totals (OTLP cumulative sums, Vector absolute counters,
Prometheus remote write) converts them here. Per series the state keeps (start, last time, last
value[, last sum]); it is written through ``Batch.state`` under the receiver's key prefix, so it
moves in the same transaction as the records it produced: a crash between the two is impossible.

The rules (``convert``), as WIRE_FORMATS.md gives them for OTLP: on a series' first point a start
before the point's time is a true start (the whole value is the delta), an unknown start (0, or
equal to the time) only sets the baseline. A later start time is a new run (an app restart): its
value counts from zero again. A drop in a monotonic total is a reset within the run: the new value
is the delta. A point at or before the last time seen is a repeat and adds nothing; a step of zero
adds no record (the state still moves). Senders that carry no start time (Vector, Prometheus)
pass 0: their first point is a baseline and a drop is a reset.

``StreamTable`` holds every series a request converts from reading its state until the batch
has committed, so two requests touching one series never compute against the same old state.
Across replicas the batch carries the state it converted against (``Batch.state_expect``); a
replica that lost the race gets ``CommitResult.conflict``, with nothing written, and converts
again against the state the other replica committed.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal
from typing import NamedTuple, Protocol

import orjson

from meter_gateway.decimals import EXACT, ZERO
from meter_gateway.model import (
    Batch,
    CommitResult,
    Observation,
    ObservationKind,
    RecordError,
    Source,
)

# Why a point added nothing; label values of the receivers' skipped-points counters.
SKIP_REPEATED = "repeated"  # a cumulative point already counted (a retried request)
SKIP_BASELINE = "baseline"  # first point of a run with an unknown start time
SKIP_UNCHANGED = "unchanged"  # a cumulative value that did not move


class StateReader(Protocol):
    """Reads committed receiver state (``store.base.Store``)."""

    def state_get(self, keys: Sequence[str]) -> dict[str, bytes]: ...

    def state_scan(self, prefix: str) -> dict[str, bytes]: ...


class ObservationSink(Protocol):
    """Maps and validates observations (``pipeline.validate.Validator``)."""

    def observations(self, observations: Sequence[Observation], source: Source) -> Batch: ...


class Committer(Protocol):
    """Commits a batch durably (``pipeline.ingest.Ingestor``)."""

    def submit_sync(self, batch: Batch, timeout: float | None = None) -> CommitResult: ...


# Conversions of one request redone after other replicas moved its series first.
STATE_CONFLICT_RETRIES = 5


class StreamsBusy(Exception):
    """Another request held the same cumulative series for too long; retry."""


class StreamState(NamedTuple):
    """The last committed point of a cumulative series."""

    start: int
    time: int
    value: Decimal  # the running total (a histogram's count)
    sum: Decimal | None = None  # a histogram's running sum


def encode_state(s: StreamState) -> bytes:
    """``start time value [sum]``: plain ASCII, cheap to write once per point."""
    if s.sum is None:
        return f"{s.start} {s.time} {s.value}".encode()
    return f"{s.start} {s.time} {s.value} {s.sum}".encode()


def decode_state(raw: bytes) -> StreamState:
    parts = raw.split()
    total = Decimal(parts[3].decode()) if len(parts) > 3 else None
    return StreamState(int(parts[0]), int(parts[1]), Decimal(parts[2].decode()), total)


class Step(NamedTuple):
    """What one cumulative point adds: ``kind`` is "delta", a SKIP_* reason or "stale"."""

    kind: str
    delta: Decimal
    delta_sum: Decimal | None
    state: StreamState | None  # the series' state after the point (None: unchanged)


def convert(
    state: StreamState | None,
    start: int,
    t: int,
    value: Decimal,
    total: Decimal | None,
    monotonic: bool,
) -> Step:
    """One cumulative point against its series' last state (pure; see the module docstring)."""
    new = StreamState(start, t, value, total)
    if state is None or start > state.start:
        if start == 0 or start >= t:  # unknown start: the value so far is only a baseline
            return Step(SKIP_BASELINE, ZERO, None, new)
        return Step("delta", value, total, new)
    if start < state.start:
        return Step("stale", ZERO, None, None)
    if t <= state.time:
        return Step(SKIP_REPEATED, ZERO, None, None)
    if monotonic and value < state.value:  # a reset within one run: count from zero
        return Step("delta", value, total, new)
    delta = EXACT.subtract(value, state.value)
    if total is None:
        dsum = None
    else:
        dsum = EXACT.subtract(total, state.sum) if state.sum is not None else total
    if delta == 0 and not dsum:
        return Step(SKIP_UNCHANGED, ZERO, None, new)
    return Step("delta", delta, dsum, new)


class StreamTable:
    """Committed state of one receiver's cumulative series: a cache over the store, and a hold
    per series.

    Holds are taken all at once or not at all, so requests cannot deadlock. The cache only ever
    moves after a successful commit (``committed``). State keys are ``prefix + series id``.
    """

    def __init__(
        self,
        reader: StateReader,
        prefix: str,
        max_cached: int = 1_000_000,
        wait_s: float = 30.0,
    ) -> None:
        self.prefix = prefix
        self._reader = reader
        self._max_cached = max_cached
        self._wait_s = wait_s
        self._cond = threading.Condition()
        self._held: set[str] = set()
        self._cache: dict[str, StreamState] = {}

    @contextmanager
    def hold(self, sids: set[str]) -> Iterator[None]:
        deadline = time.monotonic() + self._wait_s
        with self._cond:
            while not self._held.isdisjoint(sids):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._cond.wait(remaining):
                    raise StreamsBusy("cumulative series are busy with another request")
            self._held |= sids
        try:
            yield
        finally:
            with self._cond:
                self._held -= sids
                self._cond.notify_all()

    def load(self, sids: Iterable[str]) -> dict[str, StreamState]:
        """The committed state of held series (absent: never seen)."""
        out: dict[str, StreamState] = {}
        missing: list[str] = []
        cache = self._cache
        for sid in sids:
            st = cache.get(sid)
            if st is None:
                missing.append(sid)
            else:
                out[sid] = st
        if missing:
            prefix = self.prefix
            rows = self._reader.state_get([prefix + s for s in missing])
            for key, raw in rows.items():
                out[key[len(prefix) :]] = decode_state(raw)
        return out

    def writes(self, changed: dict[str, StreamState]) -> dict[str, bytes | None]:
        """``Batch.state`` entries that commit these series' new state."""
        prefix = self.prefix
        return {prefix + sid: encode_state(s) for sid, s in changed.items()}

    def expect(
        self, changed: Iterable[str], states: dict[str, StreamState]
    ) -> dict[str, bytes | None]:
        """``Batch.state_expect`` for series about to move: the state they were converted
        against (None: none). Another replica may have moved a series since this one cached
        it; the store then commits nothing of the batch (``CommitResult.conflict``)."""
        prefix = self.prefix
        return {
            prefix + sid: encode_state(states[sid]) if sid in states else None for sid in changed
        }

    def committed(self, states: dict[str, StreamState]) -> None:
        if len(self._cache) + len(states) > self._max_cached:
            self._cache.clear()
        self._cache.update(states)

    def forget(self, sids: Iterable[str]) -> None:
        for sid in sids:
            self._cache.pop(sid, None)

    def stale(self, before_ns: int, limit: int = 10_000) -> set[str]:
        """Up to ``limit`` series whose committed last point is older than ``before_ns``."""
        prefix = self.prefix
        rows = self._reader.state_scan(prefix)
        old = sorted(
            key[len(prefix) :] for key, raw in rows.items() if decode_state(raw).time < before_ns
        )
        return set(old[:limit])


def series_id(obs: Observation) -> str:
    """A series' identity: its name and every attribute (resource attributes included)."""
    identity = [obs.name, sorted(obs.attributes.items()), sorted(obs.resource_attributes.items())]
    return hashlib.blake2b(orjson.dumps(identity), digest_size=16).hexdigest()


class Totals:
    """Commits batches that carry running totals (``Batch.cumulative``) from senders without
    start times: Vector absolute counters, Prometheus remote write.

    Under a hold on the batch's series it reads their committed state, turns each total into
    the amount since the previous one (``convert`` with an unknown start: a series' first total
    is its baseline, a drop is a counter reset), validates those amounts, and commits them with
    the series' new state in one transaction. An amount's natural key is (series, time), so a
    resent request adds nothing; a total that did not move adds no record.
    """

    def __init__(
        self,
        table: StreamTable,
        sink: ObservationSink,
        committer: Committer,
        commit_timeout_s: float = 60.0,
    ) -> None:
        self.table = table
        self._sink = sink
        self._committer = committer
        self._timeout = commit_timeout_s

    def convert(self, batch: Batch, sids: Sequence[str] | None = None) -> dict[str, StreamState]:
        """Move ``batch.cumulative`` into records and errors (the caller holds the series;
        ``sids`` are their ids as ``holding`` yielded them); returns the series whose state
        moves with the batch, also set in ``batch.state``."""
        if sids is None:
            sids = [series_id(obs) for _, obs in batch.cumulative]
        pending = sorted(
            zip(batch.cumulative, sids, strict=True), key=lambda p: p[0][1].timestamp_ns
        )
        states = self.table.load(set(sids))
        changed: dict[str, StreamState] = {}
        amounts: list[Observation] = []
        ordinals: list[int] = []
        amount = ObservationKind.AMOUNT
        for (index, obs), sid in pending:
            t = obs.timestamp_ns
            step = convert(changed.get(sid) or states.get(sid), 0, t, obs.value, None, True)
            if step.state is not None:
                changed[sid] = step.state
            if step.kind == "delta":
                amounts.append(
                    Observation(
                        obs.source,
                        obs.name,
                        obs.attributes,
                        step.delta,
                        amount,
                        t,
                        f"{sid}:{t}",
                        obs.resource_attributes,
                    )
                )
                ordinals.append(index)
        if amounts:
            checked = self._sink.observations(amounts, batch.source)
            batch.records.extend(checked.records)
            batch.errors.extend(
                RecordError(ordinals[e.index], e.field, e.error, e.reason, e.raw)
                for e in checked.errors
            )
            batch.errors.sort(key=lambda e: e.index)
        batch.cumulative = []
        batch.state.update(self.table.writes(changed))
        batch.state_expect.update(self.table.expect(changed, states))
        return changed

    @contextmanager
    def holding(self, batch: Batch) -> Iterator[list[str]]:
        """Hold the series of ``batch.cumulative`` (for convert, then commit); yields their
        ids, in ``batch.cumulative`` order, for ``convert``."""
        sids = [series_id(obs) for _, obs in batch.cumulative]
        with self.table.hold(set(sids)):
            yield sids

    def commit(self, batch: Batch, check: Callable[[Batch], None] | None = None) -> CommitResult:
        """Convert and commit in one go (blocks until durable; run it on a worker thread).

        ``check`` sees each converted batch before it is submitted and may raise to commit
        nothing (an atomic request with invalid records). A conflict (another replica moved a
        series first) converts again from fresh state.
        """
        with self.holding(batch) as sids:
            cumulative, records = list(batch.cumulative), list(batch.records)
            errors, state, expect = list(batch.errors), dict(batch.state), dict(batch.state_expect)
            for _ in range(STATE_CONFLICT_RETRIES):
                changed = self.convert(batch, sids)
                if check is not None:
                    check(batch)
                result = self._committer.submit_sync(batch, self._timeout)
                if not result.conflict:
                    self.table.committed(changed)
                    return result
                # Another replica moved these series first: forget what we cached, convert again.
                self.table.forget(sids)
                batch.cumulative, batch.records = list(cumulative), list(records)
                batch.errors = list(errors)
                batch.state, batch.state_expect = dict(state), dict(expect)
        raise StreamsBusy("cumulative series kept moving on other replicas; retry")
