"""Usage windows for ``GET /v1/usage``, and the billing period.

Billing periods are calendar months in the billing time zone. Quantities and money for a
period come from ``billing.rating`` (SPEC §9); a window here follows the same rule: measured up
to ``as_of`` (now), a time-weighted level integrated to then over the whole window's length.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from zoneinfo import ZoneInfo

from meter_gateway.aggregation.engine import aggregate
from meter_gateway.aggregation.windows import Window, next_start, split, truncate
from meter_gateway.catalog import Catalog, version_at
from meter_gateway.config import Dimension
from meter_gateway.store.base import UsageReader

# A forecast to a window's end exists for these: the last level holds until it changes.
_LEVELS = ("weighted_sum", "time_weighted_avg")


@dataclass(frozen=True, slots=True)
class WindowValue:
    start: int
    end: int
    customer: str
    dimension: str
    value: Decimal | None
    # for a level aggregation in a window that ends after ``as_of``: the value if the level
    # held to the window's end (a forecast, never part of ``value``)
    projected: Decimal | None = None


def current_period(now_ns: int, tz: ZoneInfo) -> tuple[int, int]:
    start = truncate(now_ns, "month", tz)
    return start, next_start(start, "month", tz)


def windows(
    store: UsageReader,
    catalog: Catalog,
    customer: str | None,
    dimension: str | None,
    from_ns: int,
    to_ns: int,
    window: Window,
    tz: ZoneInfo,
    as_of: int,
) -> list[WindowValue]:
    """Every window of every matching (customer, dimension) pair, empty windows included,
    measured up to ``as_of``."""
    spans = split(from_ns, to_ns, window, tz)
    if customer is not None and dimension is not None:
        pairs = [(customer, dimension)]
    else:
        pairs = store.pairs(customer, dimension, to_ns)
    out = []
    for c, d in pairs:
        dim = catalog.dimensions.get(d)
        if dim is None:
            continue
        values = _by_version(store, c, dim, spans, as_of)
        projected: list[Decimal | None] = [None] * len(spans)
        ahead = [i for i, (_, e) in enumerate(spans) if e > as_of]
        if ahead and dim.aggregation in _LEVELS:
            # the windows from the one holding as_of on are contiguous: one query for them
            forecast = _by_version(store, c, dim, spans[ahead[0] :], None)
            projected[ahead[0] :] = forecast
        for (s, e), v, p in zip(spans, values, projected, strict=True):
            out.append(WindowValue(s, e, c, d, v, p))
    return out


def _by_version(
    store: UsageReader,
    customer: str,
    dim: Dimension,
    spans: list[tuple[int, int]],
    as_of: int | None,
) -> list[Decimal | None]:
    """Each window aggregated by the dimension's definition in effect at its start (a catalog
    change with ``effective_from`` rates only the windows from then on, as billing.rating)."""
    out: list[Decimal | None] = []
    i = 0
    while i < len(spans):
        version = version_at(dim, spans[i][0])
        j = i + 1
        while j < len(spans) and version_at(dim, spans[j][0]) is version:
            j += 1
        out += aggregate(store, customer, version, spans[i:j], as_of)
        i = j
    return out
