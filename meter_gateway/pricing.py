"""Prices a billable quantity under one charge of an offering (SPEC §3, contract).

Pure functions over exact decimals: ``price`` never rounds, and ``round_money`` is the one
place where money is rounded (half-up to the currency's minor unit).
"""

from __future__ import annotations

import decimal
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from types import MappingProxyType
from typing import Literal, assert_never, get_args

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

# ISO 4217 list one (2026-01-01): the number of digits after the decimal point. Codes whose minor
# unit is "N.A." (precious metals, bond-market units, XDR, XSU, XUA, XTS, XXX) are left out.
CURRENCY_MINOR_UNITS: Mapping[str, int] = MappingProxyType({
    "AED": 2, "AFN": 2, "ALL": 2, "AMD": 2, "AOA": 2, "ARS": 2, "AUD": 2, "AWG": 2, "AZN": 2,
    "BAM": 2, "BBD": 2, "BDT": 2, "BHD": 3, "BIF": 0, "BMD": 2, "BND": 2, "BOB": 2, "BOV": 2,
    "BRL": 2, "BSD": 2, "BTN": 2, "BWP": 2, "BYN": 2, "BZD": 2,
    "CAD": 2, "CDF": 2, "CHE": 2, "CHF": 2, "CHW": 2, "CLF": 4, "CLP": 0, "CNY": 2, "COP": 2,
    "COU": 2, "CRC": 2, "CUP": 2, "CVE": 2, "CZK": 2,
    "DJF": 0, "DKK": 2, "DOP": 2, "DZD": 2,
    "EGP": 2, "ERN": 2, "ETB": 2, "EUR": 2,
    "FJD": 2, "FKP": 2,
    "GBP": 2, "GEL": 2, "GHS": 2, "GIP": 2, "GMD": 2, "GNF": 0, "GTQ": 2, "GYD": 2,
    "HKD": 2, "HNL": 2, "HTG": 2, "HUF": 2,
    "IDR": 2, "ILS": 2, "INR": 2, "IQD": 3, "IRR": 2, "ISK": 0,
    "JMD": 2, "JOD": 3, "JPY": 0,
    "KES": 2, "KGS": 2, "KHR": 2, "KMF": 0, "KPW": 2, "KRW": 0, "KWD": 3, "KYD": 2, "KZT": 2,
    "LAK": 2, "LBP": 2, "LKR": 2, "LRD": 2, "LSL": 2, "LYD": 3,
    "MAD": 2, "MDL": 2, "MGA": 2, "MKD": 2, "MMK": 2, "MNT": 2, "MOP": 2, "MRU": 2, "MUR": 2,
    "MVR": 2, "MWK": 2, "MXN": 2, "MXV": 2, "MYR": 2, "MZN": 2,
    "NAD": 2, "NGN": 2, "NIO": 2, "NOK": 2, "NPR": 2, "NZD": 2,
    "OMR": 3,
    "PAB": 2, "PEN": 2, "PGK": 2, "PHP": 2, "PKR": 2, "PLN": 2, "PYG": 0,
    "QAR": 2,
    "RON": 2, "RSD": 2, "RUB": 2, "RWF": 0,
    "SAR": 2, "SBD": 2, "SCR": 2, "SDG": 2, "SEK": 2, "SGD": 2, "SHP": 2, "SLE": 2, "SOS": 2,
    "SRD": 2, "SSP": 2, "STN": 2, "SVC": 2, "SYP": 2, "SZL": 2,
    "THB": 2, "TJS": 2, "TMT": 2, "TND": 3, "TOP": 2, "TRY": 2, "TTD": 2, "TWD": 2, "TZS": 2,
    "UAH": 2, "UGX": 0, "USD": 2, "USN": 2, "UYI": 0, "UYU": 2, "UYW": 4, "UZS": 2,
    "VED": 2, "VES": 2, "VND": 0, "VUV": 0,
    "WST": 2,
    "XAD": 2, "XAF": 0, "XCD": 2, "XCG": 2, "XOF": 0, "XPF": 0,
    "YER": 2,
    "ZAR": 2, "ZMW": 2, "ZWG": 2,
    # Withdrawn recently; kept so offerings and invoices written in them still round.
    "ANG": 2, "BGN": 2, "CUC": 2, "HRK": 2, "SLL": 2, "ZWL": 2,
})  # fmt: skip


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


def minor_unit(currency: str) -> int:
    """Digits after the decimal point of an ISO 4217 currency ("USD" → 2, "JPY" → 0)."""
    try:
        return CURRENCY_MINOR_UNITS[currency]
    except KeyError:
        hint = ""
        if isinstance(currency, str) and currency.upper() in CURRENCY_MINOR_UNITS:
            hint = f" (currency codes are upper case: {currency.upper()!r})"
        raise ValueError(
            f"unknown currency {currency!r}: expected an ISO 4217 code such as 'USD'{hint}"
        ) from None


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
