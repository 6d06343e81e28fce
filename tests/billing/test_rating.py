"""billing.rating in-process: asOf, levels over the whole period, intervals after asOf,
negative quantities, lines that are metered but not billed, customers without an offering."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from meter_gateway.billing import rating
from meter_gateway.catalog import Catalog, build
from meter_gateway.config import Charge, Customer, Dimension, Offering
from meter_gateway.store import Store
from tests.helpers import commit, open_store, rec, ts

UTC = ZoneInfo("UTC")
MAY = (ts("2026-05-01T00:00:00"), ts("2026-06-01T00:00:00"))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(tmp_path)
    yield s
    s.close()


def catalog(*dims: Dimension, charged: tuple[str, ...] = (), offering: bool = True) -> Catalog:
    charges = tuple(Charge(dimension=d, model="per_unit", unit_price=Decimal(1)) for d in charged)
    return build(
        {
            "dimensions": {d.id: d for d in dims},
            "offerings": {"o": Offering(id="o", name="O", currency="EUR", charges=charges)},
            "customers": {"c1": Customer(id="c1", name="C1", offering="o" if offering else None)},
        }
    )


def test_as_of_is_now_within_the_period_and_clamped_to_it() -> None:
    lo, hi = MAY
    assert rating.as_of(ts("2026-05-20T00:00:00"), lo, hi) == ts("2026-05-20T00:00:00")
    assert rating.as_of(ts("2026-07-01T00:00:00"), lo, hi) == hi  # a closed period
    assert rating.as_of(ts("2026-04-01T00:00:00"), lo, hi) == lo  # not begun: nothing measured


def test_a_level_is_integrated_to_as_of_over_the_whole_period(store: Store) -> None:
    level = Dimension(id="d1", name="L", aggregation="time_weighted_avg")
    commit(store, rec("2026-05-19T00:00:00", "50"), rec("2026-05-25T00:00:00", "70"))
    cat = catalog(level, charged=("d1",))
    now = ts("2026-05-20T00:00:00")
    r = rating.rate(store, cat, "c1", *MAY, rating.as_of(now, *MAY), UTC)
    [line] = r.lines
    # 50 GB for one day of a 31-day month; the 70 set on the 25th is after asOf
    assert line.quantity == line.usage == Decimal("1.612903225806451613")
    assert (line.amount, r.total, r.currency) == (Decimal("1.61"), Decimal("1.61"), "EUR")
    closed = rating.rate(store, cat, "c1", *MAY, MAY[1], UTC)
    # the whole month: 50 × 6 days + 70 × 7 days, over 31 days
    assert closed.lines[0].quantity == Decimal("25.483870967741935484")


def test_intervals_after_as_of_add_nothing(store: Store) -> None:
    hours = Dimension(
        id="d1", name="L", aggregation="time_weighted_avg", aggregation_interval="hour",
        rounding="ceil",
    )  # fmt: skip
    commit(store, rec("2026-05-20T10:00:00", "2"))
    now = ts("2026-05-20T11:30:00")
    [line] = rating.rate(store, catalog(hours), "c1", *MAY, now, UTC).lines
    # 10:00-11:00 at 2 → 2; 11:00-11:30 at 2 over the whole hour → 1 → ceil 1; later hours: 0
    assert line.quantity == 3
    assert line.amount is None  # metered, not billed


def test_a_negative_quantity_is_billed_as_zero_with_a_warning(store: Store) -> None:
    changes = Dimension(id="d1", name="S", aggregation="weighted_sum", unit_cost=Decimal(1))
    commit(store, rec("2026-05-01T00:00:00", "-2"))
    r = rating.rate(store, catalog(changes, charged=("d1",)), "c1", *MAY, MAY[1], UTC)
    [line] = r.lines
    assert (line.quantity, line.usage) == (Decimal(0), Decimal(-2))
    assert line.amount == line.cost == Decimal("0.00")
    [warning] = line.warnings
    assert "negative (-2)" in warning
    assert "billed as 0" in warning


def test_without_an_offering_nothing_is_billed_and_there_is_no_currency(store: Store) -> None:
    used = Dimension(id="d1", name="U", unit_cost=Decimal("0.125"))
    commit(store, rec("2026-05-02T00:00:00", "3"))
    r = rating.rate(store, catalog(used, offering=False), "c1", *MAY, MAY[1], UTC)
    assert (r.currency, r.total) == (None, None)
    [line] = r.lines
    assert (line.quantity, line.amount, line.cost) == (Decimal(3), None, Decimal("0.375"))  # exact
    assert r.margin == Decimal("-0.375")


def test_current_rates_every_customer_with_usage_in_the_current_month(store: Store) -> None:
    used = Dimension(id="d1", name="U")
    commit(store, rec("2026-05-02T00:00:00", "3"), rec("2026-05-02T00:00:00", "4", customer="gone"))
    [r] = rating.current(store, catalog(used, charged=("d1",)), ts("2026-05-10T00:00:00"), UTC)
    assert (r.customer, r.from_ns, r.to_ns, r.as_of_ns) == ("c1", *MAY, ts("2026-05-10T00:00:00"))
    assert r.lines[0].quantity == 3
