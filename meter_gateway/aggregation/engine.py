"""Exact aggregation of a dimension over windows, from rollups and raw records.

A window ``[s, e)`` is answered from the UTC-hour rollup buckets that lie wholly inside it, plus
raw records for any bucket a window boundary cuts (unaligned ``from``/``to``, or time zones whose
offset is not a whole hour). ``time_weighted_avg`` reads raw levels (its buckets depend on the
level carried in), and so do seats (``unique_count`` that is ``prorated`` or counts values
present at the ``end``: a value's presence runs from its first record to its ``remove``
record, across windows); every other method is answered from rollups.

A period's billable quantity (``period``: usage-summary, invoices, meters and gauges read it
through billing.rating) is read once with its usage; for methods whose empty interval bills
nothing it is computed from the intervals that hold records only (a year has 8,760 hours).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from itertools import chain
from typing import Any, TypeVar, cast
from zoneinfo import ZoneInfo

from meter_gateway.aggregation.windows import (
    BUCKET_NS,
    ceil_bucket,
    floor_bucket,
    period_starts,
    split,
)
from meter_gateway.config import Dimension
from meter_gateway.decimals import EXACT, ZERO
from meter_gateway.store.base import (
    ROLLUP_COLUMNS,
    RawPoint,
    RollupColumn,
    RollupRow,
    UsageReader,
    unique_of,
)

RESULT_PLACES = Decimal("1e-18")
_ROUNDING = {"ceil": ROUND_CEILING, "floor": ROUND_FLOOR, "round": ROUND_HALF_UP}
_EPOCH_BUCKET = -(2**62)
_ONE = Decimal(1)
V = TypeVar("V")  # a rollup cell's value: a column's int or Decimal, a distinct value

#: Seats (SPEC 11): the metadata key whose value ``remove`` ends a value's presence (any other
#: value, or none, is an ``add``).
OPERATION_KEY = "operation"
REMOVE = "remove"
_PAGE = 10_000


def divide(a: Decimal, b: Decimal | int) -> Decimal:
    """a / b, exact when the quotient is a short decimal, else to 18 places (half-even)."""
    q = EXACT.divide(a, Decimal(b))
    exp = q.as_tuple().exponent
    if isinstance(exp, int) and exp < -18:
        q = q.quantize(RESULT_PLACES, rounding=ROUND_HALF_EVEN, context=EXACT)
    return q.normalize(EXACT) if q != 0 else ZERO


def aggregate(
    store: UsageReader,
    customer: str,
    dim: Dimension,
    windows: Sequence[tuple[int, int]],
    as_of: int | None = None,
) -> list[Decimal | None]:
    """The value of ``dim`` for ``customer`` in each contiguous window, in order.

    With ``as_of`` (SPEC §9) usage is measured only before it, never extrapolated: records at
    or after ``as_of`` are not read, and a time-weighted value integrates the level up to
    ``as_of`` but still divides by the whole window's length (consumption so far). A window
    starting at or after ``as_of`` has measured nothing: 0, or None for min/max/avg/last.
    """
    if as_of is not None and windows and windows[-1][1] > as_of:
        measured = [(s, min(e, as_of)) for s, e in windows if s < as_of]
        lengths = [e - s for s, e in windows[: len(measured)]]
        nothing = None if dim.aggregation in ("min", "max", "avg", "last") else ZERO
        values = _aggregate(store, customer, dim, measured, lengths) if measured else []
        return values + [nothing] * (len(windows) - len(measured))
    return _aggregate(store, customer, dim, windows, [e - s for s, e in windows])


def _aggregate(
    store: UsageReader,
    customer: str,
    dim: Dimension,
    windows: Sequence[tuple[int, int]],
    lengths: Sequence[int],
) -> list[Decimal | None]:
    # ``lengths``: what a time-weighted window's integral is divided by (its full length)
    if not windows:
        return []
    method = dim.aggregation
    if method == "time_weighted_avg":
        return _time_weighted(store, customer, dim.id, windows, lengths)
    if method == "unique_count" and (dim.prorated or dim.unique_count_mode == "end"):
        return _seats(store, customer, dim, windows, lengths)
    lo, hi = windows[0][0], windows[-1][1]
    bounds = {s for s, _ in windows} | {hi}
    split_buckets = sorted({floor_bucket(b) for b in bounds if b % BUCKET_NS})
    if method == "unique_count":
        whole = _whole_tail(store, customer, dim.id, bounds, hi)
        if whole is not None:
            split_buckets.remove(whole)
        return _unique(store, customer, dim, windows, split_buckets)
    if method in ROLLUP_COLUMNS:
        return _column_windows(store, customer, dim, windows, bounds, split_buckets)
    rows = store.rollups(customer, dim.id, floor_bucket(lo), ceil_bucket(hi))
    whole = _whole_tail(store, customer, dim.id, bounds, hi, rows)
    if whole is not None:
        split_buckets.remove(whole)
    skip = set(split_buckets)
    rows = [r for r in rows if r.bucket_ns not in skip]
    raw = _raw_in(store, customer, dim.id, split_buckets, lo, hi, None)
    if method == "weighted_sum":
        return _weighted(store, customer, dim.id, windows, lengths, rows, raw)
    out: list[Decimal | None] = []
    ri = pi = 0
    for _s, e in windows:
        rj, pj = ri, pi
        while rj < len(rows) and rows[rj].bucket_ns < e:
            rj += 1
        while pj < len(raw) and raw[pj].ts < e:
            pj += 1
        out.append(_value(method, rows[ri:rj], raw[pi:pj]))
        ri, pi = rj, pj
    return out


def _column_windows(
    store: UsageReader,
    customer: str,
    dim: Dimension,
    windows: Sequence[tuple[int, int]],
    bounds: set[int],
    split_buckets: list[int],
) -> list[Decimal | None]:
    """``_aggregate`` for sum, count, min and max, from the one rollup column each needs."""
    method = cast(RollupColumn, dim.aggregation)
    lo, hi = windows[0][0], windows[-1][1]
    cells = store.rollup_column(customer, dim.id, floor_bucket(lo), ceil_bucket(hi), method)
    tail = _column_tail(store, customer, dim.id, method, cells, bounds, hi)
    if tail is not None:
        split_buckets.remove(tail[0])
        cells = _with_tail(cells, tail)
    skip = set(split_buckets)
    cells = [c for c in cells if c[0] not in skip]
    raw = _raw_in(store, customer, dim.id, split_buckets, lo, hi, None)
    out: list[Decimal | None] = []
    ci = pi = 0
    for _s, e in windows:
        cj, pj = ci, pi
        while cj < len(cells) and cells[cj][0] < e:
            cj += 1
        while pj < len(raw) and raw[pj].ts < e:
            pj += 1
        values = (v for _, v in cells[ci:cj])
        out.append(_column_value(method, values, (p.value for p in raw[pi:pj])))
        ci, pi = cj, pj
    return out


def _whole_tail(
    store: UsageReader,
    customer: str,
    dimension: str,
    bounds: set[int],
    hi: int,
    rows: Sequence[RollupRow] | None = None,
) -> int | None:
    """The bucket that ``hi`` (the end of the last window, often ``as_of`` = now) splits, if
    no other bound splits it and every record in it lies before ``hi``: its rollup row then
    holds exactly the part before ``hi`` (a rollup's ``last_ts`` is its latest record's), so
    it is read whole instead of as raw records (the current hour, at every rating). ``rows``:
    the rollups read up to ``ceil_bucket(hi)``, when the caller has them (no query then)."""
    if not hi % BUCKET_NS:
        return None
    b = floor_bucket(hi)
    if any(b < x < hi for x in bounds):
        return None
    if rows is None:
        rows = store.rollups(customer, dimension, b, b + BUCKET_NS)
    tail = rows[-1] if rows and rows[-1].bucket_ns == b else None
    return b if tail is None or tail.last_ts < hi else None


def _raw_in(
    store: UsageReader,
    customer: str,
    dimension: str,
    buckets: Sequence[int],
    lo: int,
    hi: int,
    unique_key: str | None,
) -> list[RawPoint]:
    # one read per run of adjacent buckets (a half-hour zone cuts every hour)
    out: list[RawPoint] = []
    i = 0
    while i < len(buckets):
        j = i + 1
        while j < len(buckets) and buckets[j] == buckets[j - 1] + BUCKET_NS:
            j += 1
        s, e = max(buckets[i], lo), min(buckets[j - 1] + BUCKET_NS, hi)
        out.extend(store.raw(customer, dimension, s, e, unique_key))
        i = j
    return out


def _weighted(
    store: UsageReader,
    customer: str,
    dimension: str,
    windows: Sequence[tuple[int, int]],
    lengths: Sequence[int],
    rows: list[RollupRow],
    raw: list[RawPoint],
) -> list[Decimal | None]:
    # Values are changes to a level. ∫ level over [s, e) = L(s)·(e−s) + Σ Δᵢ·(e−tᵢ); a bucket's
    # share of the sum is wsum + (e − bucket_end)·sum (see RollupRow).
    lo = windows[0][0]
    level = ZERO
    before = store.rollup_column(customer, dimension, _EPOCH_BUCKET, floor_bucket(lo), "sum")
    for _, change in before:
        level = EXACT.add(level, change)
    if lo % BUCKET_NS:
        for p in store.raw(customer, dimension, floor_bucket(lo), lo):
            level = EXACT.add(level, p.value)
    out: list[Decimal | None] = []
    ri = pi = 0
    for (s, e), length in zip(windows, lengths, strict=True):
        integral = EXACT.multiply(level, e - s)
        while ri < len(rows) and rows[ri].bucket_ns < e:
            r = rows[ri]
            ri += 1
            tail = EXACT.multiply(r.sum, e - (r.bucket_ns + BUCKET_NS))
            integral = EXACT.add(integral, EXACT.add(r.wsum, tail))
            level = EXACT.add(level, r.sum)
        while pi < len(raw) and raw[pi].ts < e:
            p = raw[pi]
            pi += 1
            integral = EXACT.add(integral, EXACT.multiply(p.value, e - p.ts))
            level = EXACT.add(level, p.value)
        out.append(divide(integral, length))
    return out


def _time_weighted(
    store: UsageReader,
    customer: str,
    dimension: str,
    windows: Sequence[tuple[int, int]],
    lengths: Sequence[int],
) -> list[Decimal | None]:
    lo, hi = windows[0][0], windows[-1][1]
    before = store.last_before(customer, dimension, lo)
    level = before.value if before is not None else ZERO
    points = store.raw(customer, dimension, lo, hi)
    out: list[Decimal | None] = []
    pi = 0
    for (s, e), length in zip(windows, lengths, strict=True):
        integral, t_prev = ZERO, s
        while pi < len(points) and points[pi].ts < e:
            p = points[pi]
            pi += 1
            integral = EXACT.add(integral, EXACT.multiply(level, p.ts - t_prev))
            level, t_prev = p.value, p.ts
        integral = EXACT.add(integral, EXACT.multiply(level, e - t_prev))
        out.append(divide(integral, length))
    return out


def _unique(
    store: UsageReader,
    customer: str,
    dim: Dimension,
    windows: Sequence[tuple[int, int]],
    split_buckets: list[int],
) -> list[Decimal | None]:
    lo, hi = windows[0][0], windows[-1][1]
    skip = set(split_buckets)
    found = store.distinct(customer, dim.id, floor_bucket(lo), ceil_bucket(hi))
    raw = _raw_in(store, customer, dim.id, split_buckets, lo, hi, dim.unique_key)
    if len(windows) == 1:  # the period as one window: no order needed
        seen = {v for b, v in found if b not in skip}
        seen.update(p.unique for p in raw if p.unique is not None)
        return [Decimal(len(seen))]
    pairs = sorted((b, v) for b, v in found if b not in skip)
    out: list[Decimal | None] = []
    ri = pi = 0
    for _, e in windows:
        values: set[str] = set()
        while ri < len(pairs) and pairs[ri][0] < e:
            values.add(pairs[ri][1])
            ri += 1
        while pi < len(raw) and raw[pi].ts < e:
            if raw[pi].unique is not None:
                values.add(raw[pi].unique)  # type: ignore[arg-type]
            pi += 1
        out.append(Decimal(len(values)))
    return out


def presence(
    store: UsageReader, customer: str, dim: Dimension, to_ns: int
) -> dict[str, list[tuple[int, int | None]]]:
    """Each distinct value's presence before ``to_ns``: ``[start, end)`` intervals, from a
    record that finds it absent to its next ``remove`` record (end None: still present)."""
    out: dict[str, list[tuple[int, int | None]]] = {}
    after: tuple[int, int] | None = None
    while True:
        page = store.records(customer, dim.id, 0, to_ns, after, _PAGE)
        for r in page:
            value = unique_of(r.metadata, dim.unique_key)
            if value is None:
                continue
            spans = out.setdefault(value, [])
            present = bool(spans) and spans[-1][1] is None
            removing = (r.metadata or {}).get(OPERATION_KEY) == REMOVE
            if removing and present:
                spans[-1] = (spans[-1][0], r.timestamp_ns)
            elif not removing and not present:
                spans.append((r.timestamp_ns, None))
        if len(page) < _PAGE:
            return out
        after = (page[-1].timestamp_ns, page[-1].seq)


def _seats(
    store: UsageReader,
    customer: str,
    dim: Dimension,
    windows: Sequence[tuple[int, int]],
    lengths: Sequence[int],
) -> list[Decimal | None]:
    # prorated: Σ over values of the time present in the window ÷ the window's whole length;
    # end: the values present at the window's (measured) end.
    spans = [sp for v in presence(store, customer, dim, windows[-1][1]).values() for sp in v]
    out: list[Decimal | None] = []
    for (s, e), length in zip(windows, lengths, strict=True):
        if dim.prorated:
            held = sum(max(0, min(e, hi if hi is not None else e) - max(s, lo)) for lo, hi in spans)
            out.append(divide(Decimal(held), length))
        else:
            out.append(Decimal(sum(1 for lo, hi in spans if lo < e and (hi is None or hi >= e))))
    return out


def round_increments(value: Decimal, dim: Dimension) -> Decimal:
    """rounding(value / usage_increment): one aggregation interval's billable quantity."""
    mode = _ROUNDING.get(dim.rounding)
    if mode is None:
        return divide(value, dim.usage_increment)
    # divide's quotient (18 places at most, half-even), without its normalize, then rounded
    q = EXACT.divide(value, dim.usage_increment)
    q = q.quantize(RESULT_PLACES, rounding=ROUND_HALF_EVEN, context=EXACT)
    return q.quantize(_ONE, rounding=mode, context=EXACT)


def billable_quantity(
    store: UsageReader,
    customer: str,
    dim: Dimension,
    from_ns: int,
    to_ns: int,
    tz: ZoneInfo,
    as_of: int | None = None,
) -> Decimal:
    """Σ over the aggregation intervals of the period of rounding(aggregate / increment),
    measured up to ``as_of`` (see ``aggregate``); billing.rating reads it through ``period``."""
    if to_ns <= from_ns:
        return ZERO
    if dim.aggregation_interval == "none":
        windows = [(from_ns, to_ns)]
    elif _sparse(dim):
        hi = _until(from_ns, to_ns, as_of)
        return _intervals(store, customer, dim, from_ns, to_ns, hi, tz)[1]
    else:
        windows = split(from_ns, to_ns, dim.aggregation_interval, tz)
    return _total(aggregate(store, customer, dim, windows, as_of), dim)


def period(
    store: UsageReader,
    customer: str,
    dim: Dimension,
    from_ns: int,
    to_ns: int,
    tz: ZoneInfo,
    as_of: int | None = None,
) -> tuple[Decimal | None, Decimal]:
    """The period ``[from_ns, to_ns)`` measured up to ``as_of``: its aggregate as one window
    (``aggregate``) and its billable quantity (``billable_quantity``), read once where the
    method allows.

    Methods whose empty interval bills nothing (an interval without records sums and counts
    0, and rounding(0) is 0 in every mode; min/max/avg/last have no value there) are answered
    from the intervals that hold records only, never walking the hours of a year that have
    none. Carried levels and seats bill empty intervals too: every interval is computed.
    """
    if to_ns <= from_ns:
        return None, ZERO
    if dim.aggregation_interval != "none" and _sparse(dim):
        return _intervals(store, customer, dim, from_ns, to_ns, _until(from_ns, to_ns, as_of), tz)
    [usage] = aggregate(store, customer, dim, [(from_ns, to_ns)], as_of)
    if dim.aggregation_interval == "none":
        return usage, _total([usage], dim)
    return usage, billable_quantity(store, customer, dim, from_ns, to_ns, tz, as_of)


def _until(from_ns: int, to_ns: int, as_of: int | None) -> int:
    """Where a period is measured up to (``from_ns`` when ``as_of`` is before it)."""
    return to_ns if as_of is None else max(from_ns, min(to_ns, as_of))


def _sparse(dim: Dimension) -> bool:
    method = dim.aggregation
    if method == "unique_count":
        return not (dim.prorated or dim.unique_count_mode == "end")
    return method in ("sum", "count", "min", "max", "avg", "last")


def _total(values: Sequence[Decimal | None], dim: Dimension) -> Decimal:
    total = ZERO
    for v in values:
        if v is not None:
            total = EXACT.add(total, round_increments(v, dim))
    return total.normalize(EXACT) if total != 0 else ZERO


def _intervals(
    store: UsageReader,
    customer: str,
    dim: Dimension,
    from_ns: int,
    to_ns: int,
    hi: int,
    tz: ZoneInfo,
) -> tuple[Decimal | None, Decimal]:
    """``period`` for a method whose empty intervals bill nothing, measured over
    ``[from_ns, hi)``: the rollups of the range are read once and each is put in its interval
    (a bucket an interval boundary cuts is read as raw records, as in ``aggregate``); the
    period's value is all of them together."""
    method = dim.aggregation
    if hi <= from_ns:
        return (ZERO if method in ("sum", "count", "unique_count") else None), ZERO
    # The intervals measured: those of the whole period (remembered across customers) that
    # start before ``hi``, the last one ending there.
    interval = dim.aggregation_interval
    assert interval != "none"  # a period that is one window is aggregated as one
    starts = period_starts(from_ns, to_ns, interval, tz)
    n = bisect_left(starts, hi)  # starts[:n]: the intervals measured

    def cut(b: int) -> bool:  # an interval starts inside bucket b, or hi cuts it
        k = bisect_right(starts, b, 0, n)
        return (k < n and starts[k] < b + BUCKET_NS) or b < hi < b + BUCKET_NS

    def interval_of(ts: int) -> int:
        return bisect_right(starts, ts, 0, n) - 1

    if method == "unique_count":
        last = starts[n - 1]
        return _unique_intervals(store, customer, dim, from_ns, hi, last, cut, interval_of)
    if method in ROLLUP_COLUMNS:
        return _column_intervals(store, customer, dim, from_ns, hi, starts[n - 1], cut, interval_of)
    rows = store.rollups(customer, dim.id, floor_bucket(from_ns), ceil_bucket(hi))
    tail = floor_bucket(hi)
    whole = (
        hi % BUCKET_NS != 0
        and not tail < starts[n - 1] < hi
        and (not rows or rows[-1].bucket_ns != tail or rows[-1].last_ts < hi)
    )
    parts: dict[int, list[RollupRow]] = {}
    points: dict[int, list[RawPoint]] = {}
    raw_buckets: list[int] = []
    k, end = -1, from_ns  # interval k ends at ``end``; no row is before from_ns uncut
    for r in rows:
        b = r.bucket_ns
        if cut(b) and not (whole and b == tail):
            raw_buckets.append(b)
            continue
        if b >= end:
            k = interval_of(b)
            end = starts[k + 1] if k + 1 < n else hi
        parts.setdefault(k, []).append(r)
    raw = _raw_in(store, customer, dim.id, raw_buckets, from_ns, hi, None)
    for p in raw:
        points.setdefault(interval_of(p.ts), []).append(p)
    usage = _value(method, [r for k in sorted(parts) for r in parts[k]], raw)
    values = [_value(method, parts.get(k, ()), points.get(k, ())) for k in parts.keys() | points]
    return usage, _total(values, dim)


def _column_intervals(
    store: UsageReader,
    customer: str,
    dim: Dimension,
    from_ns: int,
    hi: int,
    last_start: int,
    cut: Callable[[int], bool],
    interval_of: Callable[[int], int],
) -> tuple[Decimal | None, Decimal]:
    """``_period_intervals`` for sum, count, min and max: one column of the rollups is all
    they need (a row made whole is five decimals; most of a year's rating was making them)."""
    method = cast(RollupColumn, dim.aggregation)
    cells = store.rollup_column(customer, dim.id, floor_bucket(from_ns), ceil_bucket(hi), method)
    tail = _column_tail(store, customer, dim.id, method, cells, {last_start}, hi)
    if tail is not None:
        cells = _with_tail(cells, tail)
    whole = None if tail is None else tail[0]
    parts, raw_buckets = _by_interval(cells, cut, whole, interval_of)
    points: dict[int, list[Decimal]] = {}
    for p in _raw_in(store, customer, dim.id, raw_buckets, from_ns, hi, None):
        points.setdefault(interval_of(p.ts), []).append(p.value)
    usage = _column_value(method, chain(*parts.values()), chain(*points.values()))
    values = [
        _column_value(method, parts.get(k, ()), points.get(k, ())) for k in parts.keys() | points
    ]
    return usage, _total(values, dim)


def _column_tail(
    store: UsageReader,
    customer: str,
    dimension: str,
    method: RollupColumn,
    cells: Sequence[tuple[int, Any]],
    bounds: set[int],
    hi: int,
) -> tuple[int, Any] | None:
    """The bucket ``hi`` (the end of the last window, often ``as_of`` = now) splits, when no
    other bound splits it, and one column's value of its records before ``hi`` taken from the
    bucket's cell: the cell less the records at or after ``hi`` (a sender's clock ahead: few),
    read with it in one snapshot, instead of every record before ``hi`` (the current hour, at
    every rating). A sum and a count subtract; a max (min) stands when the later records'
    max (min) is below (above) it, else the bucket is read raw (None). Value None: the bucket
    holds no record."""
    if not hi % BUCKET_NS:
        return None
    b = floor_bucket(hi)
    if any(b < x < hi for x in bounds):
        return None
    if not cells or cells[-1][0] != b:
        return b, None  # no row: no record in the bucket
    got = store.split_tail(customer, dimension, b, hi, method)
    if got is None:
        return b, None  # (cancelled since the cells were read)
    cell, later = got
    if not later:
        return b, cell
    if method == "count":
        return b, cell - len(later)
    if method == "sum":
        for v in later:
            cell = EXACT.subtract(cell, v)
        return b, cell
    if method == "max":
        return (b, cell) if max(later) < cell else None
    return (b, cell) if min(later) > cell else None


def _with_tail(cells: list[tuple[int, Any]], tail: tuple[int, Any]) -> list[tuple[int, Any]]:
    """``cells`` with the tail bucket's cell (the last, if any) replaced by ``tail``'s value."""
    b, value = tail
    kept = cells[:-1] if cells and cells[-1][0] == b else cells
    return kept if value is None else [*kept, (b, value)]


def _by_interval(
    cells: Iterable[tuple[int, V]],
    cut: Callable[[int], bool],
    whole: int | None,
    interval_of: Callable[[int], int],
) -> tuple[dict[int, list[V]], list[int]]:
    """Cells (bucket, value) gathered per interval; the buckets an interval bound cuts (but
    the whole tail) are left out and returned, in order, to be read raw."""
    parts: dict[int, list[V]] = {}
    raw_buckets: set[int] = set()
    for b, v in cells:
        if cut(b) and b != whole:
            raw_buckets.add(b)
        else:
            parts.setdefault(interval_of(b), []).append(v)
    return parts, sorted(raw_buckets)


def _column_value(method: str, cells: Iterable[Any], raw: Iterable[Decimal]) -> Decimal | None:
    """The value of one rollup column's cells and raw record values taken together."""
    if method == "count":
        return Decimal(sum(cells) + sum(1 for _ in raw))
    if method == "sum":
        total = ZERO
        for v in chain(cells, raw):
            total = EXACT.add(total, v)
        return total
    if method == "max":
        return max(chain(cells, raw), default=None)
    return min(chain(cells, raw), default=None)


def _value(method: str, rows: Sequence[RollupRow], raw: Sequence[RawPoint]) -> Decimal | None:
    """The value of rollup rows and raw records taken together (SPEC §2)."""
    if method == "count":
        return Decimal(sum(r.count for r in rows) + len(raw))
    if method == "sum" or method == "avg":
        total = ZERO
        for r in rows:
            total = EXACT.add(total, r.sum)
        for p in raw:
            total = EXACT.add(total, p.value)
        if method == "sum":
            return total
        count = sum(r.count for r in rows) + len(raw)
        return divide(total, count) if count else None
    if method == "max":
        return max(chain((r.max for r in rows), (p.value for p in raw)), default=None)
    if method == "min":
        return min(chain((r.min for r in rows), (p.value for p in raw)), default=None)
    last = max(
        chain(
            ((r.last_ts, r.last_seq, r.last_value) for r in rows),
            ((p.ts, p.seq, p.value) for p in raw),
        ),
        default=None,
        key=lambda t: t[:2],
    )
    return None if last is None else last[2]


def _unique_intervals(
    store: UsageReader,
    customer: str,
    dim: Dimension,
    from_ns: int,
    hi: int,
    last_start: int,
    cut: Callable[[int], bool],
    interval_of: Callable[[int], int],
) -> tuple[Decimal | None, Decimal]:
    pairs = store.distinct(customer, dim.id, floor_bucket(from_ns), ceil_bucket(hi))
    whole = _whole_tail(store, customer, dim.id, {last_start}, hi)
    parts, raw_buckets = _by_interval(pairs, cut, whole, interval_of)
    values = {k: set(v) for k, v in parts.items()}
    for p in _raw_in(store, customer, dim.id, raw_buckets, from_ns, hi, dim.unique_key):
        if p.unique is not None:
            values.setdefault(interval_of(p.ts), set()).add(p.unique)
    usage = Decimal(len(set().union(*values.values())))
    return usage, _total([Decimal(len(v)) for v in values.values()], dim)
