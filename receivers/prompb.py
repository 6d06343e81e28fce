"""Prometheus remote-write 1.0 messages (``prompb``: ``WriteRequest``, ``TimeSeries``, ``Label``,
``Sample``, ``MetricMetadata``), built at import from a descriptor written out here.

No Python package ships these messages; this is the subset of ``prompb/remote.proto`` and
``prompb/types.proto`` the gateway reads (exemplars and native histograms are kept as fields
so they parse, and are ignored). Field numbers and types are the spec's; parsing runs in the
protobuf runtime's C implementation.
"""

from __future__ import annotations

import struct
from collections.abc import Container
from typing import Any

from google.protobuf import (  # type: ignore[import-untyped]
    descriptor_pb2,
    descriptor_pool,
    message_factory,
)

_F = descriptor_pb2.FieldDescriptorProto

# (message, [(field, number, type, label, type_name)])
_MESSAGES: list[tuple[str, list[tuple[str, int, int, int, str]]]] = [
    (
        "WriteRequest",
        [
            ("timeseries", 1, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, ".prompb.TimeSeries"),
            ("metadata", 3, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, ".prompb.MetricMetadata"),
        ],
    ),
    (
        "MetricMetadata",
        [
            ("type", 1, _F.TYPE_INT32, _F.LABEL_OPTIONAL, ""),
            ("metric_family_name", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
            ("help", 4, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
            ("unit", 5, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ],
    ),
    (
        "Sample",
        [
            ("value", 1, _F.TYPE_DOUBLE, _F.LABEL_OPTIONAL, ""),
            ("timestamp", 2, _F.TYPE_INT64, _F.LABEL_OPTIONAL, ""),
        ],
    ),
    (
        "Exemplar",
        [
            ("labels", 1, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, ".prompb.Label"),
            ("value", 2, _F.TYPE_DOUBLE, _F.LABEL_OPTIONAL, ""),
            ("timestamp", 3, _F.TYPE_INT64, _F.LABEL_OPTIONAL, ""),
        ],
    ),
    (
        "TimeSeries",
        [
            ("labels", 1, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, ".prompb.Label"),
            ("samples", 2, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, ".prompb.Sample"),
            ("exemplars", 3, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, ".prompb.Exemplar"),
            # Native histograms: parsed as opaque bytes, never used.
            ("histograms", 4, _F.TYPE_BYTES, _F.LABEL_REPEATED, ""),
        ],
    ),
    (
        "Label",
        [
            ("name", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
            ("value", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ],
    ),
]

# MetricMetadata.MetricType values
COUNTER = 1
GAUGE = 2


def _build() -> dict[str, Any]:
    fd = descriptor_pb2.FileDescriptorProto(
        name="meter_gateway_prompb.proto", package="prompb", syntax="proto3"
    )
    for name, fields in _MESSAGES:
        msg = fd.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            f = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"prompb.{name}"))
        for name, _ in _MESSAGES
    }


_CLASSES = _build()
WriteRequest: Any = _CLASSES["WriteRequest"]
TimeSeries: Any = _CLASSES["TimeSeries"]
Label: Any = _CLASSES["Label"]
Sample: Any = _CLASSES["Sample"]
MetricMetadata: Any = _CLASSES["MetricMetadata"]


# --- reading a WriteRequest without building messages ------------------------------------------
#
# A request's series repeat from one request to the next: the bytes of a series' labels name it.
# ``scan`` walks the wire format of the usual request (only timeseries, each its labels then its
# samples, a sample its value then its timestamp, as Prometheus and Vector write them) and gives
# each series' label bytes and samples, so the receiver looks a known series up by its bytes and
# reads nothing else of it. Anything else (metadata, exemplars, histograms, other field orders)
# gives None, and the request is parsed as messages instead. Lengths are checked as they are
# read; a known series' label bytes are the exact bytes that parsed (and were UTF-8) before.

_TIMESERIES = 0x0A  # WriteRequest.timeseries: field 1, length-delimited
_LABEL = 0x0A  # TimeSeries.labels: field 1, length-delimited
_SAMPLE = 0x12  # TimeSeries.samples: field 2, length-delimited
_VALUE = 0x09  # Sample.value: field 1, 64-bit
_TIMESTAMP = 0x10  # Sample.timestamp: field 2, varint
_DOUBLE = struct.Struct("<d")
_INT64 = 1 << 64


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it (``IndexError`` past the end)."""
    b = raw[pos]
    if b < 0x80:
        return b, pos + 1
    result, shift = b & 0x7F, 7
    while True:
        pos += 1
        b = raw[pos]
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos + 1
        shift += 7
        if shift > 63:
            raise IndexError("varint longer than 10 bytes")


# A scanned series: (label bytes, value, timestamp ms, None) when it has one sample (the usual
# series: one tuple, no list), else (label bytes, 0.0, 0, [(value, timestamp ms), ...]).
ScannedSeries = tuple[bytes, float, int, list[tuple[float, int]] | None]
Scanned = list[ScannedSeries]


def samples_of(series: ScannedSeries) -> list[tuple[float, int]]:
    """A scanned series' samples as [(value, timestamp ms)]."""
    _, value, t, more = series
    return [(value, t)] if more is None else more


def scan(raw: bytes, known: Container[bytes] = ()) -> tuple[Scanned, int] | None:
    """Each series of a serialized ``WriteRequest`` (``ScannedSeries``) and how many samples
    they hold, or None when the request is not in the usual layout (parse it as messages then).

    ``known``: label bytes seen before. A series of one sample (value, then timestamp) is
    read from its end: the bytes before that sample are its labels if they are ``known``,
    which were a sequence of labels only when they were learned (a sample's tag cannot start
    a label, so no other split of the series can give known bytes); else it is walked from
    its start.
    """
    out: Scanned = []
    end_all = len(raw)
    times: dict[bytes, int] = {}  # a request's samples share few timestamps
    unpack = _DOUBLE.unpack_from
    rfind = raw.rfind
    append = out.append
    extra = 0  # samples past each series' first (a series without samples: -1)
    last = 0  # bytes from the last one-sample series' sample to its end
    pos = 0
    try:
        while pos < end_all:
            if raw[pos] != _TIMESERIES:
                return None
            length = raw[pos + 1]
            if length < 0x80:  # the usual series: shorter than 128 bytes
                pos += 2
            else:
                length, pos = _varint(raw, pos + 1)
            end = pos + length
            if end > end_all:
                return None
            # One sample at the end, as long as the last one read (a request's samples share
            # their times' varint length): a known time's bytes are one whole varint.
            s = end - last
            if (
                last
                and s > pos
                and raw[s] == _SAMPLE
                and raw[s + 1] == last - 2
                and raw[s + 2] == _VALUE
                and raw[s + 11] == _TIMESTAMP
                and (got := times.get(raw[s + 12 : end])) is not None
                and (labels := raw[pos:s]) in known
            ):
                append((labels, unpack(raw, s + 3)[0], got, None))
                pos = end
                continue
            # One sample at the end: tag, length, value (9 bytes), timestamp tag, varint (the
            # varint's bytes but its last have the high bit set, so its tag is the last 0x10).
            tag = rfind(b"\x10", end - 11, end - 1)
            s = tag - 11
            if (
                s > pos
                and raw[s] == _SAMPLE
                and raw[s + 1] == end - s - 2
                and raw[s + 2] == _VALUE
                and (labels := raw[pos:s]) in known  # (bytes keep their hash: for the caller)
            ):
                key = raw[tag + 1 : end]
                got = times.get(key)
                if got is None:
                    got, after = _varint(raw, tag + 1)
                    if after != end:
                        return None
                    if got >= 1 << 63:
                        got -= _INT64
                    times[key] = got
                append((labels, unpack(raw, s + 3)[0], got, None))
                last = end - s
                pos = end
                continue
            p = pos
            while p < end and raw[p] == _LABEL:
                n = raw[p + 1]
                p = p + 2 + n if n < 0x80 else sum(_varint(raw, p + 1))
            if p > end:
                return None
            labels = raw[pos:p]
            samples: list[tuple[float, int]] = []
            while p < end:
                if raw[p] != _SAMPLE:
                    return None
                n, s = _varint(raw, p + 1)
                e = s + n
                if e > end:
                    return None
                value = 0.0
                if s < e and raw[s] == _VALUE:
                    if s + 9 > e:
                        return None
                    value = unpack(raw, s + 1)[0]
                    s += 9
                t = 0
                if s < e:
                    if raw[s] != _TIMESTAMP:
                        return None
                    key = raw[s + 1 : e]
                    got = times.get(key)
                    if got is None:
                        t, after = _varint(raw, s + 1)
                        if after != e:
                            return None
                        if t >= 1 << 63:
                            t -= _INT64
                        times[key] = t
                    else:
                        t = got
                samples.append((value, t))
                p = e
            if len(samples) == 1:
                append((labels, *samples[0], None))
            else:
                append((labels, 0.0, 0, samples))
                extra += len(samples) - 1
            pos = end
    except IndexError:
        return None
    return out, len(out) + extra
