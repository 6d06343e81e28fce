"""ISO 4217 codes and minor units from Babel, with the ISO overrides where CLDR differs."""

from __future__ import annotations

import pytest
from babel.numbers import get_currency_precision

from meter_gateway.currencies import _ISO_MINOR_UNIT_OVERRIDES, is_currency, minor_unit, minor_units


@pytest.mark.parametrize(
    ("currency", "digits"),
    [
        ("USD", 2),
        ("EUR", 2),
        ("JPY", 0),
        ("KRW", 0),
        ("BHD", 3),
        ("KWD", 3),
        ("CLF", 4),
        ("UYW", 4),
        ("XOF", 0),
        # ISO 4217, not CLDR's display digits:
        ("IQD", 3),
        ("HUF", 2),
        ("IDR", 2),
        ("COP", 2),
        # withdrawn after 2020, still rounds old invoices:
        ("HRK", 2),
        ("BGN", 2),
    ],
)
def test_minor_unit(currency: str, digits: int) -> None:
    assert minor_unit(currency) == digits


@pytest.mark.parametrize("code", ["XYZ", "XAU", "XXX", "XTS", "CNH", "DEM", "usd", "", "US"])
def test_unknown_codes(code: str) -> None:
    assert not is_currency(code)
    with pytest.raises(ValueError, match=f"unknown currency {code!r}"):
        minor_unit(code)


def test_lower_case_gets_a_hint() -> None:
    with pytest.raises(ValueError, match=r"unknown currency 'usd'.*upper case: 'USD'"):
        minor_unit("usd")


def test_every_override_still_differs_from_cldr() -> None:
    """Once CLDR's digits agree with ISO 4217 the override has no reason left: drop it."""
    for code, digits in _ISO_MINOR_UNIT_OVERRIDES.items():
        assert get_currency_precision(code) != digits, code
        assert minor_units()[code] == digits


def test_the_table_is_read_only_and_well_formed() -> None:
    units = minor_units()
    assert len(units) > 150
    assert all(len(c) == 3 and c.isupper() and d in (0, 2, 3, 4) for c, d in units.items())
    with pytest.raises(TypeError):
        units["XYZ"] = 2  # type: ignore[index]
