"""Tax on an invoice: which rate applies, and the tax of its lines, rounded once.

A customer's rate (``customers[].billing_details.tax_rate``) wins over its offering's
(``offerings[].tax_rate``); both name an entry of ``billing.tax_rates``. Each line's tax is
exact (an exclusive rate adds ``amount × p/100``, an inclusive one holds ``amount × p/(100+p)``
of the amount); their sum is rounded ONCE per invoice, half-up to the currency's minor unit,
so an invoice of many small lines is not off by a cent per line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from meter_gateway import pricing
from meter_gateway.config import Customer, Offering, TaxRate
from meter_gateway.decimals import EXACT, ZERO, fmt

__all__ = ["Taxation", "apply", "rate_for"]

_HUNDRED = Decimal(100)


def rate_for(
    customer: Customer, offering: Offering, rates: Mapping[str, TaxRate]
) -> TaxRate | None:
    """The rate an invoice of ``customer`` on ``offering`` carries, or None (no tax).

    ``ValueError`` names a rate id that ``billing.tax_rates`` does not define."""
    details = customer.billing_details
    name = details.tax_rate if details is not None and details.tax_rate else offering.tax_rate
    if name is None:
        return None
    if name not in rates:
        raise ValueError(f"tax rate {name!r} is not in billing.tax_rates")
    return rates[name]


@dataclass(frozen=True, slots=True)
class Taxation:
    """An invoice's money after tax. ``subtotal`` is the sum of the rounded lines as they are
    priced; ``total`` adds an exclusive tax (an inclusive one is already in the lines)."""

    subtotal: Decimal
    exact_tax: Decimal
    tax: Decimal
    total: Decimal
    rate: TaxRate | None

    def taxes_json(self) -> list[dict[str, Any]]:
        """The document's ``taxes``: one entry per rate applied (none without a rate)."""
        if self.rate is None:
            return []
        r = self.rate
        return [
            {
                "id": r.id,
                "name": r.name,
                "percentage": fmt(r.percentage),
                "inclusive": r.inclusive,
                "taxableAmount": str(self.subtotal),
                "exactAmount": fmt(self.exact_tax),
                "amount": str(self.tax),
            }
        ]


def line_tax(amount: Decimal, rate: TaxRate) -> Decimal:
    """One line's exact tax (an inclusive rate's share may not terminate: it is then exact to
    the 120 digits of ``EXACT``, far past any minor unit)."""
    if rate.inclusive:
        return EXACT.divide(EXACT.multiply(amount, rate.percentage), _HUNDRED + rate.percentage)
    return EXACT.divide(EXACT.multiply(amount, rate.percentage), _HUNDRED)


def apply(amounts: Sequence[Decimal], rate: TaxRate | None, currency: str) -> Taxation:
    """Tax on lines of (already rounded) ``amounts``; the tax is rounded once, here."""
    subtotal = pricing.round_money(sum(amounts, ZERO), currency)
    if rate is None:
        return Taxation(subtotal, ZERO, pricing.round_money(ZERO, currency), subtotal, None)
    # Σ per line, then one rounding. For one rate this equals the tax of the sum, which is how
    # it is computed for an inclusive rate: one division instead of one per line.
    if rate.inclusive:
        exact = line_tax(sum(amounts, ZERO), rate)
    else:
        exact = sum((line_tax(a, rate) for a in amounts), ZERO)
    tax = pricing.round_money(exact, currency)
    total = subtotal if rate.inclusive else pricing.round_money(subtotal + tax, currency)
    return Taxation(subtotal, exact, tax, total, rate)
