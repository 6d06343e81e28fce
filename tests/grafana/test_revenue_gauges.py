"""The period revenue gauges hold every rated line (issue 16 item 8): usage lines per
dimension, the recurring fee as ``fee/<offering>`` and the credit line as ``credits/<unit>``
(money only: no usage series), so a customer's revenue summed over its rows — what the margin
dashboard's per-customer panels show — is the rating's total, which is the draft invoice's
total without its manual items."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest

from meter_gateway.billing import invoices, rating
from meter_gateway.catalog import Catalog, build
from meter_gateway.clock import FixedClock
from meter_gateway.config import Charge, CreditUnit, Customer, Dimension, Fee, Offering
from meter_gateway.model import Batch, Source, UsageRecord
from meter_gateway.service import Gateway
from meter_gateway.store import Store
from meter_gateway.telemetry import PeriodUsageCollector
from meter_gateway.usage import current_period
from tests.helpers import open_store, ts

UTC_ZONE = ZoneInfo("UTC")
NOW = ts("2026-05-20T00:00:00")


def catalog() -> Catalog:
    dims = {
        "data": Dimension(id="data", name="Data", unit="gigabyte", price=Decimal("0.08"),
                          unit_cost=Decimal("0.02")),
        "queries": Dimension(id="queries", name="Queries", unit="query",
                             unit_cost=Decimal("0.1")),
    }  # fmt: skip
    suite = Offering(
        id="suite", name="Suite", currency="USD",
        fee=Fee(amount=Decimal("20"), timing="advance"),
        credit=CreditUnit(unit="credit", unit_price=Decimal("0.5")),
        charges=(Charge(dimension="data", model="per_unit"),
                 Charge(dimension="queries", model="per_unit", credits_per_unit=Decimal("2"))),
    )  # fmt: skip
    return build(
        {
            "dimensions": dims,
            "offerings": {"suite": suite},
            "customers": {
                "busy": Customer(id="busy", name="Busy", offering="suite"),
                "idle": Customer(id="idle", name="Idle", offering="suite"),  # a fee, no usage
            },
        }
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(tmp_path)
    records = [
        UsageRecord(ts("2026-05-10T00:00:00"), "busy", dim, Decimal(v), f"r{i}", {},
                    Source.REST, None, None)
        for i, (dim, v) in enumerate((("data", "12.5"), ("queries", "3")))
    ]  # fmt: skip
    s.commit([Batch(Source.REST, records)], NOW)
    yield s
    s.close()


def gauges(store: Store, cat: Catalog) -> dict[str, dict[tuple[str, str], Decimal]]:
    gw = SimpleNamespace(
        store=store, catalog=SimpleNamespace(current=cat), clock=FixedClock(NOW), tz=UTC_ZONE
    )
    collector = PeriodUsageCollector(lambda: Gateway._period_gauges(gw))  # type: ignore[arg-type]
    collector.refresh()
    out: dict[str, dict[tuple[str, str], Decimal]] = {}
    for f in collector.collect():
        for s in f.samples:
            if "customer" in s.labels:
                key = (s.labels["customer"], s.labels["dimension"])
                out.setdefault(f.name, {})[key] = Decimal(str(s.value))
    return out


def test_revenue_per_customer_is_the_rating_total_with_fee_and_credits(store: Store) -> None:
    cat = catalog()
    g = gauges(store, cat)
    revenue = g["meter_gateway_period_revenue"]
    assert revenue == {
        ("busy", "data"): Decimal("1"),  # 12.5 × 0.08
        ("busy", "queries"): Decimal("0"),  # priced in credits, on the credit line
        ("busy", "credits/credit"): Decimal("3"),  # 3 × 2 credits × 0.5
        ("busy", "fee/suite"): Decimal("20"),  # June's fee, billed in advance on May's invoice
        ("idle", "data"): Decimal("0"),
        ("idle", "queries"): Decimal("0"),
        ("idle", "credits/credit"): Decimal("0"),
        ("idle", "fee/suite"): Decimal("20"),
    }
    # the pseudo-dimensions have money, no usage series
    assert {d for _, d in g["meter_gateway_period_usage"]} == {"data", "queries"}
    assert {d for _, d in g["meter_gateway_period_billable_quantity"]} == {"data", "queries"}
    margin, cost = g["meter_gateway_period_margin"], g["meter_gateway_period_cost"]
    assert cost["busy", "fee/suite"] == cost["busy", "credits/credit"] == 0
    start, end = current_period(NOW, UTC_ZONE)
    for customer in ("busy", "idle"):
        rated = rating.rate(store, cat, customer, start, end, NOW, UTC_ZONE)

        def total(family: dict[tuple[str, str], Decimal], who: str = customer) -> Decimal:
            return sum((v for (c, _), v in family.items() if c == who), Decimal(0))

        assert total(revenue) == rated.revenue == rated.total
        assert total(cost) == rated.cost
        assert total(margin) == rated.margin
        # the draft invoice: the same total, then the manual items on top (not period revenue)
        item = invoices.Item("Onboarding", Decimal("1"), Decimal("500"))
        doc = invoices.compute(store, cat, UTC_ZONE, "inv", customer, start, end, start, NOW)
        with_item = invoices.compute(
            store, cat, UTC_ZONE, "inv", customer, start, end, start, NOW, [item]
        )
        assert Decimal(doc["total"]) == total(revenue)
        assert Decimal(with_item["total"]) == total(revenue) + 500
