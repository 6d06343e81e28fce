"""Exact aggregation of a dimension over windows, from rollups and raw records.

A window ``[s, e)`` is answered from the UTC-hour rollup buckets that lie wholly inside it, plus
raw records for any bucket a window boundary cuts (unaligned ``from``/``to``, or time zones whose
offset is not a whole hour). ``time_weighted_avg`` reads raw levels (its buckets depend on the
level carried in), and so do seats (``unique_count`` that is ``prorated`` or counts values
present at the ``end``: a value's presence runs from its first record to its ``remove``
record, across windows); every other method is answered from rollups.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from zoneinfo import ZoneInfo

from meter_gateway.aggregation.windows import BUCKET_NS, ceil_bucket, floor_bucket, split
from meter_gateway.config import Dimension
from meter_gateway.decimals import EXACT, ZERO
from meter_gateway.store.base import RawPoint, RollupRow, UsageReader, unique_of

RESULT_PLACES = Decimal("1e-18")
_ROUNDING = {"ceil": ROUND_CEILING, "floor": ROUND_FLOOR, "round": ROUND_HALF_UP}
_EPOCH_BUCKET = -(2**62)
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
    whole = _whole_tail(store, customer, dim.id, bounds, hi)
    if whole is not None:
        split_buckets.remove(whole)
    if method == "unique_count":
        return _unique(store, customer, dim, windows, split_buckets)
    rows = [
        r
        for r in store.rollups(customer, dim.id, floor_bucket(lo), ceil_bucket(hi))
        if r.bucket_ns not in split_buckets
    ]
    raw = _raw_in(store, customer, dim.id, split_buckets, lo, hi, None)
    if method == "weighted_sum":
        return _weighted(store, customer, dim.id, windows, lengths, rows, raw)
    out: list[Decimal | None] = []
    ri = pi = 0
    for _s, e in windows:
        count, total = 0, ZERO
        mn: Decimal | None = None
        mx: Decimal | None = None
        last: tuple[int, int, Decimal] | None = None
        while ri < len(rows) and rows[ri].bucket_ns < e:
            r = rows[ri]
            ri += 1
            count += r.count
            total = EXACT.add(total, r.sum)
            mn = r.min if mn is None or r.min < mn else mn
            mx = r.max if mx is None or r.max > mx else mx
            if last is None or (r.last_ts, r.last_seq) > last[:2]:
                last = (r.last_ts, r.last_seq, r.last_value)
        while pi < len(raw) and raw[pi].ts < e:
            p = raw[pi]
            pi += 1
            count += 1
            total = EXACT.add(total, p.value)
            mn = p.value if mn is None or p.value < mn else mn
            mx = p.value if mx is None or p.value > mx else mx
            if last is None or (p.ts, p.seq) > last[:2]:
                last = (p.ts, p.seq, p.value)
        if method == "sum":
            out.append(total)
        elif method == "count":
            out.append(Decimal(count))
        elif method == "min":
            out.append(mn)
        elif method == "max":
            out.append(mx)
        elif method == "avg":
            out.append(divide(total, count) if count else None)
        else:  # last
            out.append(last[2] if last is not None else None)
    return out


def _whole_tail(
    store: UsageReader, customer: str, dimension: str, bounds: set[int], hi: int
) -> int | None:
    """The bucket that ``hi`` (the end of the last window, often ``as_of`` = now) splits, if
    no other bound splits it and every record in it lies before ``hi``: its rollup row then
    holds exactly the part before ``hi`` (a rollup's ``last_ts`` is its latest record's), so
    it is read whole instead of as raw records (the current hour, at every rating)."""
    if not hi % BUCKET_NS:
        return None
    b = floor_bucket(hi)
    if any(b < x < hi for x in bounds):
        return None
    rows = store.rollups(customer, dimension, b, b + BUCKET_NS)
    return b if not rows or rows[0].last_ts < hi else None


def _raw_in(
    store: UsageReader,
    customer: str,
    dimension: str,
    buckets: Sequence[int],
    lo: int,
    hi: int,
    unique_key: str | None,
) -> list[RawPoint]:
    out: list[RawPoint] = []
    for b in buckets:
        out.extend(store.raw(customer, dimension, max(b, lo), min(b + BUCKET_NS, hi), unique_key))
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
    for r in store.rollups(customer, dimension, _EPOCH_BUCKET, floor_bucket(lo)):
        level = EXACT.add(level, r.sum)
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
    pairs = sorted(
        (b, v)
        for b, v in store.distinct(customer, dim.id, floor_bucket(lo), ceil_bucket(hi))
        if b not in skip
    )
    raw = _raw_in(store, customer, dim.id, split_buckets, lo, hi, dim.unique_key)
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
    q = divide(value, dim.usage_increment)
    mode = _ROUNDING.get(dim.rounding)
    if mode is None:
        return q
    return q.quantize(Decimal(1), rounding=mode, context=EXACT)


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
    measured up to ``as_of`` (see ``aggregate``); billing.rating is its one caller."""
    if to_ns <= from_ns:
        return ZERO
    if dim.aggregation_interval == "none":
        windows = [(from_ns, to_ns)]
    else:
        windows = split(from_ns, to_ns, dim.aggregation_interval, tz)
    total = ZERO
    for v in aggregate(store, customer, dim, windows, as_of):
        if v is not None:
            total = EXACT.add(total, round_increments(v, dim))
    return total.normalize(EXACT) if total != 0 else ZERO
