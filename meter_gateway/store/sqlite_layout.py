"""The SQLite store's one-statement apply: the row layouts and the SQL that reads them.

A group's records, rollups and receiver state reach SQLite as JSON arrays (a record's integers
as fixed-width text) that the ``INSTEAD OF`` trigger of a TEMP view reads by position. Each row
kind's fields are named once here, in row order; the trigger's SQL is generated from those names
and the builders below fill rows in the same order, so no other code writes a position
(tests/store/test_sqlite_layout.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from operator import attrgetter
from typing import Any, NamedTuple

import orjson

from meter_gateway.model import SeriesMetadata, UsageRecord
from meter_gateway.store.base import RollupKey, RollupRow

# Record rows come in three parts. Their times and their ids as fixed-width decimal text, one
# blob each (``times``, ``ids``), read with substr at the row's offset. The rest in a JSON array
# (``records``) that drives the insert: a row's value alone (narrow rows, the usual group), or
# RECORD_WIDE when the rows carry their own id and metadata or their own source (a shared
# source comes with the group, as do seq and receive time). A record's customer and dimension
# are its series' (the ``series`` row, inserted before).
# SQLite 3.40 parses a row again for every ``->>`` (about 0.5 us each, no JSON cache): six
# fields read from a row array took 3.7 us a record, the value and substr of two blobs 0.6.
# Times are a JSON array of integers, as orjson writes them fast, when their digits are equally
# many (a time since 2001 has 19: ``times_at`` 2), else %020d each (``times_at`` 1). Ids are
# %012d each, formatted once per (series, metadata) pair and remembered (``record_rows``).
RECORD_WIDE = ("value", "record_id", "metadata", "source")
RECORD_IDS = ("series", "meta_id")  # meta_id 0: none
_ID_WIDTH = 12
MAX_ID = 10**_ID_WIDTH - 1
_IDS_FORMAT = f"%0{_ID_WIDTH}d".encode() * len(RECORD_IDS)
_TIME_WIDTH = 20  # a time's stride in ``times``: 19 digits and a comma, or %020d
_ORJSON_TIMES = range(10**18, 1 << 63)  # 19 digits each
_INT64 = range(-(1 << 63), 1 << 63)
_TIME = attrgetter("timestamp_ns")
# Rollup rows, one per (customer, dimension, bucket): the columns of ``rollups``.
ROLLUP = (
    "customer",
    "dimension",
    "bucket",
    "count",
    "sum",
    "min",
    "max",
    "last_ts",
    "last_seq",
    "last_value",
    "wsum",
)
# Distinct-value rows (unique_count), one per (customer, dimension, bucket, value) of a group:
# the columns of ``rollup_distinct``.
DISTINCT = ("customer", "dimension", "bucket", "value")
# Receiver state rows whose value is ASCII (JSON text); other values are bound as blobs.
STATE = ("key", "value")

# Record rows come wrapped in one more array ([[row, ...]]): a record's metadata is then nested
# store.base.PAGE_NESTING levels down, so orjson refuses what no page could list.
RECORDS_PATH = "$[0]"


class ApplyParams(NamedTuple):
    """One group's parameters of ``APPLY``: the columns of the ``apply_group`` view."""

    records: bytes | None  # record rows (values, or RECORD_WIDE), wrapped at RECORDS_PATH
    times: bytes | None  # the rows' times (the layout is described above RECORD_WIDE)
    times_at: int  # where the first time's digits start in ``times`` (1-based)
    ids: bytes | None  # the rows' RECORD_IDS, _ID_WIDTH digits each
    first_seq: int  # seq of the first record row; the others follow
    received_ns: int
    full: bool  # record rows carry their own record_id and metadata (RECORD_WIDE)
    source: str | None  # every record's, when they share one (else each row's, RECORD_WIDE)
    seen_s: int  # of the dedup keys
    dedup_keys: bytes | None  # one blob of a dedup_log row
    rollups: bytes | None  # rollup rows (ROLLUP)
    distinct_values: bytes | None  # distinct-value rows (DISTINCT)
    state: bytes | None  # receiver state rows (STATE)
    gone: bytes | None  # receiver state keys to delete


def _at(layout: Sequence[str], name: str, cast: bool = False, row: str = "value") -> str:
    """The SQL reading field ``name`` of a ``json_each`` row (its column ``row``) laid out as
    ``layout``; ``cast`` for a blob column (``->>`` gives text, as orjson.dumps or the
    receiver wrote it)."""
    get = f"{row}->>{layout.index(name)}"
    return f"CAST({get} AS BLOB)" if cast else get


def _time() -> str:
    """The SQL reading the time of the row at ``j.key`` (a blob's substr counts bytes: no
    scan to the offset, as a text's would)."""
    at = f"j.key * {_TIME_WIDTH} + NEW.times_at"
    return f"CAST(substr(NEW.times, {at}, {_TIME_WIDTH + 1} - NEW.times_at) AS INTEGER)"


def _id(name: str) -> str:
    """The SQL reading RECORD_IDS field ``name`` of the row at ``j.key``."""
    at = f"(j.key * {len(RECORD_IDS)} + {RECORD_IDS.index(name)}) * {_ID_WIDTH} + 1"
    return f"CAST(substr(NEW.ids, {at}, {_ID_WIDTH}) AS INTEGER)"


def _wide(name: str, cast: bool = False) -> str:
    """The SQL reading RECORD_WIDE field ``name`` of the row ``j``."""
    return _at(RECORD_WIDE, name, cast, row="j.value")


_WIDE = "(NEW.full OR NEW.source IS NULL)"
_RECORD_READS = {
    "ts": _time(),
    "customer": "s.customer",
    "dimension": "s.dimension",
    "value": f"CASE WHEN {_WIDE} THEN {_wide('value')} ELSE j.atom END",
    "meta_id": f"nullif({_id('meta_id')}, 0)",
    "series": "s.id",
    "record_id": f"CASE WHEN NEW.full THEN {_wide('record_id')} END",
    "metadata": f"CASE WHEN NEW.full THEN {_wide('metadata', cast=True)} END",
    "source": f"coalesce(NEW.source, {_wide('source')})",
}

APPLY_VIEW = (
    f"CREATE TEMP VIEW apply_group ({', '.join(ApplyParams._fields)}) AS SELECT "
    + ", ".join("NULL" for _ in ApplyParams._fields)
)
APPLY_TRIGGER = f"""
CREATE TEMP TRIGGER apply_group_insert INSTEAD OF INSERT ON apply_group BEGIN
    INSERT INTO records (seq, {", ".join(_RECORD_READS)}, received_ns)
    SELECT NEW.first_seq + j.key, {", ".join(_RECORD_READS.values())}, NEW.received_ns
    FROM json_each(NEW.records, '{RECORDS_PATH}') j
        LEFT JOIN series s ON s.id = {_id("series")};
    INSERT INTO dedup_log (seen_s, keys) SELECT NEW.seen_s, NEW.dedup_keys
        WHERE NEW.dedup_keys IS NOT NULL;
    INSERT OR REPLACE INTO rollups ({", ".join(ROLLUP)})
        SELECT {", ".join(_at(ROLLUP, n) for n in ROLLUP)}
        FROM json_each(NEW.rollups);
    INSERT OR IGNORE INTO rollup_distinct ({", ".join(DISTINCT)})
        SELECT {", ".join(_at(DISTINCT, n) for n in DISTINCT)}
        FROM json_each(NEW.distinct_values);
    INSERT OR REPLACE INTO receiver_state ({", ".join(STATE)})
        SELECT {_at(STATE, "key")}, {_at(STATE, "value", cast=True)}
        FROM json_each(NEW.state);
    DELETE FROM receiver_state WHERE key IN (SELECT value FROM json_each(NEW.gone));
END"""
APPLY = f"INSERT INTO apply_group VALUES ({', '.join('?' for _ in ApplyParams._fields)})"


# --- the builders: rows in the order named above ------------------------------------------------


def record_rows(
    records: Sequence[UsageRecord],
    values: list[str],
    meta_ids: Iterable[int | None],
    series: Iterable[int],
    full: bool,
    shared_source: bool,
    pieces: dict[tuple[int, int | None], bytes] | None = None,
) -> tuple[bytes, bytes, int, bytes]:
    """The record rows of a group as ``APPLY`` takes them: ``records``, ``times``, ``times_at``
    and ``ids``. Rows are narrow (the value alone) unless ``full`` or the rows do not share a
    source (RECORD_WIDE). ``ValueError`` for a time outside int64 or an id above MAX_ID.
    ``pieces``: the ids' text by (series, metadata id), kept by the caller from group to group
    (a remote-write group's 2,000 records have as many metadata ids), filled in here."""
    ts = list(map(_TIME, records))
    lo, hi = (min(ts), max(ts)) if ts else (10**18, 10**18)
    if lo in _ORJSON_TIMES and hi in _ORJSON_TIMES:
        times, times_at = orjson.dumps(ts), 2
    elif lo in _INT64 and hi in _INT64:
        times, times_at = b"%020d" * len(ts) % tuple(ts), 1
    else:
        raise ValueError("a timestamp is outside the 64-bit nanosecond range")
    pairs = list(zip(series, meta_ids, strict=True))
    if pieces is None:
        pieces = {}
    got = list(map(pieces.get, pairs))
    if None in got:
        for i in [i for i, piece in enumerate(got) if piece is None]:
            sid, mid = pair = pairs[i]
            if not (0 <= sid <= MAX_ID and 0 <= (mid or 0) <= MAX_ID):
                raise ValueError(f"a series or metadata id is outside 0..{MAX_ID}")
            got[i] = pieces[pair] = _IDS_FORMAT % (sid, mid or 0)
    ids = b"".join(got)  # type: ignore[arg-type]
    if full:
        rows: list[Any] = [
            (
                v,
                r.record_id,
                None if type(r.metadata) is SeriesMetadata else r.metadata or None,
                None if shared_source else r.source,
            )
            for r, v in zip(records, values, strict=True)
        ]
    elif not shared_source:
        rows = [(v, None, None, r.source) for r, v in zip(records, values, strict=True)]
    else:
        rows = values
    return orjson.dumps((rows,), default=str), times, times_at, ids


def rollups_json(merged: Mapping[RollupKey, RollupRow]) -> bytes:
    """Rollup rows (ROLLUP) as ``APPLY`` takes them; decimals as exact text. A row of one
    record (most rows of a group) has one value for its sum, min, max and last value: written
    once (the rows hold the same ``Decimal``)."""
    rows = []
    for (c, d, _), row in merged.items():
        s = row.sum
        text = str(s)
        mn, mx, last = row.min, row.max, row.last_value
        rows.append(
            (
                c,
                d,
                row.bucket_ns,
                row.count,
                text,
                text if mn is s else str(mn),
                text if mx is s else str(mx),
                row.last_ts,
                row.last_seq,
                text if last is s else str(last),
                str(row.wsum),
            )
        )
    return orjson.dumps(rows)


def state_rows(state: Mapping[str, bytes | None]) -> list[tuple[str, str]]:
    """Receiver state rows (STATE) of the values that are ASCII; the others are bound as blobs
    and the None ones deleted (``gone``)."""
    return [(k, v.decode()) for k, v in state.items() if v is not None and v.isascii()]
