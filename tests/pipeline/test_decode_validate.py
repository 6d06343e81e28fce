"""Decode and validate in-process on issue 13's hostile input: every bad record is rejected
alone with a reason naming field, value and expectation; nothing raises; good records beside
them come out exactly as sent."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meter_gateway.catalog import build
from meter_gateway.clock import FixedClock
from meter_gateway.config import Customer, Dimension, IngestConfig, Rule, RuleMatch
from meter_gateway.decimals import Unrepresentable
from meter_gateway.model import Batch, Observation, ObservationKind, Reason, Source
from meter_gateway.pipeline.decode import DecodeError, ItemError, loads, parse_items
from meter_gateway.pipeline.mapping import Mapper
from meter_gateway.pipeline.validate import MAX_METADATA_DEPTH, Validator

NOW = 1_780_000_000 * 10**9  # 2026-05-28T20:26:40Z
WHEN = "2026-05-28T20:00:00Z"
WHEN_NS = 1_779_998_400 * 10**9


def validator() -> Validator:
    catalog = build(
        {
            "customers": {"c1": Customer(id="c1", name="C1", aliases=("c1-alias",))},
            "dimensions": {
                "d1": Dimension(id="d1", name="D1"),
                "users": Dimension(
                    id="users", name="Users", aggregation="unique_count", unique_key="user"
                ),
            },
        }
    )
    rules = [
        Rule(match=RuleMatch(metric="bytes"), dimension="d1", scale=Decimal("1e-9")),
        Rule(match=RuleMatch(), dimension="d1"),
    ]
    return Validator(lambda: catalog, FixedClock(NOW), IngestConfig(), Mapper(rules))


def rec(value: Any = "1", **extra: Any) -> dict[str, Any]:
    return {
        "customerId": "c1",
        "dimensionId": "d1",
        "recordValue": value,
        "timestamp": WHEN,
        **extra,
    }


def nested(depth: int) -> dict[str, Any]:
    """Metadata ``depth`` levels deep, the metadata object itself being the first."""
    meta: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        meta = {"n": meta}
    return meta


def run(items: list[Any]) -> Batch:
    return validator().batch(items, Source.REST)


def only_error(batch: Batch) -> tuple[str | None, str, Reason]:
    (e,) = batch.errors
    return e.field, e.error, e.reason


# --- decode -------------------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["array", "ndjson"])
def test_a_number_no_decimal_holds_fails_only_its_record(framing: str) -> None:
    good = orjson.dumps(rec("2"))
    bad = good.replace(b'"2"', b"1e99999999999999999999")
    lines = [good, bad, good]
    if framing == "array":
        items = parse_items(b"[" + b",".join(lines) + b"]", "application/json", 10)
    else:
        items = parse_items(b"\n".join(lines), "application/x-ndjson", 10)
    assert isinstance(items[1], dict)
    assert isinstance(items[1]["recordValue"], Unrepresentable)
    batch = run(list(items))
    assert [r.value for r in batch.records] == [Decimal(2), Decimal(2)]
    field, error, reason = only_error(batch)
    assert (field, reason) == ("recordValue", Reason.INVALID_VALUE)
    assert "1e99999999999999999999" in error
    assert "1e21" in error


def test_an_integer_past_pythons_digit_limit_fails_only_its_record() -> None:
    body = orjson.dumps([rec("2"), rec("X")]).replace(b'"X"', b"9" * 5000)
    batch = run(list(parse_items(body, "application/json", 10)))
    assert [r.value for r in batch.records] == [Decimal(2)]
    field, error, _ = only_error(batch)
    assert field == "recordValue"
    assert "1e21" in error


def test_tiny_exponents_take_the_exact_path_even_beside_uuid_like_text() -> None:
    # "...0e-4123..." inside a string looks like an exponent to the quick scan
    body = b'[{"id":"550e8400-e29b-41d4-a716-0e-4123","v":0.5,"w":1e-400,"x":-2.5E-0320}]'
    doc = loads(body)
    assert doc[0]["v"] == Decimal("0.5")
    assert doc[0]["w"] == Decimal("1e-400")
    assert doc[0]["x"] == Decimal("-2.5e-320")
    assert loads(b'{"v": \n\t 1e-400}') == {"v": Decimal("1e-400")}
    assert loads(b"[1e-400,-1E-999]") == [Decimal("1e-400"), Decimal("-1e-999")]
    fast = loads(b'[{"id":"550e8400-e29b-41d4-a716-0e-4123","v":0.5}]')
    assert fast[0] == {"id": "550e8400-e29b-41d4-a716-0e-4123", "v": 0.5}


def test_a_body_nested_a_thousand_deep_is_an_item_error_beside_good_records() -> None:
    body = b"[" + b"[" * 1000 + b"]" * 1000 + b"," + orjson.dumps(rec()) + b"]"
    items = parse_items(body, "application/json", 10)
    assert isinstance(items[0], ItemError)
    assert "expected a JSON object" in items[0].error
    assert len(items[0].raw) < 4096
    batch = run(list(items))
    assert len(batch.records) == 1
    assert batch.errors[0].reason is Reason.MALFORMED


@pytest.mark.parametrize("depth", [1025, 5000, 100_000])
def test_an_array_element_too_deep_to_parse_fails_alone(depth: int) -> None:
    good = orjson.dumps(rec())
    deep = b'{"metadata":' * depth + b"1" + b"}" * depth
    body = b"[" + good + b"," + deep + b',{"s":"],[{\\"x"},' + good + b"]"
    items = parse_items(body, "application/json", 10)
    assert [type(i) for i in items] == [dict, ItemError, dict, dict]
    assert "nested too deeply" in items[1].error
    assert items[2] == {"s": '],[{"x'}  # brackets inside strings are not structure
    batch = run(list(items))
    assert len(batch.records) == 2


@pytest.mark.parametrize(
    "body",
    [b"[" * 1100 + b"]" * 1099, b"[" + b"[" * 1100 + b"]" * 1100 + b"]x", b'{"a":' * 1100 + b"1"],
)
def test_a_body_too_deep_and_not_well_formed_is_a_400(body: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        parse_items(body, "application/json", 10)
    assert info.value.status == 400


def test_a_too_deep_ndjson_line_fails_alone() -> None:
    deep = b'{"a":' * 5000 + b"1" + b"}" * 5000
    items = parse_items(orjson.dumps(rec()) + b"\n" + deep, "application/x-ndjson", 10)
    assert isinstance(items[0], dict)
    assert isinstance(items[1], ItemError)
    assert "nested too deeply" in items[1].error


# Lines as senders write them, and the near misses a joined parse could misread: objects whose
# strings hold "},{" or a newline escape, blank and padded lines, a line of two objects, an
# object split over two lines, arrays, scalars and garbage.
_TEXT = st.text(st.characters(blacklist_categories=["Cs"]), max_size=8)
_LINE = st.one_of(
    st.dictionaries(
        _TEXT,
        st.one_of(st.integers(-(2**63), 2**64 - 1), _TEXT, st.floats(allow_nan=False)),
        max_size=3,
    ).map(orjson.dumps),
    st.sampled_from(
        [b'{"a":"},{"}', b'{"a":1},{"b":2}', b'{"a":[1', b"2]}", b"", b"  ", b'\t{"a":1} \r',
         b"[1]", b"7", b"{", b"}", b'{"x":"\\n"}', b"{}", b"{}{}", b'{"a":1e400}']
    ),
)  # fmt: skip


@settings(max_examples=300)
@given(st.lists(_LINE, min_size=1, max_size=8), st.integers(1, 10))
@example([b'{"":0.001}', b'{"a":1.00000000000000000001}'], 10)  # read with Decimals as a whole
def test_ndjson_is_read_as_its_lines_one_by_one(lines: list[bytes], limit: int) -> None:
    """The one-parse fast path for well-formed NDJSON gives what reading each non-blank line
    alone gives: the same objects, the same failing lines, the same 413."""
    body = b"\n".join(lines)
    kept = [ln.strip() for ln in lines if ln.strip()]
    if len(kept) > limit:
        with pytest.raises(DecodeError) as info:
            parse_items(body, "application/x-ndjson", limit)
        assert info.value.status == 413
        return
    got = parse_items(body, "application/x-ndjson", limit)
    assert len(got) == len(kept)
    for item, line in zip(got, kept, strict=True):
        try:
            one = loads(line)
        except ValueError:
            assert isinstance(item, ItemError)
            continue
        if isinstance(one, dict):
            # A body is read with doubles or with Decimals as a whole (decode's module
            # docstring): one line alone may be read the other way, to the same number.
            assert _numbers_exact(item) == _numbers_exact(one)
        else:
            assert isinstance(item, ItemError)


def _numbers_exact(doc: Any) -> Any:
    """``doc`` with every double as the Decimal of its shortest text (how parse_value reads
    one), so the two readings of a JSON number compare equal."""
    if isinstance(doc, float):
        return Decimal(repr(doc))
    if isinstance(doc, dict):
        return {k: _numbers_exact(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_numbers_exact(v) for v in doc]
    return doc


# --- values and timestamps ------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["\u0661\u0662", "\uff11\uff12", "1_000", "1_0.5", ".5", "5.", "+5", " 5", "1e-400", "1e21"],
)
def test_forbidden_values_are_rejected_beside_a_stored_one(value: str) -> None:
    batch = run([rec("0.25"), rec(value)])
    assert [r.value for r in batch.records] == [Decimal("0.25")]
    field, error, reason = only_error(batch)
    assert (field, reason) == ("recordValue", Reason.INVALID_VALUE)
    assert repr(value) in error
    assert "expected" in error


@pytest.mark.parametrize(
    "ts", ["2026-W22-4T20:00:00Z", "20260528T200000Z", "2026-05-28T20Z", "2026-05-28T20:00:00"]
)
def test_iso8601_only_timestamps_are_rejected(ts: str) -> None:
    batch = run([rec(), rec(timestamp=ts)])
    assert len(batch.records) == 1
    field, error, reason = only_error(batch)
    assert (field, reason) == ("timestamp", Reason.INVALID_TIMESTAMP)
    assert repr(ts) in error


# --- ids and metadata ---------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["id", "customerId", "dimensionId"])
@pytest.mark.parametrize("char", ["\x00", "\x01", "\n", "\x7f"])
def test_control_characters_in_ids_are_rejected_naming_the_character(field: str, char: str) -> None:
    batch = run([rec(id="nul"), rec(**{field: f"nul{char}A"})])
    assert [r.record_id for r in batch.records] == ["nul"]
    got_field, error, reason = only_error(batch)
    assert (got_field, reason) == (field, Reason.INVALID_VALUE)
    assert f"U+{ord(char):04X}" in error


def test_ids_are_kept_exactly() -> None:
    ids = ["nul", "nul A", "ünï-cødé ✓", "x" * 512, "a\u00a0b"]
    batch = run([rec(id=i) for i in ids])
    assert [r.record_id for r in batch.records] == ids


@pytest.mark.parametrize("depth", [MAX_METADATA_DEPTH + 1, 252, 253, 254, 255, 1000])
def test_metadata_deeper_than_the_limit_is_rejected_alone(depth: int) -> None:
    batch = run([rec(metadata=nested(MAX_METADATA_DEPTH)), rec(metadata=nested(depth))])
    assert len(batch.records) == 1
    assert batch.records[0].metadata == nested(MAX_METADATA_DEPTH)
    field, error, reason = only_error(batch)
    assert (field, reason) == ("metadata", Reason.TOO_LARGE)
    assert f"more than {MAX_METADATA_DEPTH} levels" in error
    assert len(batch.errors[0].raw or "") <= 8192


def test_metadata_nested_in_lists_counts_every_level() -> None:
    meta: Any = [1]
    for _ in range(MAX_METADATA_DEPTH - 1):
        meta = [meta]
    batch = run([rec(metadata={"l": meta})])  # one object + 32 arrays
    assert batch.errors[0].field == "metadata"


@pytest.mark.parametrize(
    "meta", [{"k\x00": "v"}, {"k": "v\x00"}, {"k": ["ok", {"deep": "\x00"}]}], ids=str
)
def test_nul_in_metadata_is_rejected(meta: dict[str, Any]) -> None:
    batch = run([rec(metadata={"tab\tand\nnewline": "are\tfine\n"}), rec(metadata=meta)])
    assert batch.records[0].metadata == {"tab\tand\nnewline": "are\tfine\n"}
    field, error, reason = only_error(batch)
    assert str(field).startswith("metadata")
    assert reason is Reason.INVALID_VALUE
    assert "U+0000" in error


@pytest.mark.parametrize(
    "meta",
    [
        {"0": 123456789012345678901234567890, "": "\ud800"},  # found by the fuzz suite
        {"a": "\ud800", "b": 2**70},
        {"n": [2**64, {"s": "x\udfff"}]},
    ],
    ids=["big-int-first", "surrogate-first", "nested"],
)
def test_a_lone_surrogate_beside_an_integer_past_64_bits_is_rejected_alone(
    meta: dict[str, Any],
) -> None:
    """orjson stops at the first value it cannot write: a number past 64 bits (kept as text)
    must not hide a lone surrogate after it."""
    batch = run([rec(metadata={"big": 2**70}), rec(metadata=meta)])
    assert batch.records[0].metadata == {"big": str(2**70)}
    field, error, reason = only_error(batch)
    assert field == "metadata"
    assert reason is Reason.MALFORMED
    assert "surrogate" in error


def test_metadata_holding_a_literal_backslash_u0000_is_kept() -> None:
    batch = run([rec(metadata={"k": "\\u0000"})])
    assert batch.records[0].metadata == {"k": "\\u0000"}


def test_unique_key_of_an_exact_decimal_does_not_crash() -> None:
    item = rec(dimensionId="users", metadata={"user": Decimal("0.10000000000000000001")})
    batch = run([item])
    assert batch.records[0].unique_value == '"0.10000000000000000001"'


# --- Vector metric events -----------------------------------------------------------------------


def vector(tags: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": "requests",
        "kind": "incremental",
        "counter": {"value": 3},
        "timestamp": WHEN,
        "tags": {"tenant": "c1", **tags},
        **extra,
    }


@pytest.mark.parametrize(
    ("tags", "field"),
    [
        ({"region": "\ud800"}, "tags.region"),
        ({"\udc00": "x"}, "tags key"),
        ({"region": "eu\x00"}, "tags.region"),
        ({"region": ["a", "\ud800"]}, "tags.region"),
        ({"region": [[[1]] * 2] * 2}, None),  # an odd tag shape is fine: kept as JSON text
    ],
)
def test_vector_tags_that_cannot_be_stored_are_rejected_alone(
    tags: dict[str, Any], field: str | None
) -> None:
    batch = run([vector({}), vector(tags)])
    if field is None:
        assert len(batch.records) == 2
        return
    assert len(batch.records) == 1
    got, _, _ = only_error(batch)
    assert got == field


def test_a_vector_timestamp_past_64_bit_nanoseconds_is_rejected() -> None:
    batch = run([vector({}, timestamp="9999-12-31T23:59:59Z")])
    field, error, reason = only_error(batch)
    assert (field, reason) == ("timestamp", Reason.INVALID_TIMESTAMP)
    assert "9999-12-31T23:59:59Z" in error


@pytest.mark.parametrize("value", [1e300, "1e21", "1e-20", 1e21])
def test_vector_values_obey_the_record_grammar(value: Any) -> None:
    batch = run([vector({}, counter={"value": value})])
    field, _, reason = only_error(batch)
    assert (field, reason) == ("counter.value", Reason.INVALID_VALUE)


# --- observations (OTLP, remote write, Prometheus) ----------------------------------------


def obs(
    value: str | Decimal, t_ns: int = WHEN_NS, name: str = "gauge", **attrs: str
) -> Observation:
    return Observation(
        Source.REMOTE_WRITE,
        name,
        {"tenant": "c1", **attrs},
        Decimal(value),
        ObservationKind.LEVEL,
        t_ns,
    )


@pytest.mark.parametrize(
    ("observation", "field", "needle"),
    [
        (obs("1e300"), "value", "1e21"),
        (obs("1e21"), "value", "1e21"),
        (obs("1e-20"), "value", "decimal places"),
        (obs("0.123456789012345", name="bytes"), "value", "scale 0.000000001"),
        (obs("1", (2**63 - 1) * 1_000_000), "timestamp", "in the future"),
        (obs("1", -(2**63) * 1_000_000), "timestamp", "late-arrival"),
        (obs("1", x="nul\x00"), "attributes.x", "U+0000"),
        (obs("1", name="g\x00"), "name", "U+0000"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_observations_are_held_to_the_same_bounds(
    observation: Observation, field: str, needle: str
) -> None:
    batch = validator().observations([obs("2.5"), observation], Source.REMOTE_WRITE)
    assert [r.value for r in batch.records] == [Decimal("2.5")]
    got, error, reason = only_error(batch)
    assert got == field
    assert reason in (Reason.INVALID_VALUE, Reason.IN_FUTURE, Reason.TOO_LATE)
    assert needle in error
    raw = orjson.loads(batch.errors[0].raw or "")
    assert str(raw["timeUnixNano"]) == str(observation.timestamp_ns)  # exact, even past 64 bits


def test_a_scaled_value_within_18_places_is_exact() -> None:
    batch = validator().observations([obs("123456789", name="bytes")], Source.REMOTE_WRITE)
    assert [r.value for r in batch.records] == [Decimal("0.123456789")]
