"""The strict grammars every receiver shares: usage values (decimals.parse_value) and RFC 3339
timestamps (pipeline.timestamps), with the hostile inputs of issue 13 kept as cases."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from fractions import Fraction

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from meter_gateway.decimals import DecimalError, _checked, check_value, parse_value
from meter_gateway.pipeline.decode import loads
from meter_gateway.pipeline.timestamps import _parse_in_full, parse_timestamp

# RFC 8259's number, written out again here so the test does not trust the code's regex.
JSON_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
LIMIT = Fraction(10) ** 21


def within_bounds(text: str) -> bool:
    """The contract, computed with exact fractions: |v| < 1e21 and at most 18 places."""
    try:
        v = Fraction(Decimal(text))
    except InvalidOperation:  # an exponent no Decimal holds
        return False
    return abs(v) < LIMIT and (v * 10**18).denominator == 1


@st.composite
def json_numbers(draw: st.DrawFn) -> str:
    sign = draw(st.sampled_from(["", "-"]))
    whole = draw(st.sampled_from(["0", "1", "9"])) if draw(st.booleans()) else None
    if whole is None:
        whole = str(draw(st.integers(1, 10**25)))
    frac = draw(st.one_of(st.none(), st.text("0123456789", min_size=1, max_size=24)))
    exp = draw(st.one_of(st.none(), st.integers(-40, 40)))
    text = sign + whole + ("" if frac is None else "." + frac)
    if exp is not None:
        e = draw(st.sampled_from(["e", "E"]))
        plus = "+" if exp >= 0 and draw(st.booleans()) else ""
        text += f"{e}{plus}{exp}"
    return text


# --- values -------------------------------------------------------------------------------------


@given(json_numbers())
@example("1e-400")
@example("1e21")
@example("999999999999999999999")
@example("1.000000000000000000000000000")
@example("0.000000000000000001")
@example("0.0000000000000000001")
@example("-0")
@example("-0.0e-5000")
def test_a_grammar_string_is_accepted_exactly_iff_within_bounds(text: str) -> None:
    if within_bounds(text):
        assert parse_value(text) == Decimal(text)
        assert Fraction(parse_value(text)) == Fraction(Decimal(text))
    else:
        with pytest.raises(DecimalError):
            parse_value(text)


@given(json_numbers())
@example("1e-400")
@example("1E-0400")
@example("1e-320")
@example("0.10000000000000001")
@example("123456789012345678.5")
def test_a_json_number_in_a_body_is_read_exactly_and_judged_like_its_text(text: str) -> None:
    # Through the real decoder: orjson's doubles on the fast path, Decimal otherwise.
    doc = loads(b'[{"v":%s,"id":"550e8400-e29b-41d4-a716-4466554400e1"}]' % text.encode())
    raw = doc[0]["v"]
    if within_bounds(text):
        assert parse_value(raw) == Decimal(text)
    else:
        with pytest.raises(DecimalError):
            parse_value(raw)


NON_ASCII_DIGITS = "\u0661\u0662\u06f3\u0967\uff11\uff12\U0001d7ce\u00b2\u2460"


@given(st.text("0123456789.eE+-_ \t\n" + NON_ASCII_DIGITS, max_size=30))
def test_text_is_accepted_iff_in_the_grammar_and_bounds(text: str) -> None:
    if JSON_NUMBER.fullmatch(text) and within_bounds(text):
        assert parse_value(text) == Decimal(text)
    else:
        with pytest.raises(DecimalError, match=r"\S"):  # a reason, never an empty message
            parse_value(text)


@given(json_numbers(), st.sampled_from(NON_ASCII_DIGITS), st.integers(0, 30))
def test_a_unicode_digit_anywhere_is_rejected(text: str, digit: str, at: int) -> None:
    at = min(at, len(text))
    with pytest.raises(DecimalError, match="not a decimal number"):
        parse_value(text[:at] + digit + text[at:])


@pytest.mark.parametrize(
    "raw",
    [
        "\u0661\u0662",  # Arabic-Indic 12
        "\uff11\uff12",  # fullwidth 12
        "1_000",
        "1_0.5",
        ".5",
        "5.",
        "+5",
        " 5",
        "5 ",
        "\t5",
        "5\n",
        "007",
        "0x10",
        "1e",
        "1e+",
        "--1",
        "NaN",
        "nan",
        "Infinity",
        "-Infinity",
        "",
        "1,5",
    ],
)
def test_text_outside_the_grammar_is_rejected_naming_value_and_expectation(raw: str) -> None:
    with pytest.raises(DecimalError) as info:
        parse_value(raw)
    assert repr(raw) in str(info.value)
    assert "expected" in str(info.value)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("1e-400", "400 decimal places"),
        ("1e21", "|value| < 1e21"),
        ("-1e21", "|value| < 1e21"),
        ("1e99999999999999999999", "out of range"),
        ("1e-99999999999999999999", "out of range"),
        (10**21, "|value| < 1e21"),
        (10**5000, "about 5001 digits"),
        (1e300, "|value| < 1e21"),
        (1e-20, "20 decimal places"),
        (float("nan"), "not finite"),
        (float("inf"), "not finite"),
        (Decimal("NaN"), "not finite"),
        (Decimal("1E-19"), "19 decimal places"),
        (True, "boolean"),
        (None, "null"),
        ([1] * 1000, "an array"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_out_of_bounds_values_are_rejected_never_rounded(raw: object, needle: str) -> None:
    with pytest.raises(DecimalError, match=re.escape(needle)):
        parse_value(raw)


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("-0", "0"),
        ("-0.0", "0"),
        ("0e-400", "0"),
        ("1.000000000000000000000000", "1"),
        ("12.50", "12.5"),
        ("1E+20", "100000000000000000000"),
        ("999999999999999999999.999999999999999999", "999999999999999999999.999999999999999999"),
        (0.1, "0.1"),
        (0.1 + 0.2, "0.30000000000000004"),
        (-5, "-5"),
        (10**21 - 1, "999999999999999999999"),
    ],
)
def test_accepted_values_keep_their_exact_value(raw: object, value: str) -> None:
    assert parse_value(raw) == Decimal(value)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_a_double_is_judged_by_its_shortest_round_trip_text(x: float) -> None:
    text = repr(x)
    if within_bounds(text):
        assert parse_value(x) == Decimal(text)
        # the plain-text fast path keeps the digits the general rule keeps (stored as text)
        assert str(parse_value(x)) == str(_checked(Decimal(text), x))
    else:
        with pytest.raises(DecimalError):
            parse_value(x)


def test_a_scaled_value_obeys_the_same_bounds() -> None:
    assert check_value(Decimal("123456789") * Decimal("1e-9")) == Decimal("0.123456789")
    with pytest.raises(DecimalError, match="decimal places"):
        check_value(Decimal("0.123456789012345") * Decimal("1e-9"))
    with pytest.raises(DecimalError, match="1e21"):
        check_value(Decimal("1e12") * Decimal("1e9"))


# --- timestamps ---------------------------------------------------------------------------------

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@given(
    st.datetimes(
        min_value=datetime(1, 1, 2),  # noqa: DTZ001 - hypothesis bounds are naive
        max_value=datetime(9999, 12, 30),  # noqa: DTZ001
        timezones=st.just(UTC),
    ),
    st.integers(0, 999),
    st.integers(-23 * 60 - 59, 23 * 60 + 59),
    st.integers(0, 9),
    st.sampled_from(["T", "t", " "]),
)
def test_rfc3339_in_every_allowed_spelling_reads_to_the_exact_nanosecond(
    when: datetime, extra_ns: int, offset_min: int, digits: int, sep: str
) -> None:
    ns_total = (when - EPOCH) // timedelta(microseconds=1) * 1000 + extra_ns
    local = when.astimezone(timezone(timedelta(minutes=offset_min)))
    frac_ns = local.microsecond * 1000 + extra_ns
    frac = f"{frac_ns:09d}"
    if digits < 9:
        # fewer digits: drop what they cannot say from the expected value too
        ns_total -= frac_ns % 10 ** (9 - digits)
        frac = frac[:digits]
    off = "Z" if offset_min == 0 else local.strftime("%z")
    off = off if off == "Z" else off[:3] + ":" + off[3:]
    day = f"{local.year:04d}-{local.month:02d}-{local.day:02d}"  # %Y does not pad year 999
    text = day + local.strftime(f"{sep}%H:%M:%S") + (f".{frac}" if digits else "") + off
    assert parse_timestamp(text) == ns_total
    assert parse_timestamp(text) == ns_total  # its second and the rest remembered


def _outcome(parse: Callable[[str], int], text: str) -> tuple[str, object]:
    try:
        return "read", parse(text)
    except ValueError as exc:
        return "refused", str(exc)


@given(
    st.datetimes(
        min_value=datetime(1, 1, 2),  # noqa: DTZ001 - hypothesis bounds are naive
        max_value=datetime(9999, 12, 30),  # noqa: DTZ001
        timezones=st.just(UTC),
    ),
    st.text(".0123456789Zz+-:T \n\u0661", max_size=22),
    st.sampled_from(["", ".5Z", ".123456789Z", "+02:00", "-23:59", "Z"]),
)
@example(datetime(2026, 11, 29, 16, 29, 12, tzinfo=UTC), ".1234567891Z", "")
@example(datetime(2026, 11, 29, 16, 29, 12, tzinfo=UTC), "+24:00", "")
@example(datetime(2026, 11, 29, 16, 29, 12, tzinfo=UTC), "", "")
def test_a_remembered_second_reads_what_follows_it_as_a_full_read_does(
    when: datetime, rest: str, known_rest: str
) -> None:
    """After a timestamp was read, any text with its first 19 characters (and any rest, valid
    or not, remembered or not) is read or refused exactly as reading it in full does."""
    second = f"{when.year:04d}-{when.month:02d}-{when.day:02d}T{when:%H:%M:%S}"
    parse_timestamp(second + "Z")
    if known_rest:
        parse_timestamp(second + known_rest)
    for text in (second + rest, second + known_rest, second[:-1] + "9" + rest):
        assert _outcome(parse_timestamp, text) == _outcome(_parse_in_full, text)


@pytest.mark.parametrize(
    "text",
    [
        "2026-W47-1T16:29:12Z",  # ISO 8601 week date
        "20261129T120000Z",  # basic format
        "2026-11-29T16Z",  # reduced precision
        "2026-11-29T16:29Z",
        "2026-11-29",
        "2026-11-29T16:29:12",  # no offset
        "2026-11-29T16:29:12+0200",  # offset without colon
        "2026-11-29T16:29:12+02",
        "2026-11-29T16:29:12,5Z",  # comma fraction
        "2026-11-29T16:29:12.Z",
        "2026-11-29T16:29:12.1234567891Z",  # past nanoseconds: not truncated
        "2026-11-29T24:00:00Z",
        "2026-11-29T23:59:60Z",  # leap second
        "2026-02-29T00:00:00Z",
        "2026-13-01T00:00:00Z",
        "0000-01-01T00:00:00Z",
        "2026-11-29T16:29:12+24:00",
        "2026-11-29T16:29:12+05:60",
        "\uff12\uff10\uff12\uff16-11-29T16:29:12Z",  # fullwidth year
        "2026-11-29T16:29:\u0661\u0662Z",  # Arabic-Indic seconds
        " 2026-11-29T16:29:12Z",
        "2026-11-29T16:29:12Z ",
        "2026-11-29T16:29:12Z\n",
        "+2026-11-29T16:29:12Z",
        "9" * 100_000,
    ],
    ids=lambda t: t[:40],
)
def test_iso8601_only_and_malformed_timestamps_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match=r"RFC 3339|expected") as info:
        parse_timestamp(text)
    assert len(str(info.value)) < 400


def test_lower_case_and_space_separator_are_rfc3339() -> None:
    z = parse_timestamp("2026-11-29T16:29:12Z")
    assert parse_timestamp("2026-11-29t16:29:12z") == z
    assert parse_timestamp("2026-11-29 16:29:12Z") == z
    assert parse_timestamp("2026-11-29T18:29:12+02:00") == z
    assert parse_timestamp("2026-11-29T16:29:12-00:00") == z
    assert parse_timestamp("2026-11-29T16:29:12.000000001Z") == z + 1
    assert parse_timestamp("2024-02-29T00:00:00Z") == 1709164800 * 10**9


def test_a_body_number_underflowing_a_double_is_not_read_as_zero() -> None:
    # orjson reads 1e-400 as 0.0: the decoder must notice and keep the exact value
    doc = loads(orjson.dumps([{"a": "x"}]).replace(b'"x"', b"1e-400"))
    with pytest.raises(DecimalError, match="400 decimal places"):
        parse_value(doc[0]["a"])
