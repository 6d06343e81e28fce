"""Prometheus remote-write 1.0 messages (``prompb``: ``WriteRequest``, ``TimeSeries``, ``Label``,
``Sample``, ``MetricMetadata``), built at import from a descriptor written out here.

No Python package ships these messages; this is the subset of ``prompb/remote.proto`` and
``prompb/types.proto`` the gateway reads (exemplars and native histograms are kept as fields
so they parse, and are ignored). Field numbers and types are the spec's; parsing runs in the
protobuf runtime's C implementation.
"""

from __future__ import annotations

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
