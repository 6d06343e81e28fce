"""receivers/otlp_codec.py against protobuf's own decoding of the same bytes.

Points are generated with every kind of ``AnyValue`` attribute (strings of lengths either side
of a one-byte length, ints, bools, doubles, bytes, arrays and kvlists), with and without start
time and time, ``asInt`` or ``asDouble`` or no value, exemplars, flags and unknown fields. The
codec must read exactly what upb reads, recognise every layout upb writes for a point that has
a time and a value, and on bytes mangled any way either step aside or still agree.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    KeyValue,
    KeyValueList,
)
from opentelemetry.proto.metrics.v1.metrics_pb2 import Exemplar, NumberDataPoint

from receivers.otlp_codec import is_series_key, read_number_point

U64 = st.integers(0, 2**64 - 1)
I64 = st.integers(-(2**63), 2**63 - 1)
DOUBLES = st.floats(allow_nan=True, allow_infinity=True)
# Lengths around 127 make the length prefixes one or two bytes long.
TEXT = st.one_of(st.text(max_size=8), st.text(min_size=120, max_size=140))
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _array(values: list[Any]) -> Any:
    return AnyValue(array_value=ArrayValue(values=values))


def _kvlist(pairs: list[tuple[str, Any]]) -> Any:
    return AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key=k, value=v) for k, v in pairs]))


SCALARS = st.one_of(
    TEXT.map(lambda s: AnyValue(string_value=s)),
    I64.map(lambda i: AnyValue(int_value=i)),
    st.booleans().map(lambda b: AnyValue(bool_value=b)),
    DOUBLES.map(lambda d: AnyValue(double_value=d)),
    st.binary(max_size=40).map(lambda b: AnyValue(bytes_value=b)),
    st.just(AnyValue()),
)
ANY_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(_array),
        st.lists(st.tuples(st.text(max_size=5), inner), max_size=3).map(_kvlist),
    ),
    max_leaves=8,
)
ATTRIBUTES = st.lists(
    st.builds(lambda k, v: KeyValue(key=k, value=v), TEXT, ANY_VALUES), max_size=5
)


@st.composite
def exemplars(draw: st.DrawFn) -> Any:
    e = Exemplar(time_unix_nano=draw(U64), filtered_attributes=draw(ATTRIBUTES))
    value = draw(st.sampled_from(["int", "double", None]))
    if value == "int":
        e.as_int = draw(I64)
    elif value == "double":
        e.as_double = draw(DOUBLES)
    e.span_id, e.trace_id = draw(st.binary(max_size=8)), draw(st.binary(max_size=16))
    return e


# Unknown fields as they come on the wire: (field number, wire type, payload)
UNKNOWN = st.one_of(
    st.tuples(st.integers(9, 2000), st.just(0), st.integers(0, 2**64 - 1)),
    st.tuples(st.integers(9, 2000), st.just(2), st.binary(max_size=20)),
    st.tuples(st.integers(9, 2000), st.just(1), st.binary(min_size=8, max_size=8)),
    st.tuples(st.integers(9, 2000), st.just(5), st.binary(min_size=4, max_size=4)),
)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field_bytes(number: int, wire: int, payload: int | bytes) -> bytes:
    tag = varint(number << 3 | wire)
    if wire == 0:
        assert isinstance(payload, int)
        return tag + varint(payload)
    assert isinstance(payload, bytes)
    return tag + (varint(len(payload)) + payload if wire == 2 else payload)


@st.composite
def points(draw: st.DrawFn) -> Any:
    p = NumberDataPoint(
        start_time_unix_nano=draw(st.one_of(st.just(0), U64)),
        time_unix_nano=draw(st.one_of(st.just(0), U64)),
        attributes=draw(ATTRIBUTES),
        exemplars=draw(st.lists(exemplars(), max_size=2)),
        flags=draw(st.one_of(st.sampled_from([0, 1, 2]), st.integers(0, 2**32 - 1))),
    )
    value = draw(st.sampled_from(["int", "double", None]))
    if value == "int":
        p.as_int = draw(I64)
    elif value == "double":
        p.as_double = draw(DOUBLES)
    unknown = draw(st.lists(UNKNOWN, max_size=2))
    if unknown:  # as a receiver gets them: parsed from the wire, kept, written back last
        p.MergeFromString(b"".join(field_bytes(*f) for f in unknown))
    return p


def same_value(decoded: int | float, p: Any) -> bool:
    which = p.WhichOneof("value")
    if which == "as_int":
        return type(decoded) is int and decoded == p.as_int
    if which == "as_double":
        return type(decoded) is float and struct.pack("<d", decoded) == struct.pack(
            "<d", p.as_double
        )
    return False


def identity_bytes(p: Any) -> bytes:
    """The point without what the codec decodes: attributes, flags and unknown fields."""
    q = NumberDataPoint()
    q.CopyFrom(p)
    for name in ("start_time_unix_nano", "time_unix_nano", "exemplars", "as_int", "as_double"):
        q.ClearField(name)
    return bytes(q.SerializeToString())


def check_agrees(raw: bytes, p: Any) -> None:
    """Whatever ``read_number_point`` returns with a series-key tail is what protobuf read."""
    decoded = read_number_point(raw)
    if decoded is None:
        return
    start, t, number, tail = decoded
    if not is_series_key(tail):
        return
    assert (start, t) == (p.start_time_unix_nano, p.time_unix_nano)
    assert t != 0
    assert same_value(number, p)
    rest = NumberDataPoint.FromString(tail)
    assert [kv.SerializeToString() for kv in rest.attributes] == [
        kv.SerializeToString() for kv in p.attributes
    ]
    assert rest.flags == p.flags


@SETTINGS
@given(points())
def test_reads_what_protobuf_reads(p: Any) -> None:
    raw = bytes(p.SerializeToString())
    decoded = read_number_point(raw)
    if not p.time_unix_nano or p.WhichOneof("value") is None:
        assert decoded is None  # protobuf's reading says what is missing
        return
    assert decoded is not None, raw.hex(" ")  # every layout upb writes is recognised
    start, t, number, tail = decoded
    assert (start, t) == (p.start_time_unix_nano, p.time_unix_nano)
    assert same_value(number, p)
    assert is_series_key(tail)
    assert tail == identity_bytes(p)  # equal tails: equal attributes and flags


# Mutations of a serialized point, mostly field by field (dropped, repeated, moved, added with
# any tag and wire type) so that protobuf still parses most of them, some byte by byte.
WIRE_PAYLOADS = st.one_of(
    st.tuples(st.just(0), st.integers(0, 2**64 - 1)),
    st.tuples(st.just(1), st.binary(min_size=8, max_size=8)),
    st.tuples(st.just(2), st.one_of(st.just(b""), st.binary(max_size=12))),
    st.tuples(st.just(5), st.binary(min_size=4, max_size=4)),
)
NEW_FIELDS = st.builds(
    lambda number, wire_payload: field_bytes(number, *wire_payload),
    st.one_of(st.integers(2, 8), st.integers(9, 300)),
    WIRE_PAYLOADS,
)
POSITIONS = st.integers(0, 1000)
MUTATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("drop"), POSITIONS, POSITIONS),
        st.tuples(st.just("repeat"), POSITIONS, POSITIONS),
        st.tuples(st.just("move"), POSITIONS, POSITIONS),
        st.tuples(st.just("add"), POSITIONS, NEW_FIELDS),
        st.tuples(st.just("byte"), POSITIONS, st.integers(0, 255)),
        st.tuples(st.just("truncate"), POSITIONS, POSITIONS),
    ),
    min_size=1,
    max_size=4,
)


def split_fields(raw: bytes) -> list[bytes]:
    """A well-formed message's top-level fields, each with its tag."""
    out, i = [], 0
    while i < len(raw):
        start = i
        key, i = read_varint(raw, i)
        wire = key & 7
        if wire == 0:
            i = read_varint(raw, i)[1]
        elif wire == 1:
            i += 8
        elif wire == 2:
            length, i = read_varint(raw, i)
            i += length
        else:
            assert wire == 5
            i += 4
        out.append(raw[start:i])
    return out


def read_varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i += 1
        shift += 7
        if byte < 0x80:
            return value, i


def mutate(raw: bytes, mutations: list[tuple[str, int, Any]]) -> bytes:
    fields = split_fields(raw)
    for kind, where, arg in mutations:
        at = where % (len(fields) + 1)
        if kind == "add":
            fields.insert(at, arg)
        elif kind == "truncate" or not fields:
            whole = b"".join(fields)
            fields = [whole[: where % (len(whole) + 1)]]
        elif kind == "byte":
            whole = bytearray(b"".join(fields))
            if whole:
                whole[where % len(whole)] = arg
            fields = [bytes(whole)]
        else:
            k = where % len(fields)
            field = fields.pop(k) if kind in ("drop", "move") else fields[k]
            if kind != "drop":
                fields.insert(arg % (len(fields) + 1), field)
    return b"".join(fields)


@SETTINGS
@given(points(), MUTATIONS)
def test_mangled_bytes_are_read_as_protobuf_reads_them_or_left_to_it(
    p: Any, mutations: list[tuple[str, int, Any]]
) -> None:
    raw = mutate(bytes(p.SerializeToString()), mutations)
    try:
        parsed = NumberDataPoint.FromString(raw)
    except DecodeError:
        read_number_point(raw)  # never raises
        return
    check_agrees(raw, parsed)  # the bytes as they came
    check_agrees(bytes(parsed.SerializeToString()), parsed)  # as the receiver sees them


def kv(key: str, value: Any) -> Any:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


@pytest.mark.parametrize(
    "first",
    [kv("a", 1), kv("x", True), kv("k", "")],
    ids=["int", "bool", "string"],
)
def test_a_first_attribute_of_nine_bytes_is_not_taken_for_the_usual_layout(first: Any) -> None:
    """Issue 13: without a start time the 28th byte can be the second attribute's tag."""
    p = NumberDataPoint(time_unix_nano=1_777_000_000_000_000_000, as_int=1000)
    p.attributes.extend([first, kv("tenant", "c3")])
    raw = bytes(p.SerializeToString())
    assert len(first.SerializeToString()) + 2 == 9
    assert raw[27] == 0x3A
    assert read_number_point(raw) == (0, p.time_unix_nano, 1000, identity_bytes(p))


def test_exemplar_bytes_that_look_like_the_usual_layout_are_not_taken_for_it() -> None:
    """No start time; byte 18 (an exemplar's asInt tag) and 27 (its attributes' tag) sit where
    the usual layout has the value's and the attributes' tags."""
    e = Exemplar(span_id=b"\x05" * 5, as_int=3)
    e.filtered_attributes.append(kv("q", 1))
    p = NumberDataPoint(time_unix_nano=1_777_000_000_000_000_000, as_int=9, exemplars=[e])
    p.attributes.append(kv("tenant", "c3"))
    raw = bytes(p.SerializeToString())
    assert (raw[0], raw[9], raw[18], raw[27]) == (0x19, 0x2A, 0x31, 0x3A)
    assert read_number_point(raw) == (0, p.time_unix_nano, 9, identity_bytes(p))


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x11", b"\x19" + bytes(7), b"\x2a\xff", b"\x2a\x05\x00", b"\x19" + bytes(8) + b"\x31"],
)
def test_short_and_broken_prefixes_are_left_to_protobuf(raw: bytes) -> None:
    assert read_number_point(raw) is None


@pytest.mark.parametrize(
    "tail",
    [
        b"\x3a\x00\x10\x01",  # startTimeUnixNano as a varint after the attributes
        b"\x3a\x00\x19" + bytes(8),  # a second timeUnixNano
        b"\x3a\x00\xb1\x00" + bytes(8),  # asInt behind an overlong tag
        b"\x3a\x00\x0b\x0c",  # a group
        b"\x3a\x05\x00",  # truncated
        b"\x40\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # an 11-byte varint
        b"\x00\x00",  # field 0
    ],
)
def test_tails_holding_decoded_fields_or_malformed_are_no_series_key(tail: bytes) -> None:
    assert not is_series_key(tail)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=30))
def test_a_series_key_holds_nothing_the_prefix_decodes(tail: bytes) -> None:
    if not is_series_key(tail):
        return
    try:
        rest = NumberDataPoint.FromString(tail)
    except DecodeError:  # the attributes inside may be garbage; their point is refused whole
        return
    assert not rest.start_time_unix_nano
    assert not rest.time_unix_nano
    assert rest.WhichOneof("value") is None
    assert not rest.exemplars
