"""Mapping rules: observations → usage records (DigitalRoute's "guiding rules").

The first rule whose match holds decides the dimension and the customer attribute; the value is
scaled exactly. An observation no rule maps is rejected with reason ``unmapped``, never dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from meter_gateway.config import Rule
from meter_gateway.decimals import EXACT
from meter_gateway.model import Observation, Reason


@dataclass(frozen=True, slots=True)
class Mapped:
    dimension_id: str
    customer_name: str
    rule_index: int


@dataclass(frozen=True, slots=True)
class Unmapped:
    reason: Reason
    field: str | None
    error: str


class Mapper:
    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)

    def map(self, obs: Observation) -> Mapped | Unmapped:
        for i, rule in enumerate(self.rules):
            m = rule.match
            if m.source is not None and m.source != obs.source.value:
                continue
            if m.metric is not None and m.metric != obs.name:
                continue
            if any(_attr(obs, k) != v for k, v in m.attributes.items()):
                continue
            customer = _attr(obs, rule.customer_attribute)
            if customer is None:
                return Unmapped(
                    Reason.UNMAPPED,
                    rule.customer_attribute,
                    f"rule {i} matched metric {obs.name!r} but the point has no "
                    f"{rule.customer_attribute!r} attribute to name the customer",
                )
            return Mapped(rule.dimension, customer, i)
        return Unmapped(
            Reason.UNMAPPED,
            "name",
            f"no mapping rule matches {obs.source.value} metric {obs.name!r}",
        )

    def scale(self, mapped: Mapped, obs: Observation) -> Decimal:
        return EXACT.multiply(obs.value, self.rules[mapped.rule_index].scale)


def _attr(obs: Observation, key: str) -> str | None:
    # Point attributes first, then resource attributes.
    v = obs.attributes.get(key)
    return v if v is not None else obs.resource_attributes.get(key)
