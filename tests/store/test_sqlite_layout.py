"""store.sqlite_layout: the rows its builders make are what its generated trigger reads.

Each row kind is built with a distinct sentinel in every field, applied through the trigger
into a fresh database, and every column is read back by the name the layout gives it; a field
built in one position and read from another lands in the wrong column and fails here.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from meter_gateway.model import Source, UsageRecord
from meter_gateway.store.base import RollupRow
from meter_gateway.store.sqlite import MIGRATIONS
from meter_gateway.store.sqlite_layout import (
    APPLY,
    APPLY_TRIGGER,
    APPLY_VIEW,
    DISTINCT,
    RECORD,
    RECORD_OWN,
    RECORD_SOURCE,
    ROLLUP,
    STATE,
    ApplyParams,
    record_rows,
    records_json,
    rollups_json,
    state_rows,
)

FIRST_SEQ = 70_001
RECEIVED_NS = 80_002


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(tmp_path / "layout.db", isolation_level=None)
    for script in MIGRATIONS:
        conn.executescript(script)
    conn.execute(APPLY_VIEW)
    conn.execute(APPLY_TRIGGER)
    yield conn
    conn.close()


def apply(conn: sqlite3.Connection, **given: Any) -> None:
    params: dict[str, Any] = dict.fromkeys(ApplyParams._fields)
    params.update(first_seq=FIRST_SEQ, received_ns=RECEIVED_NS, full=False, seen_s=1)
    params.update(given)
    conn.execute(APPLY, ApplyParams(**params))


def read(conn: sqlite3.Connection, table: str, names: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = conn.execute(f"SELECT {', '.join(names)} FROM {table}").fetchall()
    return [dict(zip(names, row, strict=True)) for row in rows]


@pytest.mark.parametrize("full", [False, True], ids=["short", "full"])
@pytest.mark.parametrize("shared_source", [True, False], ids=["shared-source", "own-source"])
def test_record_rows_land_in_the_columns_they_are_named_for(
    db: sqlite3.Connection, full: bool, shared_source: bool
) -> None:
    metadata = {"sentinel": "metadata"}
    record = UsageRecord(
        timestamp_ns=1_111,
        customer_id="sentinel-customer",
        dimension_id="sentinel-dimension",
        value=Decimal("2.25"),
        record_id="sentinel-record-id",
        metadata=metadata,
        source=Source.OTLP,
    )
    rows = record_rows([record], [str(record.value)], [4_444], [5_555], full, shared_source)
    apply(
        db,
        records=records_json(rows),
        full=full,
        source=Source.VECTOR.value if shared_source else None,
    )

    expected: dict[str, Any] = {
        "seq": FIRST_SEQ,
        "ts": 1_111,
        "customer": "sentinel-customer",
        "dimension": "sentinel-dimension",
        "value": "2.25",
        "meta_id": 4_444,
        "series": 5_555,
        "record_id": "sentinel-record-id" if full else None,
        "metadata": orjson.dumps(metadata) if full else None,
        RECORD_SOURCE: Source.VECTOR.value if shared_source else Source.OTLP.value,
        "received_ns": RECEIVED_NS,
    }
    assert set(RECORD) | set(RECORD_OWN) | {RECORD_SOURCE} <= set(expected)
    assert read(db, "records", tuple(expected)) == [expected]


def test_record_rows_follow_each_other_in_seq_order(db: sqlite3.Connection) -> None:
    records = [
        UsageRecord(timestamp_ns=t, customer_id=f"c{t}", dimension_id="d", value=Decimal(t))
        for t in (3, 1, 2)
    ]
    rows = record_rows(records, ["3", "1", "2"], [None, None, None], [7, 8, 9], False, True)
    apply(db, records=records_json(rows), source=Source.REST.value)
    got = db.execute("SELECT seq, ts, customer, value FROM records ORDER BY seq").fetchall()
    assert got == [
        (FIRST_SEQ, 3, "c3", "3"),
        (FIRST_SEQ + 1, 1, "c1", "1"),
        (FIRST_SEQ + 2, 2, "c2", "2"),
    ]


def test_rollup_rows_land_in_the_columns_they_are_named_for(db: sqlite3.Connection) -> None:
    row = RollupRow(
        bucket_ns=3_600,
        count=7,
        sum=Decimal("11.5"),
        min=Decimal("-1.25"),
        max=Decimal("9.75"),
        last_ts=3_700,
        last_seq=42,
        last_value=Decimal("0.5"),
        wsum=Decimal("123.456"),
    )
    apply(db, rollups=rollups_json({("sentinel-customer", "sentinel-dimension", 3_600): row}))

    expected = {
        "customer": "sentinel-customer",
        "dimension": "sentinel-dimension",
        "bucket": 3_600,
        "count": 7,
        "sum": "11.5",
        "min": "-1.25",
        "max": "9.75",
        "last_ts": 3_700,
        "last_seq": 42,
        "last_value": "0.5",
        "wsum": "123.456",
    }
    assert set(expected) == set(ROLLUP)
    assert read(db, "rollups", ROLLUP) == [expected]


def test_distinct_rows_land_in_the_columns_they_are_named_for(db: sqlite3.Connection) -> None:
    row = ("sentinel-customer", "sentinel-dimension", 3_600, "sentinel-value")
    apply(db, distinct_values=orjson.dumps([row, row]))  # a value seen again is kept once
    apply(db, distinct_values=orjson.dumps([row]))
    assert read(db, "rollup_distinct", DISTINCT) == [dict(zip(DISTINCT, row, strict=True))]


def test_state_rows_land_in_the_columns_they_are_named_for(db: sqlite3.Connection) -> None:
    apply(db, state=orjson.dumps(state_rows({"old": b"1"})))
    state: dict[str, bytes | None] = {
        "sentinel-key": b'{"sentinel":"value"}',
        "binary": "\u00e9".encode(),  # not ASCII: bound as a blob, not a state row
        "old": None,
    }
    rows = state_rows(state)
    assert rows == [("sentinel-key", '{"sentinel":"value"}')]
    apply(db, state=orjson.dumps(rows), gone=orjson.dumps(["old"]))
    assert read(db, "receiver_state", STATE) == [
        {"key": "sentinel-key", "value": b'{"sentinel":"value"}'}
    ]


def test_layout_names_are_columns_of_their_tables(db: sqlite3.Connection) -> None:
    def columns(table: str) -> list[str]:
        return [r[1] for r in db.execute(f"PRAGMA table_info({table})")]

    assert set(RECORD) | set(RECORD_OWN) | {RECORD_SOURCE} <= set(columns("records"))
    assert list(ROLLUP) == columns("rollups")
    assert list(STATE) == columns("receiver_state")
    assert list(DISTINCT) == columns("rollup_distinct")
    assert [r[1] for r in db.execute("PRAGMA table_info(apply_group)")] == list(ApplyParams._fields)
