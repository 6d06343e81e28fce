"""Tests for meter_gateway.pricing: the SPEC §3 pricing contract, money rounding, validation.

Every expected value is worked out by hand and written as a Decimal string; no floats anywhere.
"""

from __future__ import annotations

from decimal import Decimal as D

import pytest

from meter_gateway.pricing import (
    CURRENCY_MINOR_UNITS,
    Charge,
    PricedAmount,
    Tier,
    TierLine,
    line_amount,
    minor_unit,
    price,
    round_money,
    validate_charge,
)

# Three tiers used by both tiered models: units 0–10, above 10 up to 100, above 100.
TIERS = (
    Tier(up_to=D("10"), unit_price=D("1.00"), flat_fee=D("5")),
    Tier(up_to=D("100"), unit_price=D("0.50"), flat_fee=D("2")),
    Tier(up_to=None, unit_price=D("0.25"), flat_fee=D("1")),
)
GRADUATED = Charge(model="graduated", tiers=TIERS)
VOLUME = Charge(model="volume", tiers=TIERS)
PER_UNIT = Charge(model="per_unit", unit_price=D("0.08"))
PACKAGE = Charge(model="package", package_size=D("10"), package_price=D("50"))
PACKAGE_FREE = Charge(
    model="package", package_size=D("10"), package_price=D("50"), free_units=D("5")
)


def tier_line(
    index: int, up_to: str | None, units: str, unit_price: str, flat_fee: str, amount: str
) -> TierLine:
    """A breakdown line written with Decimal strings."""
    bound = None if up_to is None else D(up_to)
    return TierLine(index, bound, D(units), D(unit_price), D(flat_fee), D(amount))


def paths(errors: list[str]) -> list[str]:
    """The field each validation error is about (the text before the first colon)."""
    return [error.split(":", 1)[0] for error in errors]


# --- per_unit ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [
        ("0", "0"),
        ("1", "0.08"),
        ("10", "0.80"),
        ("12.5", "1.000"),
        ("0.000000000000000001", "0.00000000000000000008"),
    ],
)
def test_per_unit_is_quantity_times_unit_price(quantity: str, expected: str) -> None:
    result = price(PER_UNIT, D(quantity))
    assert result == PricedAmount(amount=D(expected), breakdown=())
    assert isinstance(result.amount, D)


def test_per_unit_ten_tenths_are_exactly_one() -> None:
    tenth = Charge(model="per_unit", unit_price=D("0.1"))
    assert price(tenth, D("10")).amount == D("1")
    total = sum((price(tenth, D("1")).amount for _ in range(10)), D(0))
    assert total == D("1")
    assert isinstance(total, D)


def test_negative_zero_quantity_prices_as_plain_zero() -> None:
    amount = price(PER_UNIT, D("-0")).amount
    assert amount == D("0")
    assert not amount.is_signed()


# --- graduated --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [
        # Only the first tier: its 5 flat fee is charged even at zero.
        ("0", "5"),
        ("1", "6"),  # 1 × 1.00 + 5
        ("10", "15"),  # exactly on the inclusive bound: still only tier 1
        ("10.5", "17.25"),  # 15 + 0.5 × 0.50 + 2 (tier 2 entered: its flat fee)
        ("10.001", "17.0005"),  # 15 + 0.001 × 0.50 + 2
        ("11", "17.5"),  # 15 + 1 × 0.50 + 2
        ("100", "62"),  # 15 + 90 × 0.50 + 2
        ("100.5", "63.125"),  # 62 + 0.5 × 0.25 + 1
        ("101", "63.25"),  # 62 + 1 × 0.25 + 1
        ("1000", "288"),  # 62 + 900 × 0.25 + 1
    ],
)
def test_graduated_prices_the_units_in_each_tier(quantity: str, expected: str) -> None:
    result = price(GRADUATED, D(quantity))
    assert result.amount == D(expected)
    assert result.amount == sum((line.amount for line in result.breakdown), D(0))


def test_graduated_breakdown_at_zero_has_only_the_first_tier() -> None:
    assert price(GRADUATED, D("0")).breakdown == (tier_line(0, "10", "0", "1.00", "5", "5"),)


def test_graduated_breakdown_on_a_bound_does_not_enter_the_next_tier() -> None:
    assert price(GRADUATED, D("10")).breakdown == (tier_line(0, "10", "10", "1.00", "5", "15"),)


def test_graduated_breakdown_just_past_a_bound() -> None:
    assert price(GRADUATED, D("10.5")).breakdown == (
        tier_line(0, "10", "10", "1.00", "5", "15"),
        tier_line(1, "100", "0.5", "0.50", "2", "2.25"),
    )


def test_graduated_breakdown_into_the_unbounded_tier() -> None:
    assert price(GRADUATED, D("150")).breakdown == (
        tier_line(0, "10", "10", "1.00", "5", "15"),
        tier_line(1, "100", "90", "0.50", "2", "47"),
        tier_line(2, None, "50", "0.25", "1", "13.5"),
    )


def test_graduated_spec_example_compute_time() -> None:
    # SPEC §6 example (compute-time): the first 100 hours at 0.096, the rest at 0.08.
    charge = Charge(
        model="graduated",
        tiers=(Tier(D("100"), D("0.096")), Tier(None, D("0.08"))),
    )
    assert price(charge, D("150")).amount == D("13.6")  # 100 × 0.096 + 50 × 0.08
    assert price(charge, D("100")).amount == D("9.6")
    assert price(charge, D("0")).amount == D("0")


def test_graduated_single_unbounded_tier_is_per_unit_plus_fee() -> None:
    charge = Charge(model="graduated", tiers=(Tier(None, D("0.3"), D("2")),))
    assert price(charge, D("0")).amount == D("2")
    assert price(charge, D("7")).amount == D("4.1")


# --- volume -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quantity", "tier", "expected"),
    [
        ("0", 0, "5"),  # first tier, flat fee at zero
        ("1", 0, "6"),  # 1 × 1.00 + 5
        ("10", 0, "15"),  # on the inclusive bound: still tier 1
        ("10.5", 1, "7.25"),  # all 10.5 × 0.50 + 2
        ("10.001", 1, "7.0005"),  # 10.001 × 0.50 + 2
        ("11", 1, "7.5"),  # 11 × 0.50 + 2
        ("100", 1, "52"),  # 100 × 0.50 + 2
        ("100.5", 2, "26.125"),  # 100.5 × 0.25 + 1
        ("101", 2, "26.25"),  # 101 × 0.25 + 1
    ],
)
def test_volume_prices_all_units_in_the_single_tier_reached(
    quantity: str, tier: int, expected: str
) -> None:
    result = price(VOLUME, D(quantity))
    assert result.amount == D(expected)
    (line,) = result.breakdown
    assert line.index == tier
    assert line.up_to == TIERS[tier].up_to
    assert line.units == D(quantity)
    assert line.unit_price == TIERS[tier].unit_price
    assert line.flat_fee == TIERS[tier].flat_fee
    assert line.amount == D(expected)


# --- package ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [
        ("0", "0"),
        ("1", "50"),  # a started package is a whole package
        ("10", "50"),  # exactly one package
        ("10.5", "100"),
        ("11", "100"),
        ("20", "100"),
        ("21", "150"),
    ],
)
def test_package_rounds_packages_up(quantity: str, expected: str) -> None:
    result = price(PACKAGE, D(quantity))
    assert result == PricedAmount(amount=D(expected), breakdown=())


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [
        ("0", "0"),
        ("3", "0"),  # fewer than the free units: (3 − 5)⁺ = 0
        ("5", "0"),  # exactly the free units
        ("5.5", "50"),  # half a unit past them starts a package
        ("15", "50"),  # 10 billable: exactly one package
        ("16", "100"),  # 11 billable
    ],
)
def test_package_deducts_free_units_first(quantity: str, expected: str) -> None:
    assert price(PACKAGE_FREE, D(quantity)).amount == D(expected)


def test_package_with_fractional_size() -> None:
    charge = Charge(model="package", package_size=D("2.5"), package_price=D("3.10"))
    assert price(charge, D("5")).amount == D("6.20")  # 2 packages
    assert price(charge, D("5.01")).amount == D("9.30")  # 3 packages
    assert price(charge, D("0.000001")).amount == D("3.10")  # 1 package


# --- exactness --------------------------------------------------------------------------------


def test_amounts_beyond_28_digits_are_exact() -> None:
    # The default decimal context keeps 28 digits; these products need 39 and 45.
    quantity = D("999999999999999999999.999999999999999999")
    tiny = Charge(model="per_unit", unit_price=D("0.000000000000000001"))
    assert price(tiny, quantity).amount == D("999.999999999999999999999999999999999999")
    big = Charge(model="per_unit", unit_price=D("1.000001"))
    # (10²¹ − 10⁻¹⁸) × (1 + 10⁻⁶) = 10²¹ + 10¹⁵ − 10⁻¹⁸ − 10⁻²⁴
    assert price(big, quantity).amount == D("1000000999999999999999.999999999999999998999999")


def test_every_amount_is_a_decimal() -> None:
    for charge in (PER_UNIT, GRADUATED, VOLUME, PACKAGE, PACKAGE_FREE):
        result = price(charge, D("42.7"))
        assert isinstance(result.amount, D)
        for line in result.breakdown:
            for value in (line.units, line.unit_price, line.flat_fee, line.amount):
                assert isinstance(value, D)


# --- quantity checks --------------------------------------------------------------------------


def test_negative_quantity_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"quantity must not be negative, got -0\.1"):
        price(PER_UNIT, D("-0.1"))


@pytest.mark.parametrize("quantity", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_quantity_is_rejected(quantity: str) -> None:
    with pytest.raises(ValueError, match="quantity must be finite"):
        price(PER_UNIT, D(quantity))


def test_float_quantity_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"quantity must be a Decimal, got 0\.5 \(float\)"):
        price(PER_UNIT, 0.5)  # type: ignore[arg-type]


def test_pricing_an_invalid_charge_lists_every_error() -> None:
    charge = Charge(model="package", package_size=D("0"))
    with pytest.raises(ValueError, match="invalid package charge") as info:
        price(charge, D("1"))
    message = str(info.value)
    assert "package_size: must be greater than 0, got 0" in message
    assert "package_price: required by the package model" in message


# --- currency rounding ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "currency", "expected"),
    [
        ("0.005", "USD", "0.01"),  # half rounds up
        ("0.004", "USD", "0.00"),
        ("0.025", "USD", "0.03"),  # half-even would give 0.02
        ("1.005", "EUR", "1.01"),
        ("2.675", "GBP", "2.68"),  # a float would have made this 2.67
        ("5", "USD", "5.00"),  # always the full minor unit
        ("13.6", "USD", "13.60"),
        ("-0.005", "USD", "-0.01"),  # half away from zero for negatives
        ("-0.025", "USD", "-0.03"),
        ("-1.234", "USD", "-1.23"),
        ("1234.5", "JPY", "1235"),
        ("1234.49", "JPY", "1234"),
        ("-0.5", "KRW", "-1"),
        ("1.0005", "BHD", "1.001"),
        ("1.0004", "BHD", "1.000"),
        ("-2.0005", "KWD", "-2.001"),
        ("0.00005", "CLF", "0.0001"),  # four decimals
    ],
)
def test_round_money_half_up_to_the_minor_unit(amount: str, currency: str, expected: str) -> None:
    rounded = round_money(D(amount), currency)
    assert isinstance(rounded, D)
    assert str(rounded) == expected  # same value and same number of decimal places


@pytest.mark.parametrize(("amount", "currency"), [("-0.004", "USD"), ("-0.4", "JPY")])
def test_round_money_never_returns_negative_zero(amount: str, currency: str) -> None:
    rounded = round_money(D(amount), currency)
    assert rounded == D("0")
    assert not rounded.is_signed()


def test_round_money_keeps_large_amounts_exact() -> None:
    amount = D("123456789012345678901234567890.125")
    assert str(round_money(amount, "USD")) == "123456789012345678901234567890.13"


def test_round_money_rejects_non_finite_and_float_amounts() -> None:
    with pytest.raises(ValueError, match="amount must be finite"):
        round_money(D("NaN"), "USD")
    with pytest.raises(TypeError, match="amount must be a Decimal"):
        round_money(0.005, "USD")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("currency", "digits"),
    [
        ("USD", 2),
        ("EUR", 2),
        ("JPY", 0),
        ("KRW", 0),
        ("BHD", 3),
        ("KWD", 3),
        ("JOD", 3),
        ("OMR", 3),
        ("TND", 3),
        ("CLP", 0),
        ("ISK", 0),
        ("VND", 0),
        ("CLF", 4),
        ("XOF", 0),
    ],
)
def test_minor_unit(currency: str, digits: int) -> None:
    assert minor_unit(currency) == digits


def test_currency_table_is_read_only_and_well_formed() -> None:
    assert len(CURRENCY_MINOR_UNITS) > 150
    for code, digits in CURRENCY_MINOR_UNITS.items():
        assert len(code) == 3
        assert code.isupper()
        assert digits in (0, 2, 3, 4)
    with pytest.raises(TypeError):
        CURRENCY_MINOR_UNITS["XYZ"] = 2  # type: ignore[index]


def test_unknown_currency_is_named() -> None:
    with pytest.raises(ValueError, match="unknown currency 'XYZ'"):
        minor_unit("XYZ")
    with pytest.raises(ValueError, match="unknown currency 'XYZ'"):
        round_money(D("1"), "XYZ")


def test_lower_case_currency_gets_a_hint() -> None:
    with pytest.raises(ValueError, match=r"unknown currency 'usd'.*'USD'"):
        minor_unit("usd")


# --- line_amount ------------------------------------------------------------------------------


def test_line_amount_rounds_the_exact_price() -> None:
    # 10.001 × 0.50 + 2 = 7.0005 in tier 2 of the volume charge.
    assert str(line_amount(VOLUME, D("10.001"), "USD")) == "7.00"
    assert str(line_amount(VOLUME, D("10.001"), "BHD")) == "7.001"  # 7.0005 half-up
    assert str(line_amount(GRADUATED, D("100.5"), "USD")) == "63.13"  # 63.125 half-up
    assert str(line_amount(GRADUATED, D("100.5"), "JPY")) == "63"
    assert str(line_amount(PER_UNIT, D("0"), "USD")) == "0.00"


def test_line_amount_checks_the_currency() -> None:
    with pytest.raises(ValueError, match="unknown currency 'ABC'"):
        line_amount(PER_UNIT, D("1"), "ABC")


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "charge", [PER_UNIT, GRADUATED, VOLUME, PACKAGE, PACKAGE_FREE], ids=lambda c: c.model
)
def test_valid_charges_have_no_errors(charge: Charge) -> None:
    assert validate_charge(charge) == []


def test_tier_errors_are_all_collected() -> None:
    charge = Charge(
        model="graduated",
        tiers=(
            Tier(D("100"), D("-1")),  # negative price
            Tier(D("10"), D("1")),  # not ascending
            Tier(None, D("1")),  # unbounded before the end
            Tier(D("200"), D("1"), D("-2")),  # negative fee; last tier bounded
        ),
    )
    errors = validate_charge(charge)
    assert errors == [
        "tiers[0].unit_price: must not be negative, got -1",
        "tiers[1].up_to: tiers must ascend, but 10 is not greater than tiers[0].up_to (100)",
        "tiers[2].up_to: only the last tier may be unbounded (null)",
        "tiers[3].flat_fee: must not be negative, got -2",
        "tiers[3].up_to: the last tier must be unbounded (null), got 200",
    ]


def test_equal_bounds_do_not_ascend() -> None:
    charge = Charge(
        model="volume",
        tiers=(Tier(D("10"), D("1")), Tier(D("10"), D("1")), Tier(None, D("1"))),
    )
    assert paths(validate_charge(charge)) == ["tiers[1].up_to"]


def test_tier_bounds_must_be_positive() -> None:
    charge = Charge(model="graduated", tiers=(Tier(D("0"), D("1")), Tier(None, D("1"))))
    assert validate_charge(charge) == ["tiers[0].up_to: must be greater than 0, got 0"]


@pytest.mark.parametrize("model", ["graduated", "volume"])
def test_tiered_models_need_tiers(model: str) -> None:
    charge = Charge(model=model)  # type: ignore[arg-type]
    assert validate_charge(charge) == [f"tiers: required by the {model} model (at least one tier)"]


def test_per_unit_errors_are_all_collected() -> None:
    charge = Charge(model="per_unit", tiers=TIERS, package_price=D("5"), free_units=D("3"))
    assert validate_charge(charge) == [
        "unit_price: required by the per_unit model",
        "tiers: not used by the per_unit model (got 3 tiers)",
        "package_price: not used by the per_unit model (got Decimal('5'))",
        "free_units: not used by the per_unit model (got Decimal('3'))",
    ]


def test_package_errors_are_all_collected() -> None:
    charge = Charge(model="package", unit_price=D("1"), package_size=D("-10"), free_units=D("-1"))
    assert validate_charge(charge) == [
        "unit_price: not used by the package model (got Decimal('1'))",
        "package_size: must be greater than 0, got -10",
        "package_price: required by the package model",
        "free_units: must not be negative, got -1",
    ]


def test_graduated_ignores_nothing_silently() -> None:
    charge = Charge(model="graduated", tiers=TIERS, unit_price=D("0.08"), free_units=D("10"))
    assert paths(validate_charge(charge)) == ["unit_price", "free_units"]


def test_floats_and_non_finite_values_are_errors() -> None:
    charge = Charge(
        model="volume",
        tiers=(
            Tier(D("10"), 0.1),  # type: ignore[arg-type]
            Tier(None, D("NaN"), D("Infinity")),
        ),
    )
    assert validate_charge(charge) == [
        "tiers[0].unit_price: must be a Decimal, got 0.1 (float)",
        "tiers[1].unit_price: must be finite, got NaN",
        "tiers[1].flat_fee: must be finite, got Infinity",
    ]


def test_unknown_model_is_an_error() -> None:
    charge = Charge(model="tiered")  # type: ignore[arg-type]
    assert validate_charge(charge) == [
        "model: unknown pricing model 'tiered'; expected one of per_unit, graduated, volume, "
        "package"
    ]
    with pytest.raises(ValueError, match="unknown pricing model 'tiered'"):
        price(charge, D("1"))
