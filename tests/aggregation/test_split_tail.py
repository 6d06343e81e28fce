"""The bucket ``as_of`` splits, answered from its rollup cell less the records at or after
``as_of`` (``engine._column_tail``): for sum, count, min and max, every window and every
period's billable quantity equals what the records before ``as_of`` say, whatever lies after
it in the same hour (ties with the cell's max or min, records exactly at ``as_of``, an hour
with only later records), on both stores."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter_gateway.aggregation.engine import aggregate, period, round_increments
from meter_gateway.config import Dimension
from meter_gateway.decimals import EXACT, ZERO
from meter_gateway.model import Source, UsageRecord
from meter_gateway.store.base import Store
from tests.helpers import commit, open_store, ts

UTC = ZoneInfo("UTC")
NS = 1_000_000_000
HOUR = 3600 * NS
T0 = ts("2026-05-01T08:00:00")
_customers = itertools.count()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    s = open_store(tmp_path_factory.mktemp("split"))
    yield s
    s.close()


def dim(method: str, **kw: object) -> Dimension:
    return Dimension.model_validate({"id": "d", "name": "D", "aggregation": method, **kw})


# (seconds after 08:00, value): three hours, values that tie often
points = st.lists(
    st.tuples(st.integers(0, 3 * 3600 - 1), st.sampled_from(["-2", "0", "1.5", "3", "7", "7"])),
    min_size=0,
    max_size=25,
)


def oracle(method: str, values: list[Decimal]) -> Decimal | None:
    if method == "count":
        return Decimal(len(values))
    if method == "sum":
        total = ZERO
        for v in values:
            total = EXACT.add(total, v)
        return total
    if not values:
        return None
    return max(values) if method == "max" else min(values)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    before=points,
    after_as_of=st.lists(st.sampled_from(["-2", "0", "3", "7", "9"]), max_size=4),
    as_of_s=st.integers(1, 3 * 3600 - 1),
    method=st.sampled_from(["sum", "count", "max", "min"]),
)
def test_the_split_bucket_is_its_cell_less_what_came_later(
    store: Store,
    before: list[tuple[int, str]],
    after_as_of: list[str],
    as_of_s: int,
    method: str,
) -> None:
    customer = f"c{next(_customers)}"
    as_of = T0 + as_of_s * NS
    records = [(T0 + s * NS, Decimal(v)) for s, v in before]
    # later records in the bucket as_of splits, the first exactly at as_of
    bucket_end = as_of - as_of % HOUR + HOUR
    step = max(1, (bucket_end - as_of) // (len(after_as_of) + 1))
    records += [(as_of + i * step, Decimal(v)) for i, v in enumerate(after_as_of)]
    usage = [UsageRecord(t, customer, "d", v, None, None, Source.REST) for t, v in records]
    for k in range(0, len(usage), 7):  # several commits: the cell merges them
        commit(store, *usage[k : k + 7])
    measured = [(t, v) for t, v in records if t < as_of]
    windows = [(T0 - HOUR, T0 + HOUR + 1800 * NS), (T0 + HOUR + 1800 * NS, T0 + 4 * HOUR)]
    want = [
        oracle(method, [v for t, v in measured if s <= t < e]) if s < as_of else None
        for s, e in windows
    ]
    if method in ("sum", "count"):
        want = [ZERO if w is None else w for w in want]
    d = dim(method)
    assert aggregate(store, customer, d, windows, as_of) == want
    # a period of hourly intervals, rounded up to increments of 2
    hourly = dim(method, aggregation_interval="hour", usage_increment="2", rounding="ceil")
    total = ZERO
    for h in range(3):
        values = [v for t, v in measured if T0 + h * HOUR <= t < T0 + (h + 1) * HOUR]
        got = oracle(method, values)
        if got is not None and values:
            total = EXACT.add(total, round_increments(got, hourly))
    _, quantity = period(store, customer, hourly, T0, T0 + 3 * HOUR, UTC, as_of)
    assert quantity == total
