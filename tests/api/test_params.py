"""The API's parameter parsers, in-process: every text is a value or an ``ApiError`` 400."""

from __future__ import annotations

import time as clock
from collections.abc import Callable
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meter_gateway.api import params
from meter_gateway.api.errors import ApiError

NS = 1_000_000_000
UTC_ZONE = ZoneInfo("UTC")


def ns(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()) * NS


PARSERS: dict[str, Callable[[str], object]] = {
    "integer": lambda s: params.integer(s, "n", 7, 1, 1000),
    "limit": params.limit,
    "choice": lambda s: params.choice(s, "window", ("raw", "hour"), "raw"),
    "time": lambda s: params.time(s, "from", 0),
    "period": lambda s: params.period(s, s, (0, 1)),
    "period_to": lambda s: params.period("2026-01-01T00:00:00Z", s, (0, 1)),
    "time_zone": lambda s: params.time_zone(s, UTC_ZONE),
    "record_cursor": params.record_cursor,
    "invoice_cursor": params.invoice_cursor,
    "seq_cursor": params.seq_cursor,
    "check_known": lambda s: params.check_known([(s, "1")], ("limit",)),
    "resource_id": params.resource_id,
}
HOSTILE = [
    "",
    " ",
    "²",
    "①",
    "\u0661\u0662",
    "\uff11\uff12",
    "-1",
    "+1",
    "1_000",
    "9" * 30,
    "9" * 10_000,
    "a" * 10_000,
    "\x00",
    "\ud800",
    "%ZZ",
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59Z",
    "../../etc/passwd",
    "America",
    "leapseconds",
    "tzdata.zi",
    "=",
    "====",
    "MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY6MQ==",
]


def assert_value_or_400(parse: Callable[[str], object], text: str) -> None:
    error = None
    try:
        parse(text)
    except ApiError as exc:  # anything else fails the test
        error = exc
    if error is not None:
        assert error.status == 400
        assert error.message
        assert isinstance(error.fields.get("parameter"), str)


@pytest.mark.parametrize("name", sorted(PARSERS))
@given(text=st.text())
def test_any_text_is_a_value_or_a_400(name: str, text: str) -> None:
    assert_value_or_400(PARSERS[name], text)


@pytest.mark.parametrize("name", sorted(PARSERS))
@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_text_is_a_value_or_a_400(name: str, text: str) -> None:
    assert_value_or_400(PARSERS[name], text)


@pytest.mark.parametrize("text", ["²", "①", "\u0661", "\uff11", "-1", "+1", " 1", "1 ", "1_0"])
def test_integers_are_ascii_digits_only(text: str) -> None:
    with pytest.raises(ApiError) as info:
        params.integer(text, "limit", 100, 1, 10_000)
    assert info.value.fields["parameter"] == "limit"
    assert "limit" in info.value.message


def test_integers_are_bounded_and_defaulted() -> None:
    assert params.integer(None, "n", 5, 1, 10) == 5
    assert params.integer("", "n", 5, 1, 10) == 5
    assert params.integer("007", "n", 5, 1, 10) == 7
    for text in ("0", "11", "9" * 20):
        with pytest.raises(ApiError):
            params.integer(text, "n", 5, 1, 10)
    assert params.seq_cursor(str(params.MAX_INT)) == params.MAX_INT
    with pytest.raises(ApiError):
        params.seq_cursor(str(params.MAX_INT + 1))


def test_one_page_size_for_every_list() -> None:
    assert params.limit(None) == params.PAGE_DEFAULT == 100
    assert params.limit("10000") == params.PAGE_MAX == 10_000
    for text in ("0", "10001"):
        with pytest.raises(ApiError, match="from 1 to 10000"):
            params.limit(text)


def test_times_are_rfc3339_within_1970_and_9999() -> None:
    assert params.time("1970-01-01T00:00:00Z", "from", 5) == 0
    assert params.time("9999-01-01T00:00:00Z", "to", 5) == params.LATEST_NS
    assert params.time("2026-05-01T02:00:00+02:00", "from", 5) == ns("2026-05-01T00:00:00")
    assert params.time(None, "from", 5) == 5
    for text in ("1969-12-31T23:59:59.999999999Z", "9999-01-01T00:00:00.000000001Z"):
        with pytest.raises(ApiError, match="outside 1970-01-01T00:00:00Z … 9999-01-01T00:00:00Z"):
            params.time(text, "to", 5)
    for text in ("yesterday", "2026-05-01T00:00:00", "2026-02-30T00:00:00Z", "1e999"):
        with pytest.raises(ApiError) as info:
            params.time(text, "from", 5)
        assert info.value.fields["parameter"] == "from"


@pytest.mark.parametrize("value", [0, 1.5, True, [], {}, ["2026-01-01T00:00:00Z"]])
def test_times_from_a_json_body_must_be_strings(value: object) -> None:
    with pytest.raises(ApiError, match="to: expected an RFC 3339 timestamp string"):
        params.time(value, "to", 5)


def test_a_period_ends_after_it_starts() -> None:
    default = (ns("2026-05-01T00:00:00"), ns("2026-06-01T00:00:00"))
    assert params.period(None, None, default) == default
    assert params.period("2026-05-10T00:00:00Z", None, default)[0] == ns("2026-05-10T00:00:00")
    for to in ("2026-05-01T00:00:00Z", "2026-04-30T00:00:00Z"):
        with pytest.raises(ApiError) as info:
            params.period("2026-05-01T00:00:00Z", to, default)
        assert info.value.fields["parameter"] == "to"
    with pytest.raises(ApiError, match="to: must be after from"):
        params.period("2026-07-01T00:00:00Z", None, default)  # after the default end


def test_times_past_the_store_horizon_are_refused_by_name() -> None:
    assert params.within_store(params.STORE_HORIZON_NS) == params.STORE_HORIZON_NS
    with pytest.raises(ApiError, match="to: usage is counted up to 2262-04-11T23:47:16"):
        params.within_store(params.LATEST_NS)


@pytest.mark.parametrize(
    "text",
    [
        "a" * 1000,
        "Europe/Berlin\x00",
        "../../etc/passwd",
        "/etc/localtime",
        "America",
        "leapseconds",
        "tzdata.zi",
        "Mars/Olympus",
        "Europe//Berlin",
        "Europe/Berlin/",
    ],
)
def test_time_zones_are_iana_names(text: str) -> None:
    with pytest.raises(ApiError) as info:
        params.time_zone(text, UTC_ZONE)
    assert info.value.fields["parameter"] == "tz"
    assert len(info.value.message) < 300


def test_time_zone_names_resolve() -> None:
    assert params.time_zone("Asia/Kolkata", UTC_ZONE) == ZoneInfo("Asia/Kolkata")
    assert params.time_zone("Etc/GMT+5", UTC_ZONE) == ZoneInfo("Etc/GMT+5")
    assert params.time_zone(None, UTC_ZONE) is UTC_ZONE


@given(ts=st.integers(0, params.MAX_INT), seq=st.integers(0, params.MAX_INT))
def test_record_cursors_round_trip(ts: int, seq: int) -> None:
    assert params.record_cursor(params.encode_record_cursor(ts, seq)) == (ts, seq)


@given(
    created=st.integers(0, params.MAX_INT),
    invoice_id=st.from_regex(r"\Ainv_[0-9a-f]{20}\Z"),
)
def test_invoice_cursors_round_trip(created: int, invoice_id: str) -> None:
    cursor = params.encode_invoice_cursor(created, invoice_id)
    assert params.invoice_cursor(cursor) == (created, invoice_id)


@pytest.mark.parametrize(
    "content",
    [
        f"{2**63}:1",  # past a 64-bit column
        f"1:{10**25}",
        "1",
        "1:",
        ":1",
        "-1:1",
        "\u00b2:1",
        "1:2:3",
    ],
)
def test_record_cursors_we_did_not_make_are_refused(content: str) -> None:
    cursor = params._pack(content)
    with pytest.raises(ApiError, match="is not a cursor this API returned"):
        params.record_cursor(cursor)


@pytest.mark.parametrize(
    "content", [f"{2**63}:inv_1", "1:", "1:inv\x00", "x:inv_1", "1:" + "a" * 200]
)
def test_invoice_cursors_we_did_not_make_are_refused(content: str) -> None:
    with pytest.raises(ApiError, match="is not a cursor this API returned"):
        params.invoice_cursor(params._pack(content))


def test_unknown_and_repeated_parameters_are_named() -> None:
    params.check_known([("from", "x"), ("to", "y")], ("from", "to"))
    with pytest.raises(ApiError) as info:
        params.check_known([("from", "x"), ("groupBy", "customer")], ("from", "to"))
    assert info.value.fields["parameter"] == "groupBy"
    assert "its parameters: from, to" in info.value.message
    with pytest.raises(ApiError, match="limit: given more than once"):
        params.check_known([("limit", "1"), ("limit", "2")], ("limit",))
    with pytest.raises(ApiError, match=r"its parameters: none"):
        params.check_known([("limit", "1")], ())


def test_window_count_is_exact_and_stops_past_the_cap() -> None:
    day = ns("2026-05-01T00:00:00")
    berlin = ZoneInfo("Europe/Berlin")
    assert params.window_count(day, day + 24 * 3600 * NS, "hour", UTC_ZONE, 100) == 24
    # 2026-03-29 in Berlin (clocks go forward) has 23 hours
    march = ns("2026-03-28T23:00:00")
    assert params.window_count(march, march + 23 * 3600 * NS, "hour", berlin, 100) == 23
    assert params.window_count(day, ns("2027-05-01T00:00:00"), "month", UTC_ZONE, 100) == 12
    started = clock.perf_counter()
    n = params.window_count(0, params.STORE_HORIZON_NS, "hour", berlin, params.MAX_WINDOWS)
    assert n == params.MAX_WINDOWS + 1
    assert clock.perf_counter() - started < 5  # bounded work, not 2.1 million hours
