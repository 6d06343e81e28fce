"""ISO 4217 currencies and their minor units, from Babel's CLDR data rather than a hand-kept table.

A code is a currency here when CLDR lists it as a territory's currency at any time since
2020-01-01 (so recently withdrawn codes such as HRK still round old invoices). CLDR's ``digits``
are display digits and differ from the ISO 4217 minor unit for a few currencies; for those the
ISO value is written out in ``_ISO_MINOR_UNIT_OVERRIDES``, because money rounds to the ISO unit.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import date
from types import MappingProxyType

from babel.core import get_global
from babel.numbers import get_currency_precision, get_territory_currencies

__all__ = ["is_currency", "minor_unit", "minor_units"]

# Withdrawn before this date: not accepted for new offerings or invoices.
_IN_USE_SINCE = date(2020, 1, 1)

# CLDR lists these for territory ZZ, but ISO 4217 gives them no minor unit ("N.A."): precious
# metals, bond-market units, SDR, the test code and "no currency". CNH is a market convention
# for offshore yuan, not an ISO 4217 code.
_NOT_MONEY = frozenset(
    {"XAG", "XAU", "XBA", "XBB", "XBC", "XBD", "XDR", "XPD", "XPT", "XSU", "XTS", "XUA", "XXX"}
    | {"CNH"}
)

# ISO 4217 list one (2026-01-01) where CLDR's display digits differ (CLDR shows these without
# decimals, or IQD with none instead of three). tests/test_currencies.py fails once CLDR agrees,
# so an entry never outlives its reason.
_ISO_MINOR_UNIT_OVERRIDES: Mapping[str, int] = MappingProxyType({
    "AFN": 2, "ALL": 2, "COP": 2, "HUF": 2, "IDR": 2, "IQD": 3, "IRR": 2, "KPW": 2, "LAK": 2,
    "LBP": 2, "MGA": 2, "MMK": 2, "SLL": 2, "SOS": 2, "SYP": 2, "YER": 2,
})  # fmt: skip


@functools.cache
def minor_units() -> Mapping[str, int]:
    """Every accepted currency code and its number of digits after the decimal point."""
    codes: set[str] = set()
    for territory in get_global("territory_currencies"):
        codes.update(
            get_territory_currencies(
                territory, _IN_USE_SINCE, date.max, tender=True, non_tender=True
            )
        )
    codes -= _NOT_MONEY
    return MappingProxyType(
        {
            code: _ISO_MINOR_UNIT_OVERRIDES.get(code, get_currency_precision(code))
            for code in sorted(codes)
        }
    )


def is_currency(code: object) -> bool:
    """Whether ``code`` is an accepted ISO 4217 currency code (upper case, e.g. ``"USD"``)."""
    return isinstance(code, str) and code in minor_units()


def minor_unit(currency: str) -> int:
    """Digits after the decimal point of an ISO 4217 currency ("USD" → 2, "JPY" → 0).

    ``ValueError`` names the code, with a hint when only its case is wrong.
    """
    units = minor_units()
    try:
        return units[currency]
    except (KeyError, TypeError):
        hint = ""
        if isinstance(currency, str) and currency.upper() in units:
            hint = f" (currency codes are upper case: {currency.upper()!r})"
        raise ValueError(
            f"unknown currency {currency!r}: expected an ISO 4217 code such as 'USD'{hint}"
        ) from None
