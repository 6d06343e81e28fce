"""The SQLite store's one-statement apply: the JSON row layouts and the SQL that reads them.

A group's records, rollups and receiver state reach SQLite as JSON arrays that the ``INSTEAD OF``
trigger of a TEMP view reads by position (``value->>N``). Each row kind's fields are named once
here, in row order; the trigger's SQL is generated from those names and the builders below fill
rows in the same order, so no other code writes a position (tests/store/test_sqlite_layout.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import orjson

from meter_gateway.model import SeriesMetadata, UsageRecord
from meter_gateway.store.base import RollupKey, RollupRow

# Record rows: what every record has, then its own id and metadata when the group has any
# (``full``), then its source when the group's records do not share one. Names are columns of
# ``records``. Rows carry only what varies: seq, receive time and a shared source come with the
# group, because SQLite 3.40 parses a row again for every ``->>`` (no JSON cache).
RECORD = ("ts", "customer", "dimension", "value", "meta_id", "series")
RECORD_OWN = ("record_id", "metadata")
RECORD_SOURCE = "source"
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

    records: bytes | None  # record rows (RECORD...), wrapped at RECORDS_PATH
    first_seq: int  # seq of the first record row; the others follow
    received_ns: int
    full: bool  # record rows carry RECORD_OWN
    source: str | None  # every record's, when they share one (else each row's RECORD_SOURCE)
    seen_s: int  # of the dedup keys
    dedup_keys: bytes | None  # one blob of a dedup_log row
    rollups: bytes | None  # rollup rows (ROLLUP)
    distinct_values: bytes | None  # distinct-value rows (DISTINCT)
    state: bytes | None  # receiver state rows (STATE)
    gone: bytes | None  # receiver state keys to delete


def _at(layout: Sequence[str], name: str, cast: bool = False) -> str:
    """The SQL reading field ``name`` of a ``json_each`` row laid out as ``layout``; ``cast``
    for a blob column (``->>`` gives text, as orjson.dumps or the receiver wrote it)."""
    get = f"value->>{layout.index(name)}"
    return f"CAST({get} AS BLOB)" if cast else get


_RECORD_FULL = (*RECORD, *RECORD_OWN)
_RECORD_READS = ", ".join(_at(RECORD, n) for n in RECORD)
_OWN_READS = ", ".join(
    f"CASE WHEN NEW.full THEN {_at(_RECORD_FULL, n, cast=n == 'metadata')} END" for n in RECORD_OWN
)
_SOURCE_READ = (
    f"coalesce(NEW.source, value->>(CASE WHEN NEW.full THEN {len(_RECORD_FULL)} "
    f"ELSE {len(RECORD)} END))"
)

APPLY_VIEW = (
    f"CREATE TEMP VIEW apply_group ({', '.join(ApplyParams._fields)}) AS SELECT "
    + ", ".join("NULL" for _ in ApplyParams._fields)
)
APPLY_TRIGGER = f"""
CREATE TEMP TRIGGER apply_group_insert INSTEAD OF INSERT ON apply_group BEGIN
    INSERT INTO records (seq, {", ".join(_RECORD_FULL)}, {RECORD_SOURCE}, received_ns)
    SELECT NEW.first_seq + key, {_RECORD_READS},
        {_OWN_READS},
        {_SOURCE_READ},
        NEW.received_ns
    FROM json_each(NEW.records, '{RECORDS_PATH}');
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
    values: Iterable[str],
    meta_ids: Iterable[int | None],
    series: Iterable[int],
    full: bool,
    shared_source: bool,
) -> list[tuple[Any, ...]]:
    """The record rows of a group: RECORD, then RECORD_OWN if ``full``, then RECORD_SOURCE
    unless the group's records share one source."""
    if full and shared_source:  # the usual REST group: one pass
        return [
            (
                r.timestamp_ns,  # RECORD
                r.customer_id,
                r.dimension_id,
                v,
                mid,
                sid,
                r.record_id,  # RECORD_OWN
                None if type(r.metadata) is SeriesMetadata else r.metadata or None,
            )
            for r, v, mid, sid in zip(records, values, meta_ids, series, strict=True)
        ]
    rows: list[tuple[Any, ...]] = [
        (r.timestamp_ns, r.customer_id, r.dimension_id, v, mid, sid)  # RECORD
        for r, v, mid, sid in zip(records, values, meta_ids, series, strict=True)
    ]
    if full:
        rows = [
            (
                *row,
                r.record_id,  # RECORD_OWN
                None if type(r.metadata) is SeriesMetadata else r.metadata or None,
            )
            for row, r in zip(rows, records, strict=True)
        ]
    if not shared_source:
        rows = [(*row, r.source) for row, r in zip(rows, records, strict=True)]  # RECORD_SOURCE
    return rows


def records_json(rows: list[tuple[Any, ...]]) -> bytes:
    """Record rows as ``APPLY`` takes them (wrapped: see RECORDS_PATH)."""
    return orjson.dumps((rows,), default=str)


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
