"""Exact decimal parsing and arithmetic for usage values and money.

Every usage value and amount is a ``Decimal``; arithmetic runs in ``EXACT``, a context wide
enough that sums of valid values never round.
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


class DecimalError(ValueError):
    """A value that is not an acceptable usage decimal; the message says why."""


_PLAIN = re.compile(r"-?[0-9]{1,21}(?:\.[0-9]{1,18})?")


def parse_value(raw: object) -> Decimal:
    """Parse a usage value: a JSON number or a decimal string, finite, |v| < 1e21, ≤ 18 places."""
    if type(raw) is str and _PLAIN.fullmatch(raw):
        # The common case, already known finite and within 18 places.
        value = Decimal(raw)
        if value.adjusted() >= 21:
            raise DecimalError(f"{raw!r} is too large: |value| must be < 1e21")
        return value if value else ZERO
    if isinstance(raw, bool):
        raise DecimalError("expected a decimal number or decimal string, got a boolean")
    if isinstance(raw, Decimal):
        value = raw
    elif isinstance(raw, int):
        value = Decimal(raw)
    elif isinstance(raw, float):
        # Only reached for numbers that round-trip exactly (see pipeline.decode): repr is the
        # shortest text of that double, which equals what the sender wrote.
        value = Decimal(repr(raw))
    elif isinstance(raw, str):
        text = raw.strip()
        if not text or len(text) > 64:
            raise DecimalError('expected a decimal string such as "0.8"')
        try:
            value = Decimal(text)
        except decimal.InvalidOperation:
            raise DecimalError(f"{raw!r} is not a decimal number") from None
    else:
        raise DecimalError(f"expected a decimal number or decimal string, got {type(raw).__name__}")
    if not value.is_finite():
        raise DecimalError(f"{raw!r} is not finite")
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    if value.adjusted() >= 21:
        raise DecimalError(f"{raw!r} is too large: |value| must be < 1e21")
    if exponent < -MAX_PLACES:
        normalized = value.normalize(EXACT)
        n_exp = normalized.as_tuple().exponent
        assert isinstance(n_exp, int)
        if n_exp < -MAX_PLACES:
            raise DecimalError(f"{raw!r} has more than {MAX_PLACES} decimal places")
        value = normalized
    if value == 0:
        return ZERO
    return value


def fmt(value: Decimal) -> str:
    """Canonical text of an exact decimal: no exponent, no trailing zeros ("1", "0.8")."""
    if value == 0:
        return "0"
    text = format(value.normalize(EXACT), "f")
    return text


def dec(text: str) -> Decimal:
    """Decimal from stored canonical text."""
    return Decimal(text)
