"""SPEC §9, one truth: every view of a customer's period shows the numbers of the one rating
path, measured to ``asOf = min(now, to)`` and never extrapolated, with negative quantities billed
as 0 and a warning.

The property test generates catalogs (every aggregation, interval, increment, rounding and
pricing model) and usage (out of order, before the period, after ``asOf``, negative
``weighted_sum`` changes) and checks, on the store of METER_TEST_STORE, that the quantity is the
one an independent oracle computes from the records and that usage-summary/margin (the rating),
the draft invoice, the month window, the ``meter_gateway_period_*`` gauges and both meter
measures agree with it exactly. Two HTTP tests check the served views: one in-process with a
fixed clock (exact equality of every answer), one against a gateway process on the real clock
(every answer exact at the ``asOf`` it carries).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any, get_args
from zoneinfo import ZoneInfo

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from meter_gateway import meters, pricing
from meter_gateway.aggregation.engine import divide
from meter_gateway.aggregation.windows import split
from meter_gateway.billing import invoices, rating
from meter_gateway.catalog import Catalog, build
from meter_gateway.clock import FixedClock
from meter_gateway.config import Aggregation, Charge, Customer, Dimension, Meter, Offering, Tier
from meter_gateway.decimals import EXACT, ZERO, fmt
from meter_gateway.model import Batch, Source, UsageRecord
from meter_gateway.pipeline.timestamps import parse_timestamp
from meter_gateway.service import Gateway
from meter_gateway.store import Store
from meter_gateway.telemetry import PeriodUsageCollector
from meter_gateway.usage import windows
from tests.billing.appserver import serve
from tests.gatewayproc import BASE_CONFIG
from tests.helpers import open_store, ts
from tests.scrape import metrics_computed_since

UTC_ZONE = ZoneInfo("UTC")
NS = 1_000_000_000
MAY = (ts("2026-05-01T00:00:00"), ts("2026-06-01T00:00:00"))
_ROUNDING = {"ceil": ROUND_CEILING, "floor": ROUND_FLOOR, "round": ROUND_HALF_UP}
_NOTHING_IS_NONE = ("min", "max", "avg", "last")


# --- the oracle: SPEC §2 and §9 from the records, written out plainly -------------------------


@dataclass(frozen=True)
class Rec:
    t: int
    value: Decimal
    unique: str | None


def _interval_value(recs: Sequence[Rec], aggregation: str, s: int, e: int, as_of: int) -> Any:
    """One interval's aggregate measured to ``as_of``: a level's integral stops there and is
    divided by the whole interval."""
    if s >= as_of:
        return None if aggregation in _NOTHING_IS_NONE else ZERO
    m = min(e, as_of)
    inside = sorted((r for r in recs if s <= r.t < m), key=lambda r: r.t)
    values = [r.value for r in inside]
    if aggregation == "weighted_sum":
        level = sum((r.value for r in recs if r.t < s), ZERO)
        integral = EXACT.multiply(level, m - s)
        for r in inside:
            integral += EXACT.multiply(r.value, m - r.t)
        return divide(integral, e - s)
    if aggregation == "time_weighted_avg":
        before = [r for r in recs if r.t < s]
        level = max(before, key=lambda r: r.t).value if before else ZERO
        integral, t = ZERO, s
        for r in inside:
            integral += EXACT.multiply(level, r.t - t)
            level, t = r.value, r.t
        integral += EXACT.multiply(level, m - t)
        return divide(integral, e - s)
    if aggregation == "sum":
        return sum(values, ZERO)
    if aggregation == "count":
        return Decimal(len(values))
    if aggregation == "unique_count":
        return Decimal(len({r.unique for r in inside if r.unique is not None}))
    if not values:
        return None
    if aggregation == "min":
        return min(values)
    if aggregation == "max":
        return max(values)
    if aggregation == "avg":
        return divide(sum(values, ZERO), len(values))
    return inside[-1].value  # last


def oracle_quantity(recs: Sequence[Rec], dim: Dimension, p: tuple[int, int], as_of: int) -> Any:
    """Σ over the period's intervals of rounding(aggregate / increment), unclamped."""
    spans = (
        [p] if dim.aggregation_interval == "none" else split(*p, dim.aggregation_interval, UTC_ZONE)
    )
    total = ZERO
    for s, e in spans:
        v = _interval_value(recs, dim.aggregation, s, e, as_of)
        if v is None:
            continue
        q = divide(v, dim.usage_increment)
        if dim.rounding != "none":
            q = q.quantize(Decimal(1), rounding=_ROUNDING[dim.rounding], context=EXACT)
        total += q
    return total


# --- generated catalogs and usage ----------------------------------------------------------

AGGREGATIONS: tuple[Aggregation, ...] = get_args(Aggregation)
money = st.decimals(min_value=0, max_value=5, places=3, allow_nan=False, allow_infinity=False)


@st.composite
def charges(draw: st.DrawFn, dim_id: str) -> Charge | None:
    if draw(st.integers(0, 4)) == 0:
        return None  # metered, not billed
    model = draw(st.sampled_from(pricing.PRICING_MODELS))
    if model == "per_unit":
        return Charge(dimension=dim_id, model="per_unit", unit_price=draw(money))
    if model == "package":
        size = draw(st.integers(1, 50))
        return Charge(
            dimension=dim_id,
            model="package",
            package_size=Decimal(size),
            package_price=draw(money),
            free_units=Decimal(draw(st.integers(0, 20))),
        )
    bounds = sorted(draw(st.sets(st.integers(1, 500), max_size=3)))
    tiers = [Tier(up_to=Decimal(b), unit_price=draw(money), flat_fee=draw(money)) for b in bounds]
    tiers.append(Tier(up_to=None, unit_price=draw(money), flat_fee=draw(money)))
    return Charge(dimension=dim_id, model=model, tiers=tuple(tiers))


@dataclass(frozen=True)
class Case:
    dim: Dimension
    charge: Charge | None
    currency: str
    now: int
    recs: tuple[Rec, ...]
    gone: frozenset[int] = frozenset()  # records cancelled after the commit (SPEC 11)

    @property
    def kept(self) -> tuple[Rec, ...]:
        return tuple(r for i, r in enumerate(self.recs) if i not in self.gone)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    aggregation = draw(st.sampled_from(AGGREGATIONS))
    dim = Dimension(
        id="d",
        name="D",
        aggregation=aggregation,
        aggregation_interval=draw(st.sampled_from(["none", "hour", "day", "month"])),
        usage_increment=draw(
            st.sampled_from([Decimal(1), Decimal(1), Decimal("0.5"), Decimal(60)])
        ),
        rounding=draw(st.sampled_from(["none", "ceil", "floor", "round"])),
        unit_cost=draw(st.one_of(st.none(), money)),
        unique_key="k" if aggregation == "unique_count" else None,
    )
    lo = -1000 if aggregation == "weighted_sum" else 0
    value = st.decimals(
        min_value=lo, max_value=1000, places=2, allow_nan=False, allow_infinity=False
    )
    start, end = MAY[0] // NS, MAY[1] // NS
    now = draw(st.integers(start + 1, end - 1)) * NS
    # before the period (carried levels), in it (out of order), and after asOf (not yet measured)
    times = draw(st.lists(st.integers(start - 3 * 86400, end + 3600), max_size=25, unique=True))
    recs = tuple(
        Rec(
            t * NS + draw(st.integers(0, 999)) * 1_000_000,
            draw(value),
            draw(st.sampled_from("abcd")),
        )
        for t in times
    )
    currency = draw(st.sampled_from(["USD", "JPY", "BHD"]))
    gone = frozenset(draw(st.sets(st.integers(0, len(recs) - 1)))) if recs else frozenset()
    return Case(dim, draw(charges("d")), currency, now, recs, gone)


# --- the views -----------------------------------------------------------------------------

_customers = itertools.count()


def _catalog(case: Case, customer: str, dim_id: str) -> Catalog:
    dim = case.dim.model_copy(update={"id": dim_id})
    charge = None if case.charge is None else case.charge.model_copy(update={"dimension": dim_id})
    offering = Offering(
        id="o", name="O", currency=case.currency, charges=() if charge is None else (charge,)
    )
    metered = {
        "billed": Meter(id="billed", customer=customer, dimension=dim_id,
                        reset="billing_period", measure="billable_quantity"),
        "used": Meter(id="used", customer=customer, dimension=dim_id,
                      reset="billing_period", measure="usage"),
    }  # fmt: skip
    return build(
        {
            "dimensions": {dim_id: dim},
            "offerings": {"o": offering},
            "customers": {customer: Customer(id=customer, name=customer, offering="o")},
            "meters": metered,
        }
    )


def _gauges(store: Store, catalog: Catalog, now: int) -> dict[tuple[str, str], float]:
    """What /metrics shows: the service's period gauges collected by the telemetry collector."""
    gw = SimpleNamespace(
        store=store, catalog=SimpleNamespace(current=catalog), clock=FixedClock(now), tz=UTC_ZONE
    )
    collector = PeriodUsageCollector(lambda: Gateway._period_gauges(gw))  # type: ignore[arg-type]
    collector.refresh()  # what the background refresh does; a scrape reads its rows
    return {
        (f.name, s.labels["dimension"]): s.value
        for f in collector.collect()
        for s in f.samples
        if "dimension" in s.labels  # not the refresh's own time and duration
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    s = open_store(tmp_path_factory.mktemp("one_truth"))
    yield s
    s.close()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases())
def test_every_view_shows_the_one_rating(store: Store, case: Case) -> None:
    n = next(_customers)
    customer, dim_id = f"c{n}", f"d{n}"
    catalog = _catalog(case, customer, dim_id)
    dim = catalog.dimensions[dim_id]
    if case.recs:
        records = [
            UsageRecord(r.t, customer, dim_id, r.value, f"{customer}-{i}", {"k": r.unique},
                        Source.REST, None, r.unique)
            for i, r in enumerate(case.recs)
        ]  # fmt: skip
        store.commit([Batch(Source.REST, records)], case.now)
        # cancelled records leave every view exactly as if they had never been sent
        gone = [f"{customer}-{i}" for i in sorted(case.gone)]
        results = store.cancel_records(gone, None, case.now, {dim_id: "k"})
        assert {r.status for r in results} <= {"cancelled"}
    from_ns, to_ns = MAY
    as_of = rating.as_of(case.now, from_ns, to_ns)
    assert as_of == case.now

    rated = rating.rate(store, catalog, customer, from_ns, to_ns, as_of, UTC_ZONE)
    expected = oracle_quantity(case.kept, dim, MAY, as_of)
    readings = {r.meter.id: r.value for r in meters.readings(store, catalog, UTC_ZONE, case.now)}
    if not rated.lines:  # not charged, and no usage before asOf: nothing to show but zeros
        assert case.charge is None
        assert expected == 0
        assert readings == {"billed": 0, "used": 0}
        assert _gauges(store, catalog, case.now) == {}
        return
    [line] = rated.lines

    # the quantity is what SPEC §2/§9 say, computed from the records by the oracle
    assert line.quantity == max(expected, ZERO)
    assert bool(line.warnings) == (expected < 0)
    if case.charge is None:
        assert line.amount is None
    else:
        priced = pricing.price(rating.pricing_charge(case.charge, dim), line.quantity)
        assert line.amount == pricing.round_money(priced.amount, case.currency)
    assert rated.revenue == line.revenue
    assert rated.cost == pricing.round_money(line.quantity * (dim.unit_cost or ZERO), case.currency)

    # the month window over the period: the period's usage; and the quantity where comparable
    [window] = windows(store, catalog, customer, dim_id, from_ns, to_ns, "month", UTC_ZONE, as_of)
    assert window.value == line.usage
    comparable = (dim.aggregation_interval, dim.usage_increment, dim.rounding) == (
        "none", Decimal(1), "none"
    )  # fmt: skip
    if comparable and window.value is not None and window.value >= 0:
        assert window.value == line.quantity

    # the draft invoice
    if case.charge is not None:
        doc = invoices.compute(
            store, catalog, UTC_ZONE, "inv", customer, from_ns, to_ns, from_ns, case.now
        )
        [inv_line] = doc["lines"]
        assert (inv_line["quantity"], inv_line["amount"]) == (fmt(line.quantity), str(line.amount))
        assert doc["subtotal"] == doc["total"] == str(rated.total)
        assert parse_timestamp(doc["asOf"]) == as_of
        assert inv_line.get("warnings", []) == list(line.warnings)

    # the meters (billing_period reset, both measures)
    assert readings["billed"] == line.quantity
    assert readings["used"] == (line.usage if line.usage is not None else ZERO)

    # the gauges (floats on /metrics): there when the customer has usage before asOf
    gauges = _gauges(store, catalog, case.now)
    if (customer, dim_id) in store.pairs(customer, dim_id, as_of):
        assert gauges["meter_gateway_period_billable_quantity", dim_id] == float(line.quantity)
        assert gauges["meter_gateway_period_usage", dim_id] == float(line.usage or ZERO)
        assert gauges["meter_gateway_period_revenue", dim_id] == float(line.revenue)
        assert gauges["meter_gateway_period_cost", dim_id] == float(line.cost)
        assert gauges["meter_gateway_period_margin", dim_id] == float(line.margin)
    else:
        assert gauges == {}
        assert line.quantity == 0


# --- over HTTP -----------------------------------------------------------------------------

LEVEL_CONFIG: dict[str, Any] = {
    "auth": BASE_CONFIG["auth"],
    "dimensions": [
        {"id": "volume", "name": "Volume", "unit": "gigabyte", "aggregation": "time_weighted_avg",
         "price": "0.1", "unit_cost": "0.02"},
        {"id": "storage", "name": "Storage", "unit": "gigabyte", "aggregation": "weighted_sum",
         "price": "0.1"},
    ],
    "offerings": [{"id": "plan", "name": "Plan", "currency": "EUR", "charges": [
        {"dimension": "volume", "model": "per_unit"},
        {"dimension": "storage", "model": "per_unit"}]}],
    "customers": [{"id": "acme", "name": "Acme", "offering": "plan"},
                  {"id": "under", "name": "Under", "offering": "plan"}],
    "meters": [{"id": "acme-volume", "customer": "acme", "dimension": "volume",
                "reset": "billing_period", "measure": "billable_quantity"}],
}  # fmt: skip
MAY_BODY = {"from": "2026-05-01T00:00:00Z", "to": "2026-06-01T00:00:00Z"}


def _metric(text: str, name: str, customer: str, dimension: str) -> Decimal:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and (s.labels["customer"], s.labels["dimension"]) == (
                customer, dimension
            ):  # fmt: skip
                return Decimal(str(s.value))
    raise AssertionError(f"{name}{{customer={customer}, dimension={dimension}}} not exposed")


def _views(client: httpx.Client, customer: str, dim: str) -> dict[str, Any]:
    """quantity, amount and asOf of one dimension as each HTTP view shows it."""
    summary = client.get(f"/v1/customers/{customer}/usage-summary", params=MAY_BODY).json()
    margin = client.get(f"/v1/customers/{customer}/margin", params=MAY_BODY).json()
    draft = client.post(f"/v1/customers/{customer}/invoices", json=MAY_BODY).json()
    window = client.get(
        "/v1/usage",
        params={**MAY_BODY, "customerId": customer, "dimensionId": dim, "window": "month"},
    ).json()

    def pick(lines: list[dict[str, Any]]) -> dict[str, Any]:
        return next(ln for ln in lines if ln["dimensionId"] == dim)

    return {
        "summary": (pick(summary["dimensions"]), summary["asOf"]),
        "margin": (pick(margin["dimensions"]), margin["asOf"]),
        "draft": (pick(draft["lines"]), draft["asOf"], draft["id"]),
        "window": (window["data"][0], window["asOf"]),
    }


def test_every_http_view_agrees_at_a_fixed_now(tmp_path: Path) -> None:
    clock = FixedClock(ts("2026-05-20T00:00:00"))
    with serve(tmp_path, LEVEL_CONFIG, clock) as (gw, client):
        r = client.post("/v1/usage", json=[
            # 50 GB held for the 1 day before now, of a 31-day month
            {"timestamp": "2026-05-19T00:00:00Z", "customerId": "acme", "dimensionId": "volume",
             "recordValue": "50"},
            # a level driven below zero: -1 GB for 19 days
            {"timestamp": "2026-05-01T00:00:00Z", "customerId": "under",
             "dimensionId": "storage", "recordValue": "-1"},
        ])  # fmt: skip
        assert r.status_code == 200, r.text
        v = _views(client, "acme", "volume")
        q = "1.612903225806451613"  # 50 × 1/31, not 50 × 13/31 (extrapolated) nor 50 × 1/19
        assert v["summary"][0] == {
            "dimensionId": "volume", "unit": "gigabyte", "quantity": q, "amount": "0.16"
        }  # fmt: skip
        assert (v["margin"][0]["quantity"], v["margin"][0]["revenue"]) == (q, "0.16")
        assert (v["draft"][0]["quantity"], v["draft"][0]["amount"]) == (q, "0.16")
        assert v["window"][0]["value"] == q
        assert v["window"][0]["projected"] == "20.967741935483870968"  # held to the month's end
        assert {v[k][1] for k in v} == {"2026-05-20T00:00:00Z"}
        assert client.get("/v1/meters/acme-volume/state").json()["value"] == q
        gw.period_gauges.refresh()  # the scheduler does not run by itself here
        text = client.get("/metrics").text
        assert _metric(text, "meter_gateway_period_billable_quantity", "acme", "volume") == Decimal(
            str(float(Decimal(q)))
        )
        assert _metric(text, "meter_gateway_period_revenue", "acme", "volume") == Decimal("0.16")
        final = client.post(f"/v1/invoices/{v['draft'][2]}/finalize").json()
        assert (final["lines"][0]["quantity"], final["total"]) == (q, "0.16")

        # below zero: billed as 0 with a warning, in every view; the raw aggregate stays visible
        u = _views(client, "under", "storage")
        raw = "-0.612903225806451613"  # -1 × 19/31
        for name in ("summary", "margin", "draft"):
            line = u[name][0]
            assert line["quantity"] == "0", name
            assert [raw in w for w in line["warnings"]] == [True], name
        assert u["summary"][0]["amount"] == u["draft"][0]["amount"] == "0.00"
        assert u["window"][0]["value"] == raw
        gw.period_gauges.refresh()
        text = client.get("/metrics").text
        assert _metric(text, "meter_gateway_period_billable_quantity", "under", "storage") == 0


def test_views_of_a_running_gateway_follow_the_as_of_rule(client: httpx.Client) -> None:
    """The gateway process runs on the real clock: each answer is exact at the asOf it carries,
    and the gauges lie between the first and the last of them."""
    start = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    period = {
        "from": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "to": end.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    p0, p1 = parse_timestamp(period["from"]), parse_timestamp(period["to"])
    suffix = next(_customers)
    customer, dim = f"truth-{suffix}", f"level-{suffix}"
    r = client.post("/v1/dimensions", json={
        "id": dim, "name": "Level", "unit": "gigabyte", "aggregation": "time_weighted_avg",
        "price": "1"})  # fmt: skip
    assert r.status_code == 201, r.text
    r = client.post("/v1/offerings", json={
        "id": f"plan-{suffix}", "name": "P", "currency": "USD",
        "charges": [{"dimension": dim, "model": "per_unit"},
                    {"dimension": "storage", "model": "per_unit", "unit_price": "1"}]})  # fmt: skip
    assert r.status_code == 201, r.text
    r = client.post(
        "/v1/customers", json={"id": customer, "name": "T", "offering": f"plan-{suffix}"}
    )
    assert r.status_code == 201, r.text
    r = client.post("/v1/usage", json=[
        {"timestamp": period["from"], "customerId": customer, "dimensionId": dim,
         "recordValue": "50"},
        {"timestamp": period["from"], "customerId": customer, "dimensionId": "storage",
         "recordValue": "-3"},
    ])  # fmt: skip
    assert r.json()["accepted"] == 2, r.text

    def expected(level: str, as_of: str) -> Decimal:
        return divide(EXACT.multiply(Decimal(level), parse_timestamp(as_of) - p0), p1 - p0)

    committed = datetime.now(UTC)
    before = expected("50", committed.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    body = {**period}
    summary = client.get(f"/v1/customers/{customer}/usage-summary", params=body).json()
    margin = client.get(f"/v1/customers/{customer}/margin", params=body).json()
    draft = client.post(f"/v1/customers/{customer}/invoices", json=body).json()
    window = client.get("/v1/usage", params={
        **body, "customerId": customer, "dimensionId": dim, "window": "month"}).json()  # fmt: skip
    text = metrics_computed_since(client, committed.timestamp())
    after = expected("50", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))

    def line(lines: list[dict[str, Any]], d: str) -> dict[str, Any]:
        return next(ln for ln in lines if ln["dimensionId"] == d)

    for doc, lines in ((summary, "dimensions"), (margin, "dimensions"), (draft, "lines")):
        q = expected("50", doc["asOf"])
        assert Decimal(line(doc[lines], dim)["quantity"]) == q
        under = line(doc[lines], "storage")
        assert under["quantity"] == "0"
        assert "negative" in under["warnings"][0]
    assert Decimal(window["data"][0]["value"]) == expected("50", window["asOf"])
    gauge = _metric(text, "meter_gateway_period_billable_quantity", customer, dim)
    assert float(before) <= gauge <= float(after)
    assert _metric(text, "meter_gateway_period_billable_quantity", customer, "storage") == 0
