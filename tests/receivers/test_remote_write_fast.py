"""Remote write's inline path for the usual sample (``RemoteWriteReceiver._scanned``) decodes
exactly what the general path (``observations``) does, on generated requests: the same running
totals (ordinal, time, exact value, series), levels, refusals, skips and sample count. And a
request's amounts of known series become, in one pass (``SeriesMappings.records``), exactly the
records ``SeriesMappings.record`` makes of each."""

from __future__ import annotations

import struct
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meter_gateway.catalog import Catalog
from meter_gateway.config import IngestConfig, Rule
from meter_gateway.model import SeriesMetadata, Source
from meter_gateway.pipeline.cumulative import SeriesMapping, SeriesMappings
from receivers import prompb
from receivers.remote_write import Decoded, RemoteWriteReceiver, observations

STALE = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000002))[0]
RULES = [
    Rule.model_validate({"match": {"source": "remote_write", "metric": m}, "dimension": "d"})
    for m in ("app_bytes_total", "app_storage_bytes", "jobs_count")
]
NAMES = ["app_bytes_total", "app_storage_bytes", "jobs_count", "unmapped_total", "", "jobs"]

values = st.one_of(
    st.integers(-(2**60), 2**60).map(float),  # whole numbers, some past 2**53
    st.floats(allow_nan=False),  # fractions, tiny and huge ones, infinities, -0.0
    st.sampled_from([float("nan"), STALE, 0.0, -0.0, 2.0**53, -(2.0**53), 1e21, 0.1]),
)
times = st.one_of(
    st.integers(1_600_000_000_000, 1_800_000_000_000),
    st.sampled_from([0, -1, 1, 2**63 // 1_000_000, 2**63 // 1_000_000 + 1, 2**63 - 1]),
)
series = st.tuples(
    st.sampled_from(NAMES),
    st.lists(st.sampled_from([("tenant", "a"), ("pod", "p1"), ("pod", "p2")]), max_size=3),
    st.lists(st.tuples(values, times), max_size=3),
)


def _request(spec: list[tuple[str, list[tuple[str, str]], list[tuple[float, int]]]]) -> bytes:
    req = prompb.WriteRequest()
    for name, labels, samples in spec:
        ts = req.timeseries.add()
        if name:
            ts.labels.add(name="__name__", value=name)
        for key, text in labels:
            ts.labels.add(name=key, value=text)
        for v, t in samples:
            ts.samples.add(value=v, timestamp=t)
    return bytes(req.SerializeToString())


def _receiver() -> RemoteWriteReceiver:
    none: Any = None
    return RemoteWriteReceiver(RULES, none, none, none, IngestConfig(), none, 1.0)


def _seen(d: Decoded) -> tuple[Any, ...]:
    totals = [(k, t, str(v), id(obs)) for k, t, v, obs in d.totals]  # str: exact digits too
    levels = [
        (o.name, o.attributes, str(o.value), o.kind, o.timestamp_ns, o.natural_key)
        for o in d.levels
    ]
    return (
        totals,
        d.total_sids,
        levels,
        d.level_index,
        d.level_sids,
        d.errors,
        d.skipped,
        d.samples,
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(series, max_size=8))
def test_the_inline_path_decodes_as_the_general_one(
    spec: list[tuple[str, list[tuple[str, str]], list[tuple[float, int]]]],
) -> None:
    rw = _receiver()
    raw = _request(spec)
    for _ in range(2):  # unknown series first, then known ones (read from their end)
        scan = prompb.scan(raw, rw.series.known)
        assert scan is not None
        scanned, n = scan
        fast = rw._scanned(scanned, None, None)
        get, samples = rw.series.get, prompb.samples_of
        general = observations(((get(s[0]), samples(s), 0) for s in scanned), set(), set())
        assert n == general.samples
        assert _seen(fast) == _seen(general)


# --- amounts of known series as records in one pass (SeriesMappings.records) ------------------

_CATALOG, _OLD_CATALOG = Catalog(), Catalog()
_NOW = 1_750_000_000 * 10**9
_SIDS = ["a" * 32, "b" * 32, "c" * 32, "d" * 32]


class _Clock:
    def now_ns(self) -> int:
        return _NOW


def _mappings() -> SeriesMappings:
    none: Any = None
    m = SeriesMappings(Source.REMOTE_WRITE, none, lambda: _CATALOG, _Clock(), IngestConfig())
    meta = SeriesMetadata(job="j")
    m._known.update(
        {
            _SIDS[0]: SeriesMapping(_CATALOG.serial, "c1", "d", None, meta, None),
            _SIDS[1]: SeriesMapping(_CATALOG.serial, "c2", "d", Decimal("1e-9"), meta, "u"),
            _SIDS[2]: SeriesMapping(_OLD_CATALOG.serial, "c3", "d", None, meta, None),
        }
    )
    return m


amounts = st.lists(
    st.tuples(
        st.sampled_from(_SIDS),
        st.one_of(
            st.integers(-5, 2**60).map(Decimal),
            st.decimals(allow_nan=False, allow_infinity=False, places=18),
            st.sampled_from([Decimal("1e21"), Decimal("-0"), Decimal("0.1")]),
        ),
        st.sampled_from(
            [_NOW, _NOW - 10**9, _NOW + 4 * 60 * 10**9, _NOW + 6 * 60 * 10**9, 1, -1, 2**63 - 1]
        ),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(amounts)
def test_records_in_one_pass_are_record_by_record(given: list[tuple[str, Decimal, int]]) -> None:
    m = _mappings()
    snap = m.snapshot()
    items: list[Any] = [(sid, v, t, i, None) for i, (sid, v, t) in enumerate(given)]
    made: list[Any] = []
    left = m.records(snap, items, made)
    one_by_one = [(a, m.record(snap, a[0], a[1], a[2])) for a in items]
    assert made == [r for _, r in one_by_one if r is not None]
    assert left == [a for a, r in one_by_one if r is None]


@settings(max_examples=300, deadline=None)
@given(st.lists(series, max_size=8))
def test_scan_reads_what_the_messages_hold(
    spec: list[tuple[str, list[tuple[str, str]], list[tuple[float, int]]]],
) -> None:
    """Unknown labels first (walked), then known (a one-sample series read from its end, with
    the last sample's length or by its timestamp tag), as protobuf parses the request."""
    raw = _request(spec)
    req = prompb.WriteRequest.FromString(raw)
    want = [
        (
            b"".join(prompb.TimeSeries(labels=[lb]).SerializeToString() for lb in ts.labels),
            [(s.value, s.timestamp) for s in ts.samples],
        )
        for ts in req.timeseries
    ]
    known: set[bytes] = set()
    for _ in range(2):
        scan = prompb.scan(raw, known)
        assert scan is not None
        scanned, n = scan
        got = [(s[0], prompb.samples_of(s)) for s in scanned]
        # (NaN != NaN: compare the values' bits)
        assert [(lb, [(struct.pack("<d", v), t) for v, t in m]) for lb, m in got] == [
            (lb, [(struct.pack("<d", v), t) for v, t in m]) for lb, m in want
        ]
        assert n == sum(len(m) for _, m in want)
        known = {lb for lb, _ in want}
