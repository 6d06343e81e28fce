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
``StreamGroups`` does the same with one state row (and one hold) per group of series (OTLP: a
metric of one resource and scope), so a commit writes and compares a row per metric, not one
per point. ``TotalGroups`` keeps remote write's series that way too, in groups of the series
first seen together (a sender gives no grouping of its own), each series pointing to its group.
Across replicas the batch carries the state it converted against (``Batch.state_expect``); a
replica that lost the race gets ``CommitResult.conflict``, with nothing written, and converts
again against the state the other replica committed.

Running totals are checked before they convert: a total whose time the validator would refuse
(``TimeWindow``, the validator's wording) is rejected, never made its series' state (one total
from the far future would make every later one an old repeat), and a step that the 120-digit
``EXACT`` context would round (``InexactStep``) is rejected instead of stored altered.

``SeriesMappings`` remembers how each series maps, learned from the validator's verdict on one
of its amounts under the current catalog snapshot; later amounts of the series become records
directly when they are plainly acceptable, and anything else still goes through the validator.
"""

from __future__ import annotations

import decimal
import hashlib
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from decimal import Decimal, localcontext
from functools import partial
from operator import itemgetter
from typing import Any, NamedTuple, Protocol, TypeVar

import orjson

from meter_gateway.catalog import Catalog
from meter_gateway.clock import Clock
from meter_gateway.config import IngestConfig
from meter_gateway.decimals import EXACT, MAX_ABS, MAX_PLACES, ZERO, DecimalError
from meter_gateway.model import (
    Batch,
    CommitResult,
    Observation,
    ObservationKind,
    Reason,
    RecordError,
    Source,
    UsageRecord,
    dedup_prefix,
)
from meter_gateway.pipeline.decode import clip_json
from meter_gateway.pipeline.mapping import Mapped, Mapper
from meter_gateway.pipeline.validate import time_window_error

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


# Steps between totals: EXACT, but a step that would need more than its 120 digits raises
# instead of rounding. parse_value bounds every total (|v| < 1e21, 18 places: 39 digits), so
# only a total that skipped it can get here; it is refused, never stored altered.
_STEPS = EXACT.copy()
_STEPS.traps[decimal.Inexact] = True


class InexactStep(DecimalError):
    """The step between two totals does not fit the exact context; the total is refused."""


def step_between(value: Decimal, previous: Decimal) -> Decimal:
    """``value - previous``, exactly, or ``InexactStep``."""
    try:
        return _STEPS.subtract(value, previous)
    except decimal.Inexact:
        raise InexactStep(
            f"the step from the previous total {previous} to {value} needs more than "
            f"{EXACT.prec} digits: expected totals with at most {MAX_PLACES} decimal places"
        ) from None


class TimeWindow:
    """The validator's late-arrival and future limits, for running totals checked before they
    convert, in the validator's words (``pipeline.validate``; OTLP's golden files hold them)."""

    def __init__(self, clock: Clock, limits: IngestConfig) -> None:
        self._clock = clock
        self._limits = limits
        self._late_ns = int(limits.late_arrival_limit.total_seconds()) * 1_000_000_000
        self._future_ns = int(limits.future_tolerance.total_seconds()) * 1_000_000_000

    def bounds(self) -> tuple[int, int]:
        """The oldest and newest times accepted now."""
        now = self._clock.now_ns()
        return now - self._late_ns, now + self._future_ns

    def refusal(self, t: int, oldest: int, newest: int) -> tuple[Reason, str] | None:
        """Why a total at ``t`` is refused within ``bounds()``, or None."""
        return time_window_error(t, oldest, newest, self._limits)


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
    """One cumulative point against its series' last state (pure; see the module docstring).
    Raises ``InexactStep`` when the step cannot be computed exactly."""
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
    delta = step_between(value, state.value)
    if total is None:
        dsum = None
    else:
        dsum = step_between(total, state.sum) if state.sum is not None else total
    if delta == 0 and not dsum:
        return Step(SKIP_UNCHANGED, ZERO, None, new)
    return Step("delta", delta, dsum, new)


class _Holds:
    """Holds on keys (series or groups), taken all at once or not at all, so requests cannot
    deadlock; ``StreamsBusy`` after ``wait_s``."""

    def __init__(self, wait_s: float) -> None:
        self._wait_s = wait_s
        self._cond = threading.Condition()
        self._held: set[str] = set()

    @contextmanager
    def hold(self, keys: set[str]) -> Iterator[None]:
        deadline = time.monotonic() + self._wait_s
        with self._cond:
            while not self._held.isdisjoint(keys):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._cond.wait(remaining):
                    raise StreamsBusy("cumulative series are busy with another request")
            self._held |= keys
        try:
            yield
        finally:
            with self._cond:
                self._held -= keys
                self._cond.notify_all()


class StreamTable:
    """Committed state of one receiver's cumulative series: a cache over the store, and a hold
    per series.

    Holds are taken all at once or not at all, so requests cannot deadlock. The cache only ever
    holds committed state: rows read from the store (``load``) and what a successful commit
    wrote (``committed``), each with its bytes, the version a later commit expects to find
    (``expect``); ``forget`` drops series another replica moved. State keys are
    ``prefix + series id``.
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
        self._holds = _Holds(wait_s)
        self._cache: dict[str, tuple[StreamState, bytes]] = {}  # sid → (state, its bytes)

    @contextmanager
    def hold(self, sids: Iterable[str]) -> Iterator[Held]:
        """Hold ``sids``; yields what converts them (``Totals``)."""
        held = set(sids)
        with self._holds.hold(held):
            yield _HeldSeries(self, held)

    def load(self, sids: Iterable[str]) -> dict[str, StreamState]:
        """The committed state of held series (absent: never seen). Series known here are not
        read from the store: the version kept with each (its bytes as committed) is what the
        commit expects to find, so a series another replica moved meanwhile conflicts there."""
        out: dict[str, StreamState] = {}
        missing: list[str] = []
        cache = self._cache
        for sid in sids:
            known = cache.get(sid)
            if known is None:
                missing.append(sid)
            else:
                out[sid] = known[0]
        if missing:
            prefix = self.prefix
            rows = self._reader.state_get([prefix + s for s in missing])
            fresh = {key[len(prefix) :]: (decode_state(raw), raw) for key, raw in rows.items()}
            for sid, known in fresh.items():
                out[sid] = known[0]
            self._remember(fresh)
        return out

    def writes(self, changed: dict[str, StreamState]) -> dict[str, bytes | None]:
        """``Batch.state`` entries that commit these series' new state."""
        prefix = self.prefix
        return {prefix + sid: encode_state(s) for sid, s in changed.items()}

    def expect(
        self, changed: Iterable[str], states: dict[str, StreamState]
    ) -> dict[str, bytes | None]:
        """``Batch.state_expect`` for series about to move: the state they were converted
        against (None: none), as the bytes it was committed with. Another replica may have
        moved a series since this one cached it; the store then commits nothing of the batch
        (``CommitResult.conflict``)."""
        prefix = self.prefix
        cache = self._cache
        out: dict[str, bytes | None] = {}
        for sid in changed:
            state = states.get(sid)
            if state is None:
                out[prefix + sid] = None
                continue
            known = cache.get(sid)
            out[prefix + sid] = (
                known[1] if known is not None and known[0] is state else encode_state(state)
            )
        return out

    def committed(
        self, states: dict[str, StreamState], written: dict[str, bytes | None] | None = None
    ) -> None:
        """The series' state after a successful commit; ``written``: the ``Batch.state`` that
        committed it (saves encoding it again for the next expectation)."""
        prefix = self.prefix
        if written is None:
            self._remember({sid: (s, encode_state(s)) for sid, s in states.items()})
            return
        got = written.get
        self._remember(
            {sid: (s, got(prefix + sid) or encode_state(s)) for sid, s in states.items()}
        )

    def _remember(self, known: dict[str, tuple[StreamState, bytes]]) -> None:
        if len(self._cache) + len(known) > self._max_cached:
            self._cache.clear()
        self._cache.update(known)

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


# A series' state in a group (``StreamGroups``): start, time, value, sum (None: not a
# histogram's) and its line of the group's row. A plain tuple of atoms on purpose: the garbage
# collector stops tracking those, so the cache of every series does not make it scan more.
Entry = tuple[int, int, Decimal, Decimal | None, str]

# A running total as ``StreamGroups`` keeps it: an ``int`` for an ``asInt`` total and a row's
# value written as a plain integer, else a ``Decimal``. Both are exact and compare
# exactly with each other; two ints subtract in a few nanoseconds where Decimals, under the
# exact context, take a quarter of a microsecond, and an int formats its line text as fast.
Level = Decimal | int
# A series' state in an OTLP group: ``Entry`` with its value a ``Level``.
GroupEntry = tuple[int, int, Level, Decimal | None, str]


def line(sid: str, start: int, t: int, value: Level, total: Decimal | None = None) -> str:
    """A series' line of its group's row: ``sid:start:time value [sum]`` (OTLP builds it from a
    point's natural key, which begins the same)."""
    if total is None:
        return f"{sid}:{start}:{t} {value}"
    return f"{sid}:{start}:{t} {value} {total}"


def entry(sid: str, start: int, t: int, value: Decimal, total: Decimal | None = None) -> Entry:
    """A series' state as its group keeps it, with its ``line``."""
    return (start, t, value, total, line(sid, start, t, value, total))


# Between a group row's lines: not "\n", which the SQLite store's JSON would escape (and
# unescape) 2,000 times in a row of 2,000 series.
LINE_END = ";"


def _row(entries: dict[str, GroupEntry]) -> bytes:
    return LINE_END.join([e[4] for e in entries.values()]).encode()


def entry_state(e: Entry) -> StreamState:
    return StreamState(e[0], e[1], e[2], e[3])


def level_decimal(level: Level) -> Decimal:
    """A ``Level`` as the ``Decimal`` ``convert`` and the validator take."""
    return Decimal(level) if isinstance(level, int) else level


def group_entry_state(e: GroupEntry) -> StreamState:
    """A ``GroupEntry``'s state for ``convert`` (its value a ``Decimal``)."""
    return StreamState(e[0], e[1], level_decimal(e[2]), e[3])


def _decode_stream_group(raw: bytes) -> dict[str, GroupEntry]:
    """A group's row as ``StreamGroups`` keeps it: ``decode_group``'s entries, with values
    written as plain integers ("12", not "1.2E+1") as ints: an exponent-0 Decimal and its int
    give the same steps to the digit, so what a series steps by never depends on whether its
    state came from the cache or the store."""
    out: dict[str, GroupEntry] = {}
    for sid, e in decode_group(raw).items():
        value = e[2]
        if e[3] is None and value.as_tuple().exponent == 0:  # (its steps: the same Decimals)
            out[sid] = (e[0], e[1], int(value), None, e[4])
        else:
            out[sid] = e
    return out


def decode_group(raw: bytes) -> dict[str, Entry]:
    """A group's row: its series' entries."""
    out: dict[str, Entry] = {}
    for line in raw.decode().split(LINE_END):
        parts = line.split()
        sid, start, t = parts[0].split(":")
        total = Decimal(parts[2]) if len(parts) > 2 else None
        out[sid] = (int(start), int(t), Decimal(parts[1]), total, line)
    return out


class _Group(NamedTuple):
    """One group's committed row: its bytes (the version a later commit expects; None: no row)
    and its series' entries."""

    raw: bytes | None
    entries: dict[str, GroupEntry]


_NO_GROUP = _Group(None, {})


class GroupChanges(NamedTuple):
    """What one conversion commits: ``Batch.state`` and ``Batch.state_expect`` entries, and
    the groups as they will be once committed (``StreamGroups.committed``)."""

    state: dict[str, bytes | None]
    expect: dict[str, bytes | None]
    groups: dict[str, _Group]


class GroupView:
    """The committed state of the series one request converts (``StreamGroups.load``):
    ``states``, series id → entry (absent: never seen)."""

    def __init__(
        self,
        prefix: str,
        groups: dict[str, _Group],
        members: dict[str, set[str]],
        legacy: dict[str, tuple[str, Entry, bytes]],
    ) -> None:
        self._prefix = prefix
        self._groups = groups
        self._members = members
        self._legacy = legacy  # sid → (group, entry, row) of series still in a row of their own
        states: Mapping[str, GroupEntry]
        if len(members) == 1 and not legacy:  # the usual request: series of one group
            states = groups[next(iter(members))].entries  # (read only: a committed row's)
        else:
            merged: dict[str, GroupEntry] = {}
            for gid in members:
                merged.update(groups[gid].entries)  # entries of other series too: harmless
            for sid, (_, e, _) in legacy.items():
                merged[sid] = e
            states = merged
        self.states = states

    def group(self, gid: str) -> _Group:
        return self._groups[gid]

    def changes(self, changed: dict[str, GroupEntry]) -> GroupChanges:
        """The rows that commit ``changed`` (series of this view, their new entries): each
        group holding one is rewritten whole, expecting the bytes it was read or last
        committed with. A series still in a row of its own (written before groups) moves into
        its group, and its row is deleted, expecting its bytes, in the same commit."""
        prefix = self._prefix
        writes: dict[str, bytes | None] = {}
        expect: dict[str, bytes | None] = {}
        after: dict[str, _Group] = {}
        legacy, members = self._legacy, self._members
        for gid, sids in members.items():
            if len(members) == 1:
                moved = changed  # every series of this view is in it
            else:
                moved = {sid: changed[sid] for sid in sids if sid in changed}
            if legacy:  # into the group as they are, unless this commit moves them on
                moved = {**{sid: e for sid, (g, e, _) in legacy.items() if g == gid}, **moved}
            if not moved:
                continue
            old = self._groups[gid]
            entries = {**old.entries, **moved}
            raw = _row(entries)
            key = prefix + GROUP_KEY + gid
            writes[key] = raw
            expect[key] = old.raw
            after[gid] = _Group(raw, entries)
        for sid, (_, _, row) in legacy.items():
            writes[prefix + sid] = None
            expect[prefix + sid] = row
        return GroupChanges(writes, expect, after)


# State keys of groups: prefix + GROUP_KEY + group id (series ids are hex: no clash with the
# rows of single series written before groups, prefix + series id).
GROUP_KEY = "g/"


class StreamGroups:
    """Committed state of one receiver's cumulative series, one row per *group* of series
    (an OTLP metric of one resource and scope), and a hold per group.

    A request usually moves every series of the groups it touches (an SDK exports all its
    series each time), so one row per group is what it writes and compare-and-sets instead of
    one per series: the store commits a few rows per request, not one per point. The row is
    its series' lines (``entry``); its bytes are the version a commit expects. A commit that
    moves some series of a group rewrites the whole row (the other lines as they are). Holds,
    the cache (committed rows only) and conflicts work as ``StreamTable``'s, per group.
    Series written in a row of their own (``prefix + series id``, before groups) are read
    from it and moved into their group by the next commit that touches the group.
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
        self._max_cached = max_cached  # series, over all cached groups
        self._holds = _Holds(wait_s)
        self._cache: dict[str, _Group] = {}
        self._cached = 0

    def hold(self, gids: set[str]) -> AbstractContextManager[None]:
        return self._holds.hold(gids)

    def load(self, members: dict[str, set[str]]) -> GroupView:
        """The committed state of the series ``members`` (group → series ids) of held groups.
        Groups known here are not read from the store: their bytes as committed are what the
        commit expects, so a group another replica moved meanwhile conflicts there."""
        prefix, cache = self.prefix, self._cache
        groups: dict[str, _Group] = {}
        missing: list[str] = []
        for gid in members:
            known = cache.get(gid)
            if known is None:
                missing.append(gid)
            else:
                groups[gid] = known
        if missing:
            keys = [prefix + GROUP_KEY + gid for gid in missing]
            rows = self._reader.state_get(keys)
            fresh: dict[str, _Group] = {}
            for gid, key in zip(missing, keys, strict=True):
                raw = rows.get(key)
                groups[gid] = fresh[gid] = (
                    _NO_GROUP if raw is None else _Group(raw, _decode_stream_group(raw))
                )
            self._remember(fresh)
        unknown: dict[str, str] = {}
        for gid, sids in members.items():
            entries = groups[gid].entries
            if len(entries) < len(sids) or not entries.keys() >= sids:
                unknown.update((sid, gid) for sid in sids if sid not in entries)
        legacy: dict[str, tuple[str, Entry, bytes]] = {}
        if unknown:
            rows = self._reader.state_get([prefix + sid for sid in unknown])
            for key, raw in rows.items():
                sid = key[len(prefix) :]
                s = decode_state(raw)
                legacy[sid] = (unknown[sid], entry(sid, s.start, s.time, s.value, s.sum), raw)
        return GroupView(prefix, groups, members, legacy)

    def committed(self, changes: GroupChanges) -> None:
        """The groups' rows after a successful commit of ``changes``."""
        self._remember(changes.groups)

    def _remember(self, groups: dict[str, _Group]) -> None:
        cache = self._cache
        n = sum(len(g.entries) for g in groups.values())
        if self._cached + n > self._max_cached:
            cache.clear()
            self._cached = 0
        for gid, g in groups.items():
            old = cache.get(gid)
            if old is not None:
                self._cached -= len(old.entries)
            cache[gid] = g
        self._cached += n

    def forget(self, gids: Iterable[str]) -> None:
        for gid in gids:
            old = self._cache.pop(gid, None)
            if old is not None:
                self._cached -= len(old.entries)

    def stale(self, before_ns: int, limit: int = 10_000) -> dict[str, set[str]]:
        """Up to ``limit`` series whose committed last point is older than ``before_ns``, by
        group (series in a row of their own: under the group "", see ``expire``)."""
        prefix, group_prefix = self.prefix, self.prefix + GROUP_KEY
        out: dict[str, set[str]] = {}
        n = 0
        for key, raw in sorted(self._reader.state_scan(prefix).items()):
            if key.startswith(group_prefix):
                old = {sid for sid, e in decode_group(raw).items() if e[1] < before_ns}
                gid = key[len(group_prefix) :]
            else:
                old = {key[len(prefix) :]} if decode_state(raw).time < before_ns else set()
                gid = ""
            for sid in sorted(old)[: limit - n]:
                out.setdefault(gid, set()).add(sid)
                n += 1
            if n >= limit:
                break
        return out

    def expire(self, stale: dict[str, set[str]], before_ns: int) -> tuple[GroupChanges, int]:
        """The rows that forget the series of ``stale`` (``stale()``; the caller holds its
        groups) still older than ``before_ns`` as committed now, and how many they are."""
        view = self.load({gid: set() for gid in stale if gid})
        prefix = self.prefix
        writes: dict[str, bytes | None] = {}
        expect: dict[str, bytes | None] = {}
        after: dict[str, _Group] = {}
        n = 0
        for gid, sids in stale.items():
            if not gid:
                continue
            old = view.group(gid)
            entries = {
                sid: e for sid, e in old.entries.items() if not (sid in sids and e[1] < before_ns)
            }
            if len(entries) == len(old.entries):
                continue
            n += len(old.entries) - len(entries)
            key = prefix + GROUP_KEY + gid
            raw = _row(entries) if entries else None
            writes[key], expect[key] = raw, old.raw
            after[gid] = _Group(raw, entries)
        legacy = stale.get("", set())
        if legacy:
            rows = self._reader.state_get([prefix + sid for sid in sorted(legacy)])
            for key, raw in rows.items():
                if decode_state(raw).time < before_ns:
                    writes[key], expect[key] = None, raw
                    n += 1
        return GroupChanges(writes, expect, after), n


# A series' pointer to its group (``TotalGroups``): its old key, ``prefix + series id``, holding
# "@" and the group id (a row of a single series' state begins with a digit).
POINTER = b"@"


class _Rows(NamedTuple):
    """One group's committed row (``TotalGroups``): its bytes (None: no row yet), and per
    series its state and its line of the row."""

    raw: bytes | None
    states: dict[str, StreamState]
    lines: dict[str, str]


_NO_ROWS = _Rows(None, {}, {})


def _decode_rows(raw: bytes) -> _Rows:
    states: dict[str, StreamState] = {}
    lines: dict[str, str] = {}
    for sid, e in decode_group(raw).items():
        states[sid] = entry_state(e)
        lines[sid] = e[4]
    return _Rows(raw, states, lines)


class TotalGroups:
    """Committed state of running totals without start times (remote write), one row per
    *group* of series, and a hold per group.

    A remote-write sender carries no grouping a gateway could compute (Prometheus spreads a
    target's series over its shards by a reference of its own), so a group is made of the
    series first seen *together*: the new series of a request (up to ``group_size``) join a
    group the request touches that has room, or a new one with a random id. The senders
    usually send the same series together again, so a request commits a row per group (a
    few), not one per series. Each series keeps a *pointer* to its group in its own row
    (``prefix + series id`` = ``@`` + group id), written once, in the commit that first gives
    the series a state, and never changed: what a replica or a restarted process learns of
    a series' group stays true, and two replicas that first see one series at once both
    write its pointer expecting none, so one conflicts and converts again into the other's
    group. Group rows (``prefix + GROUP_KEY + group id``) are ``StreamGroups``' lines, and
    are compare-and-set like them: a row's bytes as committed are what the next commit
    expects.

    State written one row per series (``StreamTable``, before groups) is read from that row,
    and the commit that next moves the series puts it into a group and turns the row into its
    pointer, expecting the old bytes.

    Limits: a commit rewrites the whole row of every group it touches, so a sender that
    regroups its series (Prometheus resharding) makes requests rewrite several rows partly;
    two requests (or replicas) moving different series of one group wait for each other (or
    conflict and convert again) where per-series state would not; series never leave their
    group (nothing of remote write's state expires).
    """

    def __init__(
        self,
        reader: StateReader,
        prefix: str,
        group_size: int = 500,
        max_cached: int = 1_000_000,
        wait_s: float = 30.0,
    ) -> None:
        self.prefix = prefix
        self._reader = reader
        self._size = group_size
        self._max_cached = max_cached  # series, over cached pointers and cached rows
        self._holds = _Holds(wait_s)
        self._home: dict[str, str] = {}  # series id → group id (committed pointers)
        self._rows: dict[str, _Rows] = {}  # group id → committed row
        self._cached = 0  # series in _rows
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, sids: Iterable[str]) -> Iterator[HeldGroups]:
        """Hold the groups of ``sids`` (new series get theirs); yields what converts them."""
        held = self._plan(sids)
        with self._holds.hold(set(held.members)):
            yield held

    def _plan(self, sids: Iterable[str]) -> HeldGroups:
        home = self._home
        members: dict[str, set[str]] = {}
        unknown: list[str] = []
        for sid in dict.fromkeys(sids):
            gid = home.get(sid)
            if gid is None:
                unknown.append(sid)
            elif gid in members:
                members[gid].add(sid)
            else:
                members[gid] = {sid}
        legacy: dict[str, tuple[StreamState, bytes]] = {}
        pointers: dict[str, str] = {}  # new series → the group they join
        if unknown:
            prefix = self.prefix
            rows = self._reader.state_get([prefix + sid for sid in unknown])
            homeless: list[str] = []
            learned: dict[str, str] = {}
            for sid in unknown:
                raw = rows.get(prefix + sid)
                if raw is not None and raw.startswith(POINTER):
                    gid = raw[1:].decode()
                    learned[sid] = gid
                    members.setdefault(gid, set()).add(sid)
                    continue
                if raw is not None:
                    legacy[sid] = (decode_state(raw), raw)
                homeless.append(sid)
            if learned:
                self._learn(learned)
            # Into groups this request touches that have room (as last committed), then new ones.
            room = [
                (gid, self._size - len(r.lines))
                for gid in members
                if (r := self._rows.get(gid)) is not None and len(r.lines) < self._size
            ]
            room.reverse()
            gid, free = room.pop() if room else ("", 0)
            for sid in homeless:
                if free <= 0:
                    gid, free = room.pop() if room else (secrets.token_hex(8), self._size)
                pointers[sid] = gid
                members.setdefault(gid, set()).add(sid)
                free -= 1
        return HeldGroups(self, members, pointers, legacy)

    def _learn(self, homes: dict[str, str]) -> None:
        with self._lock:
            if len(self._home) + len(homes) > self._max_cached:
                self._home.clear()
            self._home.update(homes)

    def rows(self, gids: Iterable[str]) -> dict[str, _Rows]:
        """The committed rows of held groups (cached, or read from the store)."""
        cache = self._rows
        out: dict[str, _Rows] = {}
        missing: list[str] = []
        for gid in gids:
            known = cache.get(gid)
            if known is None:
                missing.append(gid)
            else:
                out[gid] = known
        if missing:
            keys = [self.prefix + GROUP_KEY + gid for gid in missing]
            got = self._reader.state_get(keys)
            fresh: dict[str, _Rows] = {}
            for gid, key in zip(missing, keys, strict=True):
                raw = got.get(key)
                out[gid] = fresh[gid] = _NO_ROWS if raw is None else _decode_rows(raw)
            self._remember(fresh)
        return out

    def _remember(self, rows: dict[str, _Rows]) -> None:
        with self._lock:
            cache = self._rows
            n = sum(len(r.lines) for r in rows.values())
            if self._cached + n > self._max_cached:
                cache.clear()
                self._cached = 0
            for gid, r in rows.items():
                old = cache.get(gid)
                if old is not None:
                    self._cached -= len(old.lines)
                cache[gid] = r
            self._cached += n

    def committed(self, rows: dict[str, _Rows], pointers: dict[str, str]) -> None:
        """Groups' rows and series' pointers after a successful commit."""
        self._remember(rows)
        if pointers:
            self._learn(pointers)

    def forget(self, gids: Iterable[str]) -> None:
        """Rows another replica may have moved (pointers never change: they stay)."""
        with self._lock:
            for gid in gids:
                old = self._rows.pop(gid, None)
                if old is not None:
                    self._cached -= len(old.lines)


def _moved(sids: set[str], changed: dict[str, StreamState]) -> dict[str, StreamState]:
    """The entries of ``changed`` of the series ``sids`` (one group's of a request)."""
    if len(sids) > 1:
        keys = list(sids)
        try:
            return dict(zip(keys, itemgetter(*keys)(changed), strict=True))  # usually all moved
        except KeyError:
            pass
    return {sid: changed[sid] for sid in sids if sid in changed}


class HeldGroups:
    """The groups one request holds (``TotalGroups.hold``): ``members``, group → its series
    of the request; ``pointers``, series that get their group with this commit;
    ``legacy``, series still in a row of their own: (state, its bytes)."""

    def __init__(
        self,
        groups: TotalGroups,
        members: dict[str, set[str]],
        pointers: dict[str, str],
        legacy: dict[str, tuple[StreamState, bytes]],
    ) -> None:
        self._groups = groups
        self.members = members
        self.pointers = pointers
        self.legacy = legacy
        self._read: dict[str, _Rows] = {}
        self._after: tuple[dict[str, _Rows], dict[str, str]] = ({}, {})

    def load(self) -> Mapping[str, StreamState]:
        """The committed state of the request's series (absent: never seen)."""
        members = self.members
        self._read = rows = self._groups.rows(members)
        if len(rows) == 1 and not self.legacy:  # the usual request: one group
            return next(iter(rows.values())).states  # (read only: a committed row's)
        merged: dict[str, StreamState] = {}
        for r in rows.values():
            merged.update(r.states)  # states of other series too: harmless
        for sid, (s, _) in self.legacy.items():
            merged[sid] = s
        return merged

    def changes(
        self, changed: dict[str, StreamState]
    ) -> tuple[dict[str, bytes | None], dict[str, bytes | None]]:
        """``Batch.state`` and ``Batch.state_expect`` that commit ``changed`` (series of this
        request, their new state): every group holding one is rewritten whole, expecting the
        bytes it was read with; a series' pointer is written, expecting none (a new series)
        or its old row's bytes (state kept per series before groups)."""
        prefix, group_prefix = self._groups.prefix, self._groups.prefix + GROUP_KEY
        writes: dict[str, bytes | None] = {}
        expect: dict[str, bytes | None] = {}
        after: dict[str, _Rows] = {}
        pointers: dict[str, str] = {}
        members, read = self.members, self._read
        times: dict[int, str] = {}
        for gid, sids in members.items():
            # (one group: every series of this request is in it)
            moved = changed if len(members) == 1 else _moved(sids, changed)
            if not moved:
                continue
            old = read[gid]
            states = {**old.states, **moved}
            lines = dict(old.lines)
            for sid, (start, t, value, total) in moved.items():
                if start or total is not None:
                    lines[sid] = line(sid, start, t, value, total)
                    continue
                # line()'s usual case: a request's totals share their time, written once
                at = times.get(t)
                if at is None:
                    at = times[t] = f":0:{t} "
                lines[sid] = sid + at + str(value)
            raw = LINE_END.join(lines.values()).encode()
            key = group_prefix + gid
            writes[key], expect[key] = raw, old.raw
            after[gid] = _Rows(raw, states, lines)
        if self.pointers:
            legacy = self.legacy
            for sid, gid in self.pointers.items():
                if sid in changed:
                    key = prefix + sid
                    writes[key] = POINTER + gid.encode()
                    expect[key] = legacy[sid][1] if sid in legacy else None
                    pointers[sid] = gid
        self._after = (after, pointers)
        return writes, expect

    def committed(self) -> None:
        self._groups.committed(*self._after)

    def forget(self) -> None:
        self._groups.forget(self.members)


def series_id(obs: Observation) -> str:
    """A series' identity: its name and every attribute (resource attributes included)."""
    identity = [obs.name, sorted(obs.attributes.items()), sorted(obs.resource_attributes.items())]
    return hashlib.blake2b(orjson.dumps(identity), digest_size=16).hexdigest()


# An amount a running total moved: (series id, amount, time, ordinal in its request, series).
_Amount = tuple[str, Decimal, int, int, Observation]
# what SeriesMappings.records reads of an amount: (series id, amount, time, ...)
_A = TypeVar("_A", bound=tuple[Any, ...])


class SeriesMapping(NamedTuple):
    """How every amount of one series maps, learned from validating one of them (remote
    write's series here, OTLP's in ``receivers.otlp``)."""

    serial: int  # of the catalog snapshot it was validated against (catalog.Catalog.serial)
    customer: str
    dimension: str
    scale: Decimal | None  # None: 1
    metadata: dict[str, Any]
    unique: str | None


# What one request's records are made under: (catalog serial, earliest time, latest time).
Snap = tuple[int, int, int]


class SeriesMappings:
    """Per series (its id), how its amounts map: the customer, dimension, scale and metadata
    the validator gave one of them under a catalog snapshot. A later amount of the series
    becomes a record directly (``record``) while that snapshot is current, its time is well
    inside the accepted range and its value, scaled, plainly within bounds; anything else
    (and every series after a catalog change) goes through the validator again, which stays
    the one judge of what is valid and why not. Rules are fixed for the life of the mapper.
    Bounded: emptied when full (every entry can be learned again).
    """

    def __init__(
        self,
        source: Source,
        mapper: Mapper,
        catalog: Callable[[], Catalog],
        clock: Clock,
        limits: IngestConfig,
        max_series: int = 250_000,
    ) -> None:
        self._source = source
        self._mapper = mapper
        self._catalog = catalog
        self._clock = clock
        self._max = max_series
        # A minute inside the validator's own bounds, so a record made here is never one the
        # validator would have refused a moment later.
        self._late_ns = (int(limits.late_arrival_limit.total_seconds()) - 60) * 1_000_000_000
        self._future_ns = int(limits.future_tolerance.total_seconds()) * 1_000_000_000
        self._known: dict[str, SeriesMapping] = {}
        # the validator's dedup digest, model.dedup_key(source, key), hashed on from a copy
        self._key_hash = dedup_prefix(source.value)

    def snapshot(self) -> Snap:
        """The catalog snapshot's serial and the times ``record`` takes, for one request."""
        now = self._clock.now_ns()
        return self._catalog().serial, now - self._late_ns, now + self._future_ns

    def record(self, snap: Snap, sid: str, value: Decimal, t: int) -> UsageRecord | None:
        """The record of one amount of a known series (natural key "series id:time"), or None:
        leave it to the validator. ``records`` of one."""
        made: list[UsageRecord] = []
        self.records(snap, [(sid, value, t)], made)
        return made[0] if made else None

    def records(
        self,
        snap: Snap,
        amounts: Sequence[_A],
        into: list[UsageRecord],
        keyed: bool = True,
    ) -> list[_A]:
        """The record of each (series id, amount, time, ...) of ``amounts`` that is of a known
        series (natural key "series id:time", its dedup key unless not ``keyed``), appended to
        ``into`` in order; returns the amounts left to the validator. One pass: a request's
        amounts are many, and share few times."""
        serial, lo, hi = snap
        known = self._known.get
        base = self._key_hash
        source = self._source
        append = into.append
        tails: dict[int, str | None] = {}  # time → ":time" (None: outside lo..hi)
        left: list[_A] = []
        for a in amounts:
            sid, v, t = a[0], a[1], a[2]
            m = known(sid)
            if m is None:
                left.append(a)
                continue
            learned, customer, dimension, scale, metadata, unique = m
            tail = tails.get(t, "")
            if tail == "":
                tail = tails[t] = f":{t}" if lo <= t <= hi else None
            if learned != serial or tail is None:
                left.append(a)
                continue
            if scale is not None:  # (without: a parse_value'd total or a step between two)
                v = EXACT.multiply(v, scale)
                if v.as_tuple().exponent < -MAX_PLACES:  # type: ignore[operator]
                    left.append(a)
                    continue
            if not ZERO <= v < MAX_ABS:
                left.append(a)
                continue
            if keyed:
                h = base.copy()
                h.update((sid + tail).encode())
                key: bytes | None = h.digest()
            else:
                key = None
            append(UsageRecord(t, customer, dimension, v, None, metadata, source, key, unique))
        return left

    def learn(
        self,
        snap: Snap,
        sids: Sequence[str],
        observations: Sequence[Observation],
        checked: Batch,
    ) -> None:
        """Remember how the series of the accepted ones of ``observations`` (validated under
        ``snap``'s catalog into ``checked``) map."""
        refused = {e.index for e in checked.errors}
        records = iter(checked.records)
        known = self._known
        if len(known) >= self._max:
            known.clear()
        serial = snap[0]
        for i, obs in enumerate(observations):
            if i in refused:
                continue
            record = next(records)
            sid = sids[i]
            m = known.get(sid)
            if (m is not None and m.serial == serial) or record.value < 0:
                continue
            rule = self._mapper.map(obs)
            if not isinstance(rule, Mapped):
                continue
            scale = self._mapper.rules[rule.rule_index].scale
            known[sid] = SeriesMapping(
                serial,
                record.customer_id,
                record.dimension_id,
                None if scale == 1 else scale,
                record.metadata or {},
                record.unique_value,
            )


# StreamState((start, time, value, sum)) without NamedTuple's __new__ in Python.
_NEW_STATE: Callable[[tuple[int, int, Decimal, Decimal | None]], StreamState] = partial(
    tuple.__new__, StreamState
)

# A running total to convert: (ordinal in its request, time, value, its series: an observation
# of the series' name and attributes, whose own value and time are not read).
Total = tuple[int, int, Decimal, Observation]


class Totals:
    """Commits batches that carry running totals (``Batch.cumulative``) from senders without
    start times: Vector absolute counters, Prometheus remote write.

    Under a hold on the batch's series it reads their committed state, turns each total into
    the amount since the previous one (``convert`` with an unknown start: a series' first total
    is its baseline, a drop is a counter reset), validates those amounts, and commits them with
    the series' new state in one transaction. An amount's natural key is (series, time), so a
    resent request adds nothing; a total that did not move adds no record. With a
    ``window``, a total the validator would refuse for its time is rejected before it converts;
    with ``mappings``, amounts of known series skip the validator. State is kept one row per
    series (``StreamTable``) or one per group of series (``TotalGroups``). With ``serial`` (a
    lock the receiver also decodes under), one conversion runs at a time (see
    ``receivers.remote_write.RemoteWriteReceiver``).
    """

    def __init__(
        self,
        table: StreamTable | TotalGroups,
        sink: ObservationSink,
        committer: Committer,
        commit_timeout_s: float = 60.0,
        *,
        window: TimeWindow | None = None,
        mappings: SeriesMappings | None = None,
        serial: AbstractContextManager[object] | None = None,
    ) -> None:
        self.table = table
        self._sink = sink
        self._committer = committer
        self._timeout = commit_timeout_s
        self._window = window
        self.mappings = mappings
        self._serial = serial if serial is not None else nullcontext()

    def convert(
        self,
        batch: Batch,
        held: Held,
        sids: Sequence[str],
        totals: Sequence[Total] | None = None,
    ) -> dict[str, StreamState]:
        """Move ``batch.cumulative`` (or ``totals``) into records and errors (the caller holds
        the series, ``sids``: ``held``); returns the series whose state moves with the batch,
        also set in ``batch.state``."""
        if totals is None:
            totals = [(i, o.timestamp_ns, o.value, o) for i, o in batch.cumulative]
        if len(totals) != len(sids):
            raise ValueError(f"{len(totals)} totals but {len(sids)} series ids")
        repeats = len(set(sids)) < len(sids)
        if repeats:  # several totals of one series: in time order
            given = totals
            order = sorted(range(len(sids)), key=lambda i: given[i][1])
            totals, sids = [given[i] for i in order], [sids[i] for i in order]
        states = held.load()
        changed: dict[str, StreamState] = {}
        errors: list[RecordError] = []
        window = self._window
        oldest, newest = window.bounds() if window is not None else (0, 0)
        if window is None:  # nothing is refused for its time: one comparison that always holds
            oldest, newest = -(1 << 64), 1 << 64
        new_state = _NEW_STATE
        get_state = states.get
        steps: list[_Amount] = []  # what moved
        with localcontext(_STEPS):  # (the plain step below: its "-" is _STEPS.subtract)
            for (index, t, value, obs), sid in zip(totals, sids, strict=True):
                if not oldest <= t <= newest:
                    assert window is not None
                    refused = window.refusal(t, oldest, newest)
                    if refused is not None:
                        why, reason = refused[1], refused[0]
                        errors.append(
                            RecordError(index, "timestamp", why, reason, _raw(obs, value, t))
                        )
                        continue
                state = (changed.get(sid) or get_state(sid)) if repeats else get_state(sid)
                if state is not None and t > state[1] and value > state[2] and not state[0]:
                    # convert()'s plain step, inline: the common case
                    try:
                        delta = value - state[2]
                    except decimal.Inexact:
                        pass
                    else:
                        changed[sid] = new_state((0, t, value, None))
                        steps.append((sid, delta, t, index, obs))
                        continue
                try:
                    step = convert(state, 0, t, value, None, True)
                except InexactStep as exc:
                    why = str(exc)
                    raw = _raw(obs, value, t)
                    errors.append(RecordError(index, "value", why, Reason.INVALID_VALUE, raw))
                    continue
                if step.state is not None:
                    changed[sid] = step.state
                if step.kind == "delta":
                    steps.append((sid, step.delta, t, index, obs))
        amounts: list[Observation] = []
        amount_sids: list[str] = []
        ordinals: list[int] = []
        mappings = self.mappings
        snap = mappings.snapshot() if mappings is not None else (0, 0, 0)
        records = batch.records
        # An amount is deduplicated by its series' state, committed with it (a total at or
        # before the committed time adds nothing): a dedup key per amount would only repeat
        # that, and fill the dedup window with a key per sample.
        left = steps if mappings is None else mappings.records(snap, steps, records, keyed=False)
        amount = ObservationKind.AMOUNT
        for sid, delta, t, index, obs in left:
            amounts.append(
                Observation(
                    obs.source,
                    obs.name,
                    obs.attributes,
                    delta,
                    amount,
                    t,
                    None,
                    obs.resource_attributes,
                )
            )
            amount_sids.append(sid)
            ordinals.append(index)
        if amounts:
            checked = self._sink.observations(amounts, batch.source)
            if mappings is not None:
                mappings.learn(snap, amount_sids, amounts, checked)
            records.extend(checked.records)
            errors.extend(
                RecordError(ordinals[e.index], e.field, e.error, e.reason, e.raw)
                for e in checked.errors
            )
        if errors:
            batch.errors.extend(errors)
            batch.errors.sort(key=lambda e: e.index)
        batch.cumulative = []
        writes, expect = held.changes(changed)
        batch.state.update(writes)
        batch.state_expect.update(expect)
        return changed

    def commit(
        self,
        batch: Batch,
        check: Callable[[Batch], None] | None = None,
        sids: list[str] | None = None,
        totals: Sequence[Total] | None = None,
    ) -> CommitResult:
        """Convert and commit in one go (blocks until durable; run it on a worker thread).

        ``check`` sees each converted batch before it is submitted and may raise to commit
        nothing (an atomic request with invalid records). A conflict (another replica moved a
        series first) converts again from fresh state. ``sids``: the series ids of
        ``batch.cumulative``, when the caller knows them; ``totals``: the totals to convert
        in place of ``batch.cumulative`` (``sids`` then required).
        """
        if sids is None:
            sids = [series_id(obs) for _, obs in batch.cumulative]
        cumulative, records = list(batch.cumulative), list(batch.records)
        errors, state, expect = list(batch.errors), dict(batch.state), dict(batch.state_expect)
        for _ in range(STATE_CONFLICT_RETRIES):
            # Held again on every try: after a conflict a new series may belong to a group
            # another replica gave it.
            with self.table.hold(sids) as held:
                with self._serial:
                    self.convert(batch, held, sids, totals)
                    if check is not None:
                        check(batch)
                result = self._committer.submit_sync(batch, self._timeout)
                if not result.conflict:
                    held.committed()
                    return result
                # Another replica moved these series first: forget what we cached, convert again.
                held.forget()
            batch.cumulative, batch.records = list(cumulative), list(records)
            batch.errors = list(errors)
            batch.state, batch.state_expect = dict(state), dict(expect)
        raise StreamsBusy("cumulative series kept moving on other replicas; retry")


class Held(Protocol):
    """The held series of one request (a table's ``hold``): their committed state, the state
    writes and expectations that move them, and what the cache learns from the outcome."""

    def load(self) -> Mapping[str, StreamState]: ...

    def changes(
        self, changed: dict[str, StreamState]
    ) -> tuple[dict[str, bytes | None], dict[str, bytes | None]]: ...

    def committed(self) -> None: ...

    def forget(self) -> None: ...


class _HeldSeries:
    """``Held`` over a ``StreamTable``: one row per series."""

    def __init__(self, table: StreamTable, sids: set[str]) -> None:
        self._table = table
        self._sids = sids
        self._states: dict[str, StreamState] = {}
        self._changed: dict[str, StreamState] = {}
        self._writes: dict[str, bytes | None] = {}

    def load(self) -> Mapping[str, StreamState]:
        self._states = self._table.load(self._sids)
        return self._states

    def changes(
        self, changed: dict[str, StreamState]
    ) -> tuple[dict[str, bytes | None], dict[str, bytes | None]]:
        self._changed = changed
        self._writes = self._table.writes(changed)
        return self._writes, self._table.expect(changed, self._states)

    def committed(self) -> None:
        self._table.committed(self._changed, self._writes)

    def forget(self) -> None:
        self._table.forget(self._sids)


def _raw(series: Observation, value: Decimal, t: int) -> str:
    """A refused total as the rejected-records store keeps it."""
    return clip_json(
        {
            "source": series.source.value,
            "name": series.name,
            "attributes": series.attributes,
            "value": str(value),
            "kind": ObservationKind.CUMULATIVE.value,
            "timeUnixNano": t,
        },
        8192,
    )
