"""Window truncation as pure functions of (timestamp, window, time zone).

Timestamps are integer nanoseconds since the epoch. Hour, day and month windows are aligned in
the given IANA zone (an hour in Asia/Kolkata starts at :30 UTC; a day in a DST zone may last 23
or 25 hours). Rollup buckets are UTC hours.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Literal
from zoneinfo import ZoneInfo

from meter_gateway.timebuckets import BUCKET_NS, NS, ceil_bucket, floor_bucket

__all__ = [
    "BUCKET_NS",
    "NS",
    "Window",
    "ceil_bucket",
    "floor_bucket",
    "next_start",
    "period_starts",
    "period_windows",
    "split",
    "truncate",
]

Window = Literal["hour", "day", "month"]


def _local(ts_ns: int, tz: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(ts_ns // NS, tz=tz)


def _ns(dt: datetime) -> int:
    return int((dt - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)) * 1000


def truncate(ts_ns: int, window: Window, tz: ZoneInfo) -> int:
    """Start of the window holding ``ts_ns``."""
    if window == "hour":
        offset = _local(ts_ns, tz).utcoffset()
        off_ns = int(offset.total_seconds()) * NS if offset is not None else 0
        return ts_ns - (ts_ns + off_ns) % BUCKET_NS
    local = _local(ts_ns, tz)
    if window == "day":
        start = datetime(local.year, local.month, local.day, tzinfo=tz)
    else:
        start = datetime(local.year, local.month, 1, tzinfo=tz)
    s = _ns(start)
    return s if s <= ts_ns else s - BUCKET_NS  # a skipped local midnight: nearest earlier hour


def next_start(start_ns: int, window: Window, tz: ZoneInfo) -> int:
    """Start of the window after the one starting at ``start_ns``."""
    if window == "hour":
        return _next_hour(start_ns, tz)
    local = _local(start_ns, tz)
    if window == "day":
        nxt = datetime(local.year, local.month, local.day, tzinfo=tz) + timedelta(days=1)
        nxt = datetime(nxt.year, nxt.month, nxt.day, tzinfo=tz)
    else:
        year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
        nxt = datetime(year, month, 1, tzinfo=tz)
    return truncate(_ns(nxt), window, tz) if _ns(nxt) > start_ns else start_ns + BUCKET_NS


def _next_hour(start_ns: int, tz: ZoneInfo) -> int:
    # Offsets change by whole quarter hours at most once around a given instant; stepping one
    # hour and re-truncating keeps windows contiguous across DST changes.
    candidate = truncate(start_ns + BUCKET_NS, "hour", tz)
    return candidate if candidate > start_ns else start_ns + BUCKET_NS


def split(from_ns: int, to_ns: int, window: Window, tz: ZoneInfo) -> list[tuple[int, int]]:
    """Every window in ``[from_ns, to_ns)``, in order, clipped to the range."""
    return list(period_windows(from_ns, to_ns, window, tz))


# A period of up to this many windows (two years of hours) is remembered: its windows are the
# same for every customer and dimension rated over it, and 8,760 hours take milliseconds to
# walk. Longer ranges (a request may span centuries) are walked each time, never kept.
REMEMBERED_WINDOWS = 20_000
# roughly the shortest window of each kind (a DST day has 23 hours), for counting windows
_SHORTEST = {"hour": BUCKET_NS, "day": 23 * BUCKET_NS, "month": 28 * 23 * BUCKET_NS}


def period_windows(
    from_ns: int, to_ns: int, window: Window, tz: ZoneInfo
) -> tuple[tuple[int, int], ...]:
    """``split`` as a tuple, remembered for a period of up to REMEMBERED_WINDOWS windows."""
    if (to_ns - from_ns) // _SHORTEST[window] > REMEMBERED_WINDOWS:
        return _walk(from_ns, to_ns, window, tz)
    return _remembered(from_ns, to_ns, window, tz)


def period_starts(from_ns: int, to_ns: int, window: Window, tz: ZoneInfo) -> tuple[int, ...]:
    """The starts of ``period_windows`` (the first one clipped to ``from_ns``), remembered
    with them."""
    if (to_ns - from_ns) // _SHORTEST[window] > REMEMBERED_WINDOWS:
        return tuple(s for s, _ in _walk(from_ns, to_ns, window, tz))
    return _remembered_starts(from_ns, to_ns, window, tz)


@lru_cache(maxsize=16)
def _remembered(
    from_ns: int, to_ns: int, window: Window, tz: ZoneInfo
) -> tuple[tuple[int, int], ...]:
    return _walk(from_ns, to_ns, window, tz)


@lru_cache(maxsize=16)
def _remembered_starts(from_ns: int, to_ns: int, window: Window, tz: ZoneInfo) -> tuple[int, ...]:
    return tuple(s for s, _ in _remembered(from_ns, to_ns, window, tz))


def _walk(from_ns: int, to_ns: int, window: Window, tz: ZoneInfo) -> tuple[tuple[int, int], ...]:
    if to_ns <= from_ns:
        return ()
    if window == "hour":
        return _hours(from_ns, to_ns, tz)
    out = []
    start = truncate(from_ns, window, tz)
    while start < to_ns:
        end = next_start(start, window, tz)
        out.append((max(start, from_ns), min(end, to_ns)))
        start = end
    return tuple(out)


def _hours(from_ns: int, to_ns: int, tz: ZoneInfo) -> tuple[tuple[int, int], ...]:
    # split's walk for hours (truncate and _next_hour inlined): one offset look-up per hour
    offsets: dict[timedelta | None, int] = {}
    fromtimestamp = datetime.fromtimestamp

    def hour_of(ts_ns: int) -> int:
        offset = fromtimestamp(ts_ns // NS, tz=tz).utcoffset()
        off_ns = offsets.get(offset)
        if off_ns is None:
            off_ns = offsets[offset] = int(offset.total_seconds()) * NS if offset else 0
        return ts_ns - (ts_ns + off_ns) % BUCKET_NS

    out = []
    start = hour_of(from_ns)
    while start < to_ns:
        end = hour_of(start + BUCKET_NS)
        out.append((start, end if end > start else start + BUCKET_NS))
        start = out[-1][1]
    if out:  # clipped to the range
        out[0] = (max(out[0][0], from_ns), out[0][1])
        out[-1] = (out[-1][0], min(out[-1][1], to_ns))
    return tuple(out)
