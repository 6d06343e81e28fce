"""Every aggregation method of SPEC §2 over real SQLite rollups and raw records."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from meter_gateway.aggregation.engine import aggregate, billable_quantity, period, round_increments
from meter_gateway.aggregation.windows import split
from meter_gateway.config import Dimension
from meter_gateway.model import Source, UsageRecord, dedup_key
from meter_gateway.store.base import ROLLUP_COLUMNS
from meter_gateway.store.sqlite import SQLiteStore
from tests.helpers import commit, open_store, rec, ts

UTC = ZoneInfo("UTC")
NS = 1_000_000_000


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = open_store(tmp_path)
    yield s
    s.close()


def dim(aggregation: str, **kw: object) -> Dimension:
    return Dimension.model_validate({"id": "d1", "name": "D", "aggregation": aggregation, **kw})


def hours(frm: str, to: str) -> list[tuple[int, int]]:
    return split(ts(frm), ts(to), "hour", UTC)


def test_ten_tenths_sum_to_exactly_one(store: SQLiteStore) -> None:
    commit(store, *[rec(f"2026-05-01T10:{i:02d}:00", "0.1") for i in range(10)])
    [v] = aggregate(
        store, "c1", dim("sum"), [(ts("2026-05-01T00:00:00"), ts("2026-05-02T00:00:00"))]
    )
    assert v == Decimal("1")
    assert str(v) == "1.0"  # exact decimal arithmetic: no 0.9999999999999999


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("sum", ["3", "0", "10"]),
        ("count", ["2", "0", "2"]),
        ("max", ["2", None, "6"]),
        ("min", ["1", None, "4"]),
        ("avg", ["1.5", None, "5"]),
        ("last", ["2", None, "4"]),
    ],
)
def test_simple_methods_per_hour_window(
    store: SQLiteStore, method: str, expected: list[str | None]
) -> None:
    commit(
        store,
        rec("2026-05-01T10:10:00", "1"),
        rec("2026-05-01T10:50:00", "2"),
        rec("2026-05-01T12:59:00", "4"),
        rec("2026-05-01T12:05:00", "6"),
    )
    values = aggregate(
        store, "c1", dim(method), hours("2026-05-01T10:00:00", "2026-05-01T13:00:00")
    )
    assert values == [None if e is None else Decimal(e) for e in expected]


def test_last_ties_go_to_the_record_received_last(store: SQLiteStore) -> None:
    commit(store, rec("2026-05-01T10:00:00", "1"))
    commit(store, rec("2026-05-01T10:00:00", "7"))
    commit(store, rec("2026-05-01T09:00:00", "9"))  # earlier timestamp, received later
    [v] = aggregate(
        store, "c1", dim("last"), [(ts("2026-05-01T00:00:00"), ts("2026-05-02T00:00:00"))]
    )
    assert v == Decimal(7)


def test_unaligned_ranges_read_raw_records_at_the_edges(store: SQLiteStore) -> None:
    commit(
        store,
        rec("2026-05-01T10:10:00", "1"),
        rec("2026-05-01T10:40:00", "2"),
        rec("2026-05-01T11:20:00", "4"),
        rec("2026-05-01T11:50:00", "8"),
    )
    d = dim("sum")
    assert aggregate(store, "c1", d, [(ts("2026-05-01T10:30:00"), ts("2026-05-01T11:30:00"))]) == [
        Decimal(6)
    ]
    assert aggregate(store, "c1", d, [(ts("2026-05-01T10:00:00"), ts("2026-05-01T10:40:00"))]) == [
        Decimal(1)
    ]
    # the boundary is inclusive at the start, exclusive at the end
    assert aggregate(store, "c1", d, [(ts("2026-05-01T10:40:00"), ts("2026-05-01T11:50:00"))]) == [
        Decimal(6)
    ]


def test_half_hour_time_zone_days(store: SQLiteStore) -> None:
    # Asia/Kolkata is UTC+5:30: its day starts at 18:30 UTC, inside a rollup bucket.
    commit(store, rec("2026-05-01T18:10:00", "1"), rec("2026-05-01T18:40:00", "2"))
    tz = ZoneInfo("Asia/Kolkata")
    spans = split(ts("2026-05-01T00:00:00"), ts("2026-05-03T00:00:00"), "day", tz)
    values = aggregate(store, "c1", dim("sum"), spans)
    assert values[:2] == [Decimal(1), Decimal(2)]


def test_unique_count_counts_distinct_keys_across_hours(store: SQLiteStore) -> None:
    commit(
        store,
        rec("2026-05-01T10:00:00", "1", unique="alice"),
        rec("2026-05-01T10:30:00", "1", unique="bob"),
        rec("2026-05-01T11:00:00", "1", unique="alice"),
        rec("2026-05-01T11:10:00", "1", unique="carol"),
    )
    d = dim("unique_count", unique_key="user_id")
    assert aggregate(store, "c1", d, hours("2026-05-01T10:00:00", "2026-05-01T13:00:00")) == [
        Decimal(2),
        Decimal(2),
        Decimal(0),
    ]
    assert aggregate(store, "c1", d, [(ts("2026-05-01T00:00:00"), ts("2026-05-02T00:00:00"))]) == [
        Decimal(3)
    ]


def test_weighted_sum_is_the_time_weighted_level_of_changes(store: SQLiteStore) -> None:
    # +10 GB at 10:00, +20 at 10:30, -30 at 11:15: level 10, 30, then 0.
    commit(
        store,
        rec("2026-05-01T10:00:00", "10"),
        rec("2026-05-01T10:30:00", "20"),
        rec("2026-05-01T11:15:00", "-30"),
    )
    d = dim("weighted_sum")
    values = aggregate(store, "c1", d, hours("2026-05-01T09:00:00", "2026-05-01T13:00:00"))
    # 10:00-11:00: half at 10, half at 30 → 20; 11:00-12:00: a quarter at 30 → 7.5
    assert values == [Decimal(0), Decimal(20), Decimal("7.5"), Decimal(0)]
    # the level carries across windows and into unaligned ranges
    assert aggregate(store, "c1", d, [(ts("2026-05-01T10:45:00"), ts("2026-05-01T11:00:00"))]) == [
        Decimal(30)
    ]


def test_time_weighted_avg_holds_levels_across_windows(store: SQLiteStore) -> None:
    commit(store, rec("2026-05-01T10:00:00", "4"), rec("2026-05-01T10:45:00", "8"))
    d = dim("time_weighted_avg")
    values = aggregate(store, "c1", d, hours("2026-05-01T09:00:00", "2026-05-01T12:00:00"))
    # before the first record ever the level is 0; 10:00-11:00 = 4·¾ + 8·¼ = 5; then 8 holds
    assert values == [Decimal(0), Decimal(5), Decimal(8)]


def test_billable_quantity_rounds_each_interval(store: SQLiteStore) -> None:
    # SPEC example: minutes, increment 60, ceil, hourly: 47 minutes in an hour bill as 1 hour.
    commit(
        store,
        rec("2026-05-01T10:05:00", "47"),
        rec("2026-05-01T11:05:00", "61"),
        rec("2026-05-01T11:35:00", "59"),
    )
    d = dim("sum", aggregation_interval="hour", usage_increment=60, rounding="ceil")
    q = billable_quantity(store, "c1", d, ts("2026-05-01T00:00:00"), ts("2026-05-02T00:00:00"), UTC)
    assert q == Decimal(1 + 2)
    none = dim("sum", usage_increment=60, rounding="ceil")  # one interval: 167 min → 3
    assert billable_quantity(
        store, "c1", none, ts("2026-05-01T00:00:00"), ts("2026-05-02T00:00:00"), UTC
    ) == Decimal(3)


@pytest.mark.parametrize(
    ("rounding", "expected"), [("none", "2.5"), ("floor", "2"), ("ceil", "3"), ("round", "3")]
)
def test_rounding_modes(store: SQLiteStore, rounding: str, expected: str) -> None:
    commit(store, rec("2026-05-01T10:05:00", "25"))
    d = dim("sum", usage_increment=10, rounding=rounding)
    assert billable_quantity(
        store, "c1", d, ts("2026-05-01T00:00:00"), ts("2026-05-02T00:00:00"), UTC
    ) == Decimal(expected)


def test_rollups_survive_reopen_and_merge_with_new_records(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    commit(s, rec("2026-05-01T10:05:00", "1.5", rid="a"))
    s.close()
    s = open_store(tmp_path)
    commit(s, rec("2026-05-01T10:06:00", "2.25", rid="b"), rec("2026-05-01T10:07:00", "9", rid="a"))
    assert aggregate(
        s, "c1", dim("sum"), [(ts("2026-05-01T10:00:00"), ts("2026-05-01T11:00:00"))]
    ) == [Decimal("3.75")]
    s.close()


class _CountingReads:
    """The store, counting raw-record and rollup reads (whole rows or one column) and reads of
    a split bucket's cell with its later records."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.raw_reads = 0
        self.rollup_reads = 0
        self.split_reads = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)

    def raw(self, *args: object, **kw: object) -> object:
        self.raw_reads += 1
        return self.store.raw(*args, **kw)  # type: ignore[arg-type]

    def rollups(self, *args: object, **kw: object) -> object:
        self.rollup_reads += 1
        return self.store.rollups(*args, **kw)  # type: ignore[arg-type]

    def rollup_column(self, *args: object, **kw: object) -> object:
        self.rollup_reads += 1
        return self.store.rollup_column(*args, **kw)  # type: ignore[arg-type]

    def split_tail(self, *args: object, **kw: object) -> object:
        self.split_reads += 1
        return self.store.split_tail(*args, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["sum", "count", "max", "min", "avg", "last", "weighted_sum"])
def test_the_bucket_as_of_splits_is_read_whole_while_nothing_in_it_is_later(
    store: SQLiteStore, method: str
) -> None:
    """``as_of`` = now splits the current hour: while every record of that hour is before it
    the hour's rollup row is the exact answer, and no raw record is read; one record after it
    (a sender's clock ahead) and the same window reads the hour's records again."""
    commit(
        store,
        rec("2026-05-01T09:30:00", "5"),
        rec("2026-05-01T10:20:00", "3"),
        rec("2026-05-01T10:05:00", "-2"),
        rec("2026-05-01T10:40:00", "7"),
    )
    d = dim(method)
    window = [(ts("2026-05-01T00:00:00"), ts("2026-05-02T00:00:00"))]
    as_of = ts("2026-05-01T10:45:00")
    reads = _CountingReads(store)
    whole = aggregate(reads, "c1", d, window, as_of)  # type: ignore[arg-type]
    assert reads.raw_reads == 0
    # what the raw records say: the same window with the as_of bucket split by a window start
    split_at = ts("2026-05-01T10:01:00")
    parts = [(window[0][0], split_at), (split_at, window[0][1])]
    expected = {
        "sum": Decimal(13),
        "count": Decimal(4),
        "max": Decimal(7),
        "min": Decimal(-2),
        "avg": Decimal("3.25"),
        "last": Decimal(7),
    }
    if method == "weighted_sum":
        # level 5 from 09:30, 3 from 10:05, 6 from 10:20, 13 from 10:40, over a 24 h window
        integral = 5 * 35 + 3 * 15 + 6 * 20 + 13 * 5
        expected[method] = Decimal(integral) / Decimal(24 * 60)
        assert whole[0] is not None
        assert abs(whole[0] - expected[method]) < Decimal("1e-15")
    else:
        assert whole == [expected[method]]
    assert len(aggregate(store, "c1", d, parts, as_of)) == 2

    commit(store, rec("2026-05-01T10:50:00", "100"))  # after as_of, in the same hour
    reads = _CountingReads(store)
    assert aggregate(reads, "c1", d, window, as_of) == whole
    # sum, count and min take the hour's cell less that later record (read with it in one
    # statement); max cannot (the later record holds it), nor can the whole-row methods
    assert reads.raw_reads == (0 if method in ("sum", "count", "min") else 1)
    assert reads.split_reads == (1 if method in ROLLUP_COLUMNS else 0)


def test_unique_count_reads_the_as_of_bucket_whole_while_nothing_in_it_is_later(
    store: SQLiteStore,
) -> None:
    d = dim("unique_count", unique_key="user")

    def seen(when: str, user: str) -> UsageRecord:
        return dataclasses.replace(rec(when, "1", unique=user), metadata={"user": user})

    commit(store, seen("2026-05-01T10:10:00", "a"), seen("2026-05-01T10:20:00", "b"))
    commit(store, seen("2026-05-01T10:30:00", "a"))
    window = [(ts("2026-05-01T00:00:00"), ts("2026-05-02T00:00:00"))]
    as_of = ts("2026-05-01T10:45:00")
    reads = _CountingReads(store)
    assert aggregate(reads, "c1", d, window, as_of) == [Decimal(2)]  # type: ignore[arg-type]
    assert reads.raw_reads == 0
    commit(store, seen("2026-05-01T10:50:00", "c"))
    reads = _CountingReads(store)
    assert aggregate(reads, "c1", d, window, as_of) == [Decimal(2)]  # type: ignore[arg-type]
    assert reads.raw_reads == 1


# --- a period's billable quantity from the intervals that hold records (engine.period) --------

_ZONES = ["UTC", "Europe/Berlin", "Asia/Kolkata", "Australia/Lord_Howe"]
_SPARSE = ["sum", "count", "max", "min", "avg", "last", "unique_count"]


def _dense(
    store: SQLiteStore, d: Dimension, frm: int, to: int, tz: ZoneInfo, as_of: int | None
) -> tuple[Decimal | None, Decimal]:
    """The reference: every interval of the period aggregated, rounded and added up."""
    [usage] = aggregate(store, "c1", d, [(frm, to)], as_of)
    windows = split(frm, to, d.aggregation_interval, tz)  # type: ignore[arg-type]
    total = Decimal(0)
    for v in aggregate(store, "c1", d, windows, as_of):
        if v is not None:
            total += round_increments(v, d)
    return usage, total


@pytest.mark.parametrize("zone", _ZONES)
def test_period_from_the_intervals_with_records_equals_every_interval(
    store: SQLiteStore, zone: str
) -> None:
    """Around DST changes (Berlin's spring forward, Lord Howe's half-hour fall back on
    2026-04-05) and in a half-hour zone: the intervals that hold records give the quantity and
    the usage of every interval taken in turn, for every method whose empty interval bills
    nothing, at unaligned ``from``/``to`` and ``as_of`` inside and outside the period."""
    rng = random.Random(zone)
    t0 = ts("2026-03-25T00:00:00")
    records = []
    for i in range(300):
        # dense on some days, none for days at a time
        day = rng.choice([0, 1, 2, 4, 9, 10, 11, 12, 20])
        when = t0 + day * 86400 * NS + rng.randrange(86400) * NS + rng.randrange(1000) * 10**6
        user = f"u{rng.randrange(6)}"
        r = UsageRecord(
            when, "c1", "d1", Decimal(rng.randrange(-500, 5000)) / 100, f"r{i}", None,
            Source.REST, dedup_key("id", f"r{i}"), user,
        )  # fmt: skip
        records.append(dataclasses.replace(r, metadata={"user": user}))
    records.sort(key=lambda r: rng.random())
    for k in range(0, len(records), 50):
        commit(store, *records[k : k + 50])
    tz = ZoneInfo(zone)
    span = 24 * 86400 * NS
    for method in _SPARSE:
        for interval in ("hour", "day", "month"):
            for rounding, increment in (("ceil", "60"), ("round", "0.7"), ("none", "1")):
                d = dim(
                    method,
                    aggregation_interval=interval,
                    rounding=rounding,
                    usage_increment=increment,
                    **({"unique_key": "user"} if method == "unique_count" else {}),
                )
                for _ in range(2):
                    frm = t0 - 86400 * NS + rng.randrange(span)
                    to = frm + rng.randrange(1, span)
                    as_of = rng.choice([None, to, frm - 1, rng.randrange(frm, to + 3600 * NS)])
                    got = period(store, "c1", d, frm, to, tz, as_of)
                    want = _dense(store, d, frm, to, tz, as_of)
                    assert got == want, (method, interval, rounding, frm, to, as_of)
                    assert billable_quantity(store, "c1", d, frm, to, tz, as_of) == want[1]


def test_a_year_of_hours_reads_its_rollups_once(store: SQLiteStore) -> None:
    """Three records in a year of hourly intervals: one rollup read, no raw read (the period's
    edges cut no bucket that holds records), and each record's hour rounded on its own."""
    commit(
        store,
        rec("2026-01-10T10:10:00", "61"),
        rec("2026-01-10T10:50:00", "1"),
        rec("2026-04-02T23:59:59", "0.5"),
    )
    d = dim("sum", aggregation_interval="hour", usage_increment=60, rounding="ceil")
    reads = _CountingReads(store)
    frm, to = ts("2025-12-31T12:34:56"), ts("2026-12-31T12:34:56")
    got = period(reads, "c1", d, frm, to, UTC, ts("2026-06-01T00:00:30"))  # type: ignore[arg-type]
    assert got == (Decimal("62.5"), Decimal(3))
    assert (reads.rollup_reads, reads.raw_reads) == (1, 0)


def test_records_in_the_buckets_the_edges_cut_are_read_raw(store: SQLiteStore) -> None:
    commit(
        store,
        rec("2026-05-01T10:10:00", "30"),  # before from
        rec("2026-05-01T10:40:00", "30"),
        rec("2026-05-01T12:10:00", "30"),
        rec("2026-05-01T12:50:00", "30"),  # after as_of
    )
    d = dim("sum", aggregation_interval="hour", usage_increment=60, rounding="ceil")
    reads = _CountingReads(store)
    frm, to, as_of = ts("2026-05-01T10:30:00"), ts("2026-05-02T00:00:00"), ts("2026-05-01T12:30:00")
    got = period(reads, "c1", d, frm, to, UTC, as_of)  # type: ignore[arg-type]
    assert got == (Decimal(60), Decimal(2))
    # the bucket from cuts is read raw; the one as_of cuts is its cell less its later record
    assert (reads.raw_reads, reads.split_reads) == (1, 1)


def test_a_period_measured_before_it_starts_has_nothing(store: SQLiteStore) -> None:
    commit(store, rec("2026-05-01T10:10:00", "30"))
    frm, to = ts("2026-05-01T00:00:00"), ts("2026-05-02T00:00:00")
    for method, nothing in (("sum", Decimal(0)), ("max", None), ("unique_count", Decimal(0))):
        d = dim(method, aggregation_interval="hour", unique_key="user")
        assert period(store, "c1", d, frm, to, UTC, frm) == (nothing, Decimal(0))
        assert period(store, "c1", d, frm, frm, UTC) == (None, Decimal(0))


@pytest.mark.parametrize(
    ("value", "increment", "rounding", "expected"),
    [
        ("6.000000000000000001", "3", "ceil", "2"),  # the quotient to 18 places first: 2.0…0
        ("6.000000000000000002", "3", "ceil", "3"),  # 2.000000000000000001 (18 places) up
        ("1", "3", "ceil", "1"),
        ("-1", "3", "floor", "-1"),
        ("1.5", "1", "round", "2"),
        ("-1.5", "1", "round", "-2"),  # half away from zero
        ("2.5", "1", "round", "3"),
        ("0", "60", "ceil", "0"),
        ("1", "3", "none", "0.333333333333333333"),
    ],
)
def test_round_increments_rounds_the_quotient_divide_gives(
    value: str, increment: str, rounding: str, expected: str
) -> None:
    d = dim("sum", usage_increment=increment, rounding=rounding)
    q = round_increments(Decimal(value), d)
    assert q == Decimal(expected)
    if rounding != "none":
        assert q.as_tuple().exponent == 0
