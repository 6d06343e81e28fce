"""Mapping rules in-process: which rule maps an observation (source, metric, attributes; the
first that matches), where the customer comes from (point attributes, then resource ones), how
the value is scaled (exactly), and why an observation is left unmapped. Aliases are resolved
after mapping, by the validator, so those cases run through it."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meter_gateway.catalog import build
from meter_gateway.clock import FixedClock
from meter_gateway.config import Customer, Dimension, IngestConfig, Rule
from meter_gateway.model import Observation, ObservationKind, Reason, Source
from meter_gateway.pipeline.mapping import Mapped, Mapper, Unmapped
from meter_gateway.pipeline.validate import Validator

NOW = 1_780_000_000 * 10**9  # 2026-05-28T20:26:40Z
WHEN_NS = NOW - 60 * 10**9


def rule(**fields: Any) -> Rule:
    """A rule as the config file spells it (so scales are parsed as they would be there)."""
    return Rule.model_validate(fields)


def obs(
    name: str = "bytes",
    value: str | Decimal = "1",
    source: Source = Source.OTLP,
    resource: dict[str, str] | None = None,
    **attributes: str,
) -> Observation:
    return Observation(
        source,
        name,
        attributes,
        Decimal(value),
        ObservationKind.AMOUNT,
        WHEN_NS,
        resource_attributes=resource or {},
    )


def mapped(mapper: Mapper, o: Observation) -> Mapped:
    m = mapper.map(o)
    assert isinstance(m, Mapped), m
    return m


def unmapped(mapper: Mapper, o: Observation) -> Unmapped:
    m = mapper.map(o)
    assert isinstance(m, Unmapped), m
    assert m.reason is Reason.UNMAPPED
    return m


# --- which rule ------------------------------------------------------------------------------

STRICT = rule(
    match={"source": "otlp", "metric": "bytes", "attributes": {"region": "eu"}}, dimension="eu"
)


@pytest.mark.parametrize(
    ("observation", "maps"),
    [
        (obs(tenant="c1", region="eu"), True),
        (obs(tenant="c1", region="eu", extra="x"), True),  # other attributes do not matter
        (obs(source=Source.REMOTE_WRITE, tenant="c1", region="eu"), False),
        (obs(name="bytes_total", tenant="c1", region="eu"), False),  # the name, not a prefix
        (obs(tenant="c1", region="us"), False),
        (obs(tenant="c1"), False),  # a required attribute missing
        (obs(tenant="c1", resource={"region": "eu"}), True),  # ... or on the resource
        (obs(tenant="c1", region="us", resource={"region": "eu"}), False),  # the point's wins
    ],
)
def test_a_rule_matches_on_source_metric_and_every_attribute(
    observation: Observation, maps: bool
) -> None:
    m = Mapper([STRICT]).map(observation)
    assert isinstance(m, Mapped) is maps, m


def test_a_rule_without_conditions_matches_every_observation() -> None:
    mapper = Mapper([rule(dimension="all")])
    for source in (Source.OTLP, Source.REMOTE_WRITE, Source.VECTOR, Source.PROMETHEUS):
        assert mapped(mapper, obs("anything", source=source, tenant="c1")).dimension_id == "all"


def test_the_first_matching_rule_wins() -> None:
    mapper = Mapper(
        [
            rule(match={"metric": "bytes", "attributes": {"tier": "gold"}}, dimension="gold"),
            rule(match={"metric": "bytes"}, dimension="bytes"),
            rule(match={"metric": "bytes"}, dimension="never"),  # shadowed by the one above
            rule(dimension="rest"),
        ]
    )
    assert mapped(mapper, obs(tenant="c1", tier="gold")) == Mapped("gold", "c1", 0)
    assert mapped(mapper, obs(tenant="c1", tier="silver")) == Mapped("bytes", "c1", 1)
    assert mapped(mapper, obs("calls", tenant="c1", tier="gold")) == Mapped("rest", "c1", 3)


def test_a_matched_rule_decides_even_without_a_customer() -> None:
    """A rule that matches but finds no customer attribute leaves the observation unmapped,
    naming the attribute; it does not fall through to a later rule with another attribute."""
    mapper = Mapper(
        [
            rule(match={"metric": "bytes"}, dimension="d1", customer_attribute="account"),
            rule(dimension="d2"),
        ]
    )
    m = unmapped(mapper, obs(tenant="c1"))
    assert m.field == "account"
    assert m.error == (
        "rule 0 matched metric 'bytes' but the point has no 'account' attribute to name "
        "the customer"
    )


@pytest.mark.parametrize("rules", [[], [STRICT]], ids=["no rules", "none matches"])
def test_an_observation_no_rule_matches_is_unmapped_naming_source_and_metric(
    rules: list[Rule],
) -> None:
    m = unmapped(Mapper(rules), obs("calls", source=Source.REMOTE_WRITE, tenant="c1"))
    assert m.field == "name"
    assert m.error == "no mapping rule matches remote_write metric 'calls'"


# --- which customer --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("observation", "customer"),
    [
        (obs(tenant="point"), "point"),
        (obs(resource={"tenant": "resource"}), "resource"),
        (obs(tenant="point", resource={"tenant": "resource"}), "point"),
    ],
)
def test_the_customer_comes_from_point_attributes_then_resource_attributes(
    observation: Observation, customer: str
) -> None:
    assert mapped(Mapper([rule(dimension="d1")]), observation).customer_name == customer


def test_each_rule_names_its_own_customer_attribute() -> None:
    mapper = Mapper(
        [
            rule(match={"metric": "calls"}, dimension="d1", customer_attribute="service.namespace"),
            rule(dimension="d2"),  # "tenant", the default
        ]
    )
    o = obs("calls", tenant="by-tenant", resource={"service.namespace": "by-namespace"})
    assert mapped(mapper, o).customer_name == "by-namespace"
    assert mapped(mapper, obs("bytes", tenant="by-tenant")).customer_name == "by-tenant"


# --- the value -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "scale", "expected"),
    [
        ("1", "1e-9", "0.000000001"),  # one byte in GB
        ("1500000000", "1e-9", "1.5"),
        ("123456789", "1e-9", "0.123456789"),
        ("999999999999999999999e-18", "1e-9", "0.000000999999999999999999999"),
        ("3600", "0.000277777777777778", "1.0000000000000008"),  # exact, not rounded to 1
        ("2.5", "1", "2.5"),  # the default scale leaves the value alone
        # 39 significant digits: past the 28 of Python's default decimal context
        (
            "123456789012345678901",
            "0.123456789012345678",
            "15241578753238836639.202866665403139878",
        ),
    ],
)
def test_values_are_scaled_exactly(value: str, scale: str, expected: str) -> None:
    mapper = Mapper([rule(dimension="d1", scale=scale)])
    o = obs(value=value, tenant="c1")
    got = mapper.scale(mapped(mapper, o), o)
    assert got == Decimal(expected)
    assert Fraction(got) == Fraction(value) * Fraction(scale)


def test_the_scale_of_the_rule_that_matched_is_applied() -> None:
    mapper = Mapper(
        [
            rule(match={"metric": "bytes"}, dimension="gb", scale="1e-9"),
            rule(dimension="raw"),
        ]
    )
    b, c = obs("bytes", "2000000000", tenant="c1"), obs("calls", "2000000000", tenant="c1")
    assert mapper.scale(mapped(mapper, b), b) == 2
    assert mapper.scale(mapped(mapper, c), c) == 2_000_000_000


def decimal_text(digits: int, places: int, max_exponent: int = 0) -> st.SearchStrategy[str]:
    """Decimal text (``<digits>E<exponent>``) of up to ``digits`` significant digits and
    ``places`` decimal places: the grammar and bounds the config and the receivers accept
    (below 1e21, at most 18 places) when ``digits + max_exponent <= 21``."""
    return st.builds(
        lambda sign, mantissa, exponent: f"{sign}{mantissa}E{exponent}",
        st.sampled_from(["", "-"]),
        st.integers(0, 10**digits - 1),
        st.integers(-places, max_exponent),
    )


@given(value=decimal_text(21, 18), scale=decimal_text(18, 18, 2))
def test_scaling_is_the_exact_product(value: str, scale: str) -> None:
    """Any usage value × any scale the config accepts: the exact rational product, never
    rounded (the validator then refuses results past 18 places, it does not round them)."""
    mapper = Mapper([rule(dimension="d1", scale=scale)])
    o = obs(value=value, tenant="c1")
    assert Fraction(mapper.scale(mapped(mapper, o), o)) == Fraction(value) * Fraction(scale)


# --- through the validator: aliases, and what an unmapped observation answers -------------------


def validator(rules: list[Rule]) -> Validator:
    catalog = build(
        {
            "customers": {"c1": Customer(id="c1", name="C1", aliases=("acme", "acme-eu"))},
            "dimensions": {"gb": Dimension(id="gb", name="GB", unit="gigabyte")},
        }
    )
    return Validator(lambda: catalog, FixedClock(NOW), IngestConfig(), Mapper(rules))


def test_a_customer_attribute_may_name_the_customer_by_an_alias() -> None:
    v = validator([rule(match={"metric": "bytes"}, dimension="gb", scale="1e-9")])
    batch = v.observations(
        [
            obs(value="1000000000", tenant="acme"),
            obs(value="2000000000", resource={"tenant": "acme-eu"}),
            obs(value="3000000000", tenant="c1"),
        ],
        Source.OTLP,
    )
    assert batch.errors == []
    assert [(r.customer_id, r.dimension_id, r.value) for r in batch.records] == [
        ("c1", "gb", Decimal(1)),
        ("c1", "gb", Decimal(2)),
        ("c1", "gb", Decimal(3)),
    ]


def test_unmapped_observations_are_rejected_with_the_reason_beside_mapped_ones() -> None:
    v = validator([rule(match={"metric": "bytes"}, dimension="gb", scale="1e-9")])
    batch = v.observations(
        [obs("calls", tenant="c1"), obs(value="5", tenant="c1"), obs(tenant="nobody")],
        Source.OTLP,
    )
    assert [r.value for r in batch.records] == [Decimal("5e-9")]
    [calls, nobody] = batch.errors
    assert (calls.index, calls.reason, calls.field) == (0, Reason.UNMAPPED, "name")
    assert calls.error == "no mapping rule matches otlp metric 'calls'"
    assert orjson.loads(calls.raw or "")["name"] == "calls"  # the observation as received
    # mapped, but to no customer the catalog knows: a different reason
    assert (nobody.index, nobody.reason) == (2, Reason.UNKNOWN_CUSTOMER)
