"""How the plan parts of a rating read in JSON (SPEC 11), for invoices and usage-summary alike.

``usage_fields``: what a usage line adds when its charge includes free units (``included``,
``billedQuantity``); ``credit_line``: the one line of the offering's custom unit, with every
conversion that made it; ``fee_line``: a recurring fee of one cycle (``type: fee``), with its
cycle and, when prorated, the days. Decimals are exact strings; amounts are rounded once.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from meter_gateway import pricing
from meter_gateway.aggregation.engine import divide
from meter_gateway.billing.rating import CreditLine, FeeLine, Line, Rating
from meter_gateway.decimals import EXACT, ZERO, fmt
from meter_gateway.pipeline.timestamps import format_timestamp

__all__ = ["credit_line", "fee_line", "plan_lines", "usage_fields"]


def price_fields(
    charge: pricing.Charge, billed: Decimal, priced: pricing.PricedAmount
) -> dict[str, Any]:
    """How a line's price reads on an invoice: its unit price, its packages, or its tiers."""
    if charge.model == "per_unit":
        return {"unitPrice": fmt(charge.unit_price or ZERO)}
    if charge.model == "package":
        assert charge.package_size is not None
        assert charge.package_price is not None
        billable = max(EXACT.subtract(billed, charge.free_units), ZERO)
        packages, rest = divmod(billable, charge.package_size)
        return {
            "package": {
                "size": fmt(charge.package_size),
                "price": fmt(charge.package_price),
                "freeUnits": fmt(charge.free_units),
                "packages": fmt(packages + (1 if rest else 0)),
            }
        }
    return {
        "tiers": [
            {
                "tier": t.index + 1,
                "upTo": None if t.up_to is None else fmt(t.up_to),
                "units": fmt(t.units),
                "unitPrice": fmt(t.unit_price),
                "flatFee": fmt(t.flat_fee),
                "amount": fmt(t.amount),
            }
            for t in priced.breakdown
        ]
    }


def usage_fields(ln: Line) -> dict[str, Any]:
    """``included`` and ``billedQuantity`` (what was priced) for a charge with included units;
    nothing otherwise."""
    if ln.included is None:
        return {}
    return {"included": fmt(ln.included), "billedQuantity": fmt(ln.billed or ZERO)}


def credit_line(c: CreditLine) -> dict[str, Any]:
    """The credit line: its credits, how each charge converted into them, and their price."""
    line: dict[str, Any] = {
        "type": "usage",
        "name": c.unit.name,
        "quantity": fmt(c.credits),
        "unit": c.unit.unit,
        "model": c.charge.model,
    }
    if c.unit.included is not None:
        line["included"] = fmt(c.unit.included)
        line["billedQuantity"] = fmt(c.billed)
    line.update(price_fields(c.charge, c.billed, c.priced))
    line["exactAmount"] = fmt(c.priced.amount)
    line["amount"] = str(c.amount)
    line["conversions"] = [
        {
            "dimensionId": ln.dimension.id,
            "name": ln.dimension.name,
            "quantity": fmt(ln.quantity),
            "unit": ln.dimension.unit,
            **usage_fields(ln),
            "creditsPerUnit": fmt(ln.credits_per_unit or ZERO),
            "credits": fmt(ln.credits or ZERO),
            **({"warnings": list(ln.warnings)} if ln.warnings else {}),
        }
        for ln in c.conversions
    ]
    return line


def fee_line(f: FeeLine) -> dict[str, Any]:
    """A recurring fee of one cycle: quantity is the share of the cycle billed (1 unless
    prorated: days / days in the cycle)."""
    c = f.cycle
    share = divide(ZERO + c.days, c.cycle_days)
    return {
        "type": "fee",
        "description": f.fee.description or "Recurring fee",
        "quantity": fmt(share),
        "unitPrice": fmt(f.fee.amount),
        "exactAmount": fmt(c.exact),
        "amount": str(f.amount),
        "fee": {
            "interval": f.fee.interval,
            "timing": f.fee.timing,
            "cycleFrom": format_timestamp(c.cycle_from),
            "cycleTo": format_timestamp(c.cycle_to),
            "from": format_timestamp(c.from_ns),
            "to": format_timestamp(c.to_ns),
            "days": c.days,
            "cycleDays": c.cycle_days,
        },
    }


def plan_lines(r: Rating) -> list[dict[str, Any]]:
    """The lines a rating adds beside its usage lines: the credit line, then the fees."""
    out = [] if r.credit is None else [credit_line(r.credit)]
    return out + [fee_line(f) for f in r.fees]
