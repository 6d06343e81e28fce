"""Exact decimal parsing and arithmetic for usage values and money.

Every usage value and amount is a ``Decimal``; arithmetic runs in ``EXACT``, a context wide
enough that sums of valid values never round. ``parse_value`` is the one gate a value passes on
its way in, from every receiver: JSON-number grammar, finite, |v| < 1e21, at most 18 places.
"""

from __future__ import annotations

import decimal
import re
from decimal import Decimal

# |value| < 1e21 with at most 18 decimal places is at most 39 significant digits; time-weighted
# sums multiply by nanoseconds (13 more) and add up millions of terms: 120 digits never round.
EXACT = decimal.Context(prec=120, rounding=decimal.ROUND_HALF_EVEN, Emax=10_000, Emin=-10_000)
MAX_ABS = Decimal(10) ** 21
MAX_PLACES = 18
ZERO = Decimal(0)
ONE = Decimal(1)
NS_PER_S = Decimal(1_000_000_000)
_MAX_INT = 10**21
_INF, _NEG_INF = float("inf"), float("-inf")

EXPECTED = 'a decimal number or decimal string such as 0.8 or "1.5e3"'


class DecimalError(ValueError):
    """A value that is not an acceptable usage decimal; the message says why."""


class Unrepresentable(str):
    """The text of a JSON number no ``Decimal`` or ``int`` can hold (an exponent past 10^18,
    an integer of thousands of digits). ``pipeline.decode`` keeps it as text so one such number
    fails only its own record; ``parse_value`` rejects it."""

    __slots__ = ()


# The common case, a plain decimal that is within bounds by its shape: no leading zeros (JSON),
# at most 21 integer digits (< 1e21) and at most 18 places.
_PLAIN = re.compile(r"-?(?:0|[1-9][0-9]{0,20})(?:\.[0-9]{1,18})?")
# RFC 8259's number grammar. Explicit ASCII classes: ``\d`` would take any Unicode digit.
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def parse_value(raw: object) -> Decimal:
    """Parse a usage value exactly, or raise ``DecimalError`` saying what was wrong.

    Accepted: a JSON number (``int``, a ``float`` that is the exact reading of its text — see
    ``pipeline.decode`` — or a ``Decimal``) or a string holding the same grammar
    (``-?(0|[1-9][0-9]*)(\\.[0-9]+)?([eE][+-]?[0-9]+)?``, ASCII digits only, no padding).
    The value must be finite, |v| < 1e21 and have at most 18 decimal places once trailing
    zeros are dropped. A value is never rounded: ``1e-400`` is rejected, not stored as 0.
    ``-0`` is 0.
    """
    if type(raw) is str:
        if _PLAIN.fullmatch(raw):
            value = Decimal(raw)
            return value if value else ZERO
        if not _NUMBER.fullmatch(raw):
            raise DecimalError(f"{_show(raw)} is not a decimal number: expected {EXPECTED}")
        return _checked(_exact(raw), raw)
    if isinstance(raw, float):
        # repr is the shortest text that reads back as this double: for a JSON number (see
        # pipeline.decode) it is what the sender wrote; for an OTLP double, its exact reading.
        # Plain and not ending in ".0", it is within bounds and has no trailing zero to drop.
        text = repr(raw)
        if text[-2:] != ".0" and _PLAIN.fullmatch(text):
            return Decimal(text)
        if raw != raw or raw in (_INF, _NEG_INF):
            raise DecimalError(f"{raw!r} is not finite: expected {EXPECTED}")
        return _checked(Decimal(text), raw)
    if isinstance(raw, bool):
        raise DecimalError(f"{raw!r} is a boolean: expected {EXPECTED}")
    if isinstance(raw, int):
        if not -_MAX_INT < raw < _MAX_INT:
            raise DecimalError(f"{_show(raw)} is too large: expected |value| < 1e21")
        return Decimal(raw)
    if isinstance(raw, Unrepresentable):
        raise DecimalError(f"{_show(raw)} is out of range: expected |value| < 1e21")
    if isinstance(raw, Decimal):
        return _checked(raw, raw)
    if isinstance(raw, str):
        raise DecimalError(f"{_show(raw)} is not a decimal number: expected {EXPECTED}")
    raise DecimalError(f"got {_show(raw)}: expected {EXPECTED}")


def check_value(value: Decimal) -> Decimal:
    """The bounds of ``parse_value`` for a value computed exactly (an observation after its
    mapping rule's scale): finite, |v| < 1e21, at most 18 places; never rounded."""
    return _checked(value, value)


def _exact(text: str) -> Decimal:
    try:
        return Decimal(text)  # exact: the constructor never rounds
    except decimal.InvalidOperation:  # an exponent beyond what Decimal holds
        raise DecimalError(f"{_show(text)} is out of range: expected |value| < 1e21") from None


def _checked(value: Decimal, raw: object) -> Decimal:
    """``value`` with trailing zeros dropped, if it is within bounds. Pure integer arithmetic
    on the digits: no context, so nothing can round, underflow or overflow on the way."""
    if not value.is_finite():
        raise DecimalError(f"{_show(raw)} is not finite: expected {EXPECTED}")
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    n = len(digits)
    while n > 1 and digits[n - 1] == 0:
        n -= 1
    if n == 1 and digits[0] == 0:
        return ZERO
    exponent += len(digits) - n
    if exponent + n > 21:  # the leading digit's power of ten is exponent + n - 1 ≥ 21
        raise DecimalError(f"{_show(raw)} is too large: expected |value| < 1e21")
    if exponent < -MAX_PLACES:
        raise DecimalError(
            f"{_show(raw)} has {-exponent} decimal places: expected at most {MAX_PLACES} "
            "decimal places (values are never rounded)"
        )
    if n == len(digits):
        return value
    return Decimal((sign, digits[:n], exponent))


def _show(raw: object) -> str:
    """The offending value for a message, short whatever it is (a 5,000-digit integer has no
    ``repr`` past Python's digit limit)."""
    if isinstance(raw, int) and not isinstance(raw, bool) and raw.bit_length() > 256:
        return f"an integer of about {raw.bit_length() * 30103 // 100000 + 1} digits"
    if isinstance(raw, str | float | Decimal | int):
        text = repr(str(raw)) if isinstance(raw, str) else repr(raw)
    else:  # a list or object: its type is what matters, and its repr may not even exist
        kinds = {list: "an array", dict: "an object", type(None): "null"}
        text = kinds.get(type(raw), f"a {type(raw).__name__}")
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)"


def fmt(value: Decimal) -> str:
    """Canonical text of an exact decimal: no exponent, no trailing zeros ("1", "0.8")."""
    if value == 0:
        return "0"
    text = format(value.normalize(EXACT), "f")
    return text


def dec(text: str) -> Decimal:
    """Decimal from stored canonical text."""
    return Decimal(text)
