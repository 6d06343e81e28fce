"""Reading an OTLP ``NumberDataPoint`` from its bytes: the fast path of the OTLP receiver.

Every byte offset and field tag the receiver relies on lives here. ``read_number_point`` takes a
point as upb serializes it and returns its start time, time, value and *tail* (the bytes from
its attributes on), or ``None`` for any layout it does not recognise, and the caller then reads
the point with protobuf. ``is_series_key`` says whether a tail may stand for the point's
attributes and flags; when it does, the decoded fields are exactly protobuf's
(tests/receivers/test_otlp_codec.py holds both to protobuf's decoding).

upb writes known fields in field-number order and unknown fields last, so a point usually reads
``startTimeUnixNano`` (2), ``timeUnixNano`` (3), ``asDouble`` (4), ``exemplars`` (5),
``asInt`` (6), then ``attributes`` (7), ``flags`` (8) and unknown fields: everything that tells
one series from another comes after the fields this module decodes.
"""

from __future__ import annotations

import struct

# Tags: field number << 3 | wire type (1: 64-bit, 2: length-delimited).
START_TIME = 0x11  # startTimeUnixNano, fixed64
TIME = 0x19  # timeUnixNano, fixed64
AS_DOUBLE = 0x21  # asDouble, double
EXEMPLARS = 0x2A  # exemplars, repeated message
AS_INT = 0x31  # asInt, sfixed64
ATTRIBUTES = 0x3A  # attributes, repeated KeyValue
# Field numbers the decoded prefix covers; a tail holding any of them cannot be a series key.
DECODED_FIELDS = frozenset((2, 3, 4, 5, 6))

FIXED64_FIELD = 9  # a one-byte tag and 8 bytes
# The usual layout: start, time and value, each a fixed64 field, then the attributes.
USUAL_VALUE_TAG_AT = 2 * FIXED64_FIELD  # 18
USUAL_TAIL_AT = 3 * FIXED64_FIELD  # 27
_ATTRIBUTES_BYTE = bytes((ATTRIBUTES,))

_USUAL_INT = struct.Struct("<xQxQxq").unpack_from
_USUAL_DOUBLE = struct.Struct("<xQxQxd").unpack_from
_U64 = struct.Struct("<Q").unpack_from
_I64 = struct.Struct("<q").unpack_from
_F64 = struct.Struct("<d").unpack_from

WIRE_VARINT, WIRE_I64, WIRE_LEN, WIRE_I32 = 0, 1, 2, 5
_MAX_VARINT_BYTES = 10

NumberPoint = tuple[int, int, int | float, bytes]  # start, time, value, tail


def read_number_point(raw: bytes) -> NumberPoint | None:
    """(start, time, value, tail) of a serialized ``NumberDataPoint``, or ``None``.

    ``value`` is an ``int`` for ``asInt`` and a ``float`` for ``asDouble``; an unset start
    time reads 0. ``None`` when the point has no time or no value, or its fields are not in a
    layout read here: the caller decodes such points with protobuf, which says what is wrong.
    """
    if (
        raw[USUAL_TAIL_AT : USUAL_TAIL_AT + 1] == _ATTRIBUTES_BYTE
        and raw[0] == START_TIME
        and raw[FIXED64_FIELD] == TIME
    ):
        value_tag = raw[USUAL_VALUE_TAG_AT]
        number: int | float
        if value_tag == AS_INT:
            start, t, number = _USUAL_INT(raw)
        elif value_tag == AS_DOUBLE:
            start, t, number = _USUAL_DOUBLE(raw)
        else:
            return _read_in_any_order(raw)
        return (start, t, number, raw[USUAL_TAIL_AT:]) if t else None
    return _read_in_any_order(raw)


def _read_in_any_order(raw: bytes) -> NumberPoint | None:
    """The prefix of fixed64 fields and exemplars in whatever order (last one wins, as in
    protobuf), up to the first other field."""
    start = t = 0
    number: int | float | None = None
    i, n = 0, len(raw)
    while i < n:
        tag = raw[i]
        if tag == EXEMPLARS:
            length, i = _varint(raw, i + 1)
            if length < 0:
                return None
            i += length
            if i > n:
                return None
            continue
        if tag not in (START_TIME, TIME, AS_DOUBLE, AS_INT):
            break
        if i + FIXED64_FIELD > n:
            return None
        if tag == START_TIME:
            start = _U64(raw, i + 1)[0]
        elif tag == TIME:
            t = _U64(raw, i + 1)[0]
        elif tag == AS_INT:
            number = _I64(raw, i + 1)[0]
        else:
            number = _F64(raw, i + 1)[0]
        i += FIXED64_FIELD
    if not t or number is None:
        return None
    return start, t, number, raw[i:]


def is_series_key(tail: bytes) -> bool:
    """Whether ``tail`` (from ``read_number_point``) holds none of the decoded fields, so that
    equal tails mean equal attributes and flags and the tail can key the point's series.

    False for anything malformed or unusual (groups, fields 2-6 out of place): such points
    are then always read with protobuf.
    """
    i, n = 0, len(tail)
    while i < n:
        key, i = _varint(tail, i)
        if key < 8 or (key >> 3) in DECODED_FIELDS:  # field 0 is no field
            return False
        wire = key & 7
        if wire == WIRE_LEN:
            length, i = _varint(tail, i)
            if length < 0:
                return False
            i += length
        elif wire == WIRE_VARINT:
            _, i = _varint(tail, i)
            if i < 0:
                return False
        elif wire == WIRE_I64:
            i += 8
        elif wire == WIRE_I32:
            i += 4
        else:  # groups and invalid wire types
            return False
    return i == n


def _varint(data: bytes, i: int) -> tuple[int, int]:
    """(value, index after it); (-1, -1) when truncated or longer than 10 bytes."""
    value = shift = 0
    end = min(len(data), i + _MAX_VARINT_BYTES)
    while i < end:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return value, i
        shift += 7
    return -1, -1
