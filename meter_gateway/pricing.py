"""Prices a billable quantity under one charge of an offering (SPEC §3, contract).

Pure functions over exact decimals: ``price`` never rounds, and ``round_money`` is the one
place where money is rounded (half-up to the currency's minor unit).
"""

from __future__ import annotations

import decimal
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal, assert_never, get_args

from meter_gateway.currencies import minor_unit, minor_units

__all__ = [
    "CURRENCY_MINOR_UNITS",
    "PRICING_MODELS",
    "Charge",
    "PricedAmount",
    "PricingModel",
    "Tier",
    "TierLine",
    "line_amount",
    "minor_unit",
    "price",
    "round_money",
    "validate_charge",
]

PricingModel = Literal["per_unit", "graduated", "volume", "package"]
PRICING_MODELS: tuple[PricingModel, ...] = get_args(PricingModel)

_ZERO = Decimal(0)

# Products and sums of valid decimals are exact at unlimited precision; trapping Inexact turns
# any rounding that would still happen into an error instead of a silently wrong amount.
_EXACT = decimal.Context(
    prec=decimal.MAX_PREC,
    rounding=decimal.ROUND_HALF_EVEN,
    Emax=decimal.MAX_EMAX,
    Emin=decimal.MIN_EMIN,
    traps=[decimal.InvalidOperation, decimal.DivisionByZero, decimal.Overflow, decimal.Inexact],
)
# Rounding money is inexact by design; only the rounding mode comes from the call.
_ROUNDING = _EXACT.copy()
_ROUNDING.traps[decimal.Inexact] = False

# ISO 4217 minor units come from Babel (meter_gateway.currencies), the one table of them.
CURRENCY_MINOR_UNITS: Mapping[str, int] = minor_units()


@dataclass(frozen=True, slots=True)
class Tier:
    """One tier of a graduated or volume charge; ``up_to`` is inclusive, ``None`` is unbounded."""

    up_to: Decimal | None
    unit_price: Decimal
    flat_fee: Decimal = _ZERO


@dataclass(frozen=True, slots=True)
class Charge:
    """How one dimension is priced: a model and the fields that model uses (see validate_charge).

    ``per_unit`` uses ``unit_price``; ``graduated`` and ``volume`` use ``tiers``; ``package``
    uses ``package_size``, ``package_price`` and ``free_units``.
    """

    model: PricingModel
    unit_price: Decimal | None = None
    tiers: tuple[Tier, ...] = ()
    package_size: Decimal | None = None
    package_price: Decimal | None = None
    free_units: Decimal = _ZERO


@dataclass(frozen=True, slots=True)
class TierLine:
    """What one tier contributed: ``units × unit_price + flat_fee = amount`` (exact)."""

    index: int  # position in Charge.tiers, from 0
    up_to: Decimal | None
    units: Decimal
    unit_price: Decimal
    flat_fee: Decimal
    amount: Decimal


@dataclass(frozen=True, slots=True)
class PricedAmount:
    """The exact, unrounded amount and, for tiered models, the tiers that make it up.

    ``breakdown`` lists every tier a graduated charge entered (the first always) or the one tier a
    volume charge used; it is empty for ``per_unit`` and ``package``.
    """

    amount: Decimal
    breakdown: tuple[TierLine, ...] = ()


def round_money(amount: Decimal, currency: str) -> Decimal:
    """Round an amount half-up (away from zero on a tie) to the currency's minor unit.

    The result always carries exactly the minor unit's decimal places ("5" USD → "5.00"), and a
    negative amount that rounds to zero comes back as plain zero, never "-0.00".
    """
    digits = minor_unit(currency)
    _require_decimal("amount", amount)
    with decimal.localcontext(_ROUNDING):
        rounded = amount.quantize(Decimal(1).scaleb(-digits), rounding=decimal.ROUND_HALF_UP)
    return rounded.copy_abs() if rounded.is_zero() else rounded


def validate_charge(charge: Charge) -> list[str]:
    """Every problem with a charge, each prefixed by the field it is about; empty when valid."""
    errors: list[str] = []
    model = charge.model
    if model not in PRICING_MODELS:
        expected = ", ".join(PRICING_MODELS)
        return [f"model: unknown pricing model {model!r}; expected one of {expected}"]

    def required(path: str, value: object, *, positive: bool = False) -> None:
        if value is None:
            errors.append(f"{path}: required by the {model} model")
        else:
            _check(errors, path, value, positive=positive)

    def unused(path: str, value: object) -> None:
        if value is not None and value != () and value != 0:
            shown = f"{len(value)} tiers" if isinstance(value, tuple) else repr(value)
            errors.append(f"{path}: not used by the {model} model (got {shown})")

    tiered = model in ("graduated", "volume")
    if model == "per_unit":
        required("unit_price", charge.unit_price)
    else:
        unused("unit_price", charge.unit_price)
    if tiered:
        _check_tiers(errors, charge.tiers, model)
    else:
        unused("tiers", charge.tiers)
    if model == "package":
        required("package_size", charge.package_size, positive=True)
        required("package_price", charge.package_price)
        _check(errors, "free_units", charge.free_units)
    else:
        unused("package_size", charge.package_size)
        unused("package_price", charge.package_price)
        # Free units apply to packages only (SPEC §3); silently ignoring them would overbill.
        unused("free_units", charge.free_units)
    return errors


def _check(errors: list[str], path: str, value: object, *, positive: bool = False) -> None:
    if not isinstance(value, Decimal):
        errors.append(f"{path}: must be a Decimal, got {value!r} ({type(value).__name__})")
    elif not value.is_finite():
        errors.append(f"{path}: must be finite, got {value}")
    elif positive and value <= 0:
        errors.append(f"{path}: must be greater than 0, got {value}")
    elif value < 0:
        errors.append(f"{path}: must not be negative, got {value}")


def _check_tiers(errors: list[str], tiers: tuple[Tier, ...], model: str) -> None:
    if not tiers:
        errors.append(f"tiers: required by the {model} model (at least one tier)")
        return
    last = len(tiers) - 1
    previous: Decimal | None = None  # the last finite bound seen, to check they ascend
    previous_index = 0
    for i, tier in enumerate(tiers):
        path = f"tiers[{i}]"
        _check(errors, f"{path}.unit_price", tier.unit_price)
        _check(errors, f"{path}.flat_fee", tier.flat_fee)
        if tier.up_to is None:
            if i != last:
                errors.append(f"{path}.up_to: only the last tier may be unbounded (null)")
            continue
        if i == last:
            errors.append(f"{path}.up_to: the last tier must be unbounded (null), got {tier.up_to}")
        before = len(errors)
        _check(errors, f"{path}.up_to", tier.up_to, positive=True)
        if len(errors) > before:
            continue
        if previous is not None and tier.up_to <= previous:
            errors.append(
                f"{path}.up_to: tiers must ascend, but {tier.up_to} is not greater than "
                f"tiers[{previous_index}].up_to ({previous})"
            )
        previous, previous_index = tier.up_to, i


def price(charge: Charge, quantity: Decimal) -> PricedAmount:
    """The exact amount for a billable quantity under a charge (SPEC §3); never rounded.

    Raises ``TypeError`` if the quantity is not a ``Decimal``, and ``ValueError`` if it is negative
    or not finite, or if the charge is invalid (the message lists every error).
    """
    _require_decimal("quantity", quantity)
    if quantity < 0:
        raise ValueError(f"quantity must not be negative, got {quantity}")
    errors = validate_charge(charge)
    if errors:
        raise ValueError(f"invalid {charge.model} charge: " + "; ".join(errors))
    quantity = quantity.copy_abs()  # -0 would otherwise price as "-0.00"
    with decimal.localcontext(_EXACT):
        match charge.model:
            case "per_unit":
                assert charge.unit_price is not None
                return PricedAmount(quantity * charge.unit_price)
            case "graduated":
                return _graduated(charge.tiers, quantity)
            case "volume":
                return _volume(charge.tiers, quantity)
            case "package":
                assert charge.package_size is not None
                assert charge.package_price is not None
                billable = max(quantity - charge.free_units, _ZERO)
                packages, remainder = divmod(billable, charge.package_size)
                if remainder:
                    packages += 1
                return PricedAmount(packages * charge.package_price)
            case _:
                assert_never(charge.model)


def line_amount(charge: Charge, quantity: Decimal, currency: str) -> Decimal:
    """An invoice line's amount: the exact price rounded to the currency's minor unit."""
    minor_unit(currency)  # an unknown currency fails before any pricing work
    return round_money(price(charge, quantity).amount, currency)


def _graduated(tiers: tuple[Tier, ...], quantity: Decimal) -> PricedAmount:
    lines: list[TierLine] = []
    lower = _ZERO  # exclusive lower bound of the current tier
    for i, tier in enumerate(tiers):
        # Bounds are inclusive: a quantity equal to the previous bound has not entered this tier.
        if i > 0 and quantity <= lower:
            break
        upper = quantity if tier.up_to is None else min(quantity, tier.up_to)
        units = upper - lower
        amount = units * tier.unit_price + tier.flat_fee
        lines.append(TierLine(i, tier.up_to, units, tier.unit_price, tier.flat_fee, amount))
        if tier.up_to is None:
            break
        lower = tier.up_to
    return PricedAmount(sum((line.amount for line in lines), _ZERO), tuple(lines))


def _volume(tiers: tuple[Tier, ...], quantity: Decimal) -> PricedAmount:
    for i, tier in enumerate(tiers):
        if tier.up_to is None or quantity <= tier.up_to:
            amount = quantity * tier.unit_price + tier.flat_fee
            line = TierLine(i, tier.up_to, quantity, tier.unit_price, tier.flat_fee, amount)
            return PricedAmount(amount, (line,))
    raise AssertionError("validated tiers end with an unbounded tier")


def _require_decimal(name: str, value: object) -> None:
    if not isinstance(value, Decimal):
        raise TypeError(f"{name} must be a Decimal, got {value!r} ({type(value).__name__})")
    if not value.is_finite():
        raise ValueError(f"{name} must be finite, got {value}")
