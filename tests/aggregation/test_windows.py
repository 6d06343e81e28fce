"""Window truncation: ``split`` walks exactly the windows ``truncate``/``next_start`` define."""

from __future__ import annotations

import random
from zoneinfo import ZoneInfo

import pytest

from meter_gateway.aggregation.windows import (
    REMEMBERED_WINDOWS,
    Window,
    next_start,
    period_starts,
    period_windows,
    split,
    truncate,
)

NS = 1_000_000_000
HOUR = 3600 * NS


def _walk(from_ns: int, to_ns: int, window: Window, tz: ZoneInfo) -> list[tuple[int, int]]:
    out = []
    start = truncate(from_ns, window, tz)
    while start < to_ns:
        end = next_start(start, window, tz)
        out.append((max(start, from_ns), min(end, to_ns)))
        start = end
    return out


@pytest.mark.parametrize(
    "zone",
    ["UTC", "Europe/Berlin", "Asia/Kolkata", "Australia/Lord_Howe", "America/St_Johns",
     "Asia/Kathmandu", "Pacific/Apia"],
)  # fmt: skip
def test_split_walks_the_windows_truncate_and_next_start_define(zone: str) -> None:
    """Across DST changes (whole and half hours), skipped days and quarter-hour offsets."""
    tz = ZoneInfo(zone)
    rng = random.Random(zone)
    for _ in range(40):
        frm = rng.randrange(1_200_000_000, 1_900_000_000) * NS + rng.randrange(NS)
        for window, longest in (("hour", 400 * HOUR), ("day", 800 * 24 * HOUR), ("month", None)):
            to = frm + rng.randrange(1, longest or 40 * 31 * 24 * HOUR)
            assert split(frm, to, window, tz) == _walk(frm, to, window, tz)  # type: ignore[arg-type]


def test_a_year_of_hours_is_walked_once_per_period() -> None:
    tz = ZoneInfo("Europe/Berlin")
    frm = 1_767_225_600 * NS
    to = frm + 365 * 24 * HOUR + 123
    first = period_windows(frm, to, "hour", tz)
    assert period_windows(frm, to, "hour", tz) is first  # remembered for the next customer
    assert len(first) == 365 * 24 + 1
    assert split(frm, to, "hour", tz) == list(first)
    assert split(frm, frm, "hour", tz) == []


def test_a_range_longer_than_two_years_of_hours_is_walked_not_kept() -> None:
    tz = ZoneInfo("UTC")
    frm = 1_767_225_600 * NS
    to = frm + (REMEMBERED_WINDOWS + 10) * HOUR
    first = period_windows(frm, to, "hour", tz)
    assert len(first) == REMEMBERED_WINDOWS + 10
    assert period_windows(frm, to, "hour", tz) is not first
    assert period_starts(frm, to, "hour", tz) == tuple(s for s, _ in first)
    assert period_starts(frm, frm + HOUR + 1, "hour", tz) == (frm, frm + HOUR)
