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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter_gateway.model import Source, UsageRecord
from meter_gateway.store.base import RollupRow
from meter_gateway.store.sqlite import MIGRATIONS
from meter_gateway.store.sqlite_layout import (
    APPLY,
    APPLY_TRIGGER,
    APPLY_VIEW,
    DISTINCT,
    MAX_ID,
    RECORD_IDS,
    RECORD_WIDE,
    ROLLUP,
    STATE,
    ApplyParams,
    record_rows,
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


def layout(built: tuple[bytes, bytes, int, bytes]) -> dict[str, Any]:
    """``record_rows``' parts as the parameters of ``apply``."""
    return dict(zip(("records", "times", "times_at", "ids"), built, strict=True))


def add_series(conn: sqlite3.Connection, *rows: tuple[int, str, str]) -> None:
    conn.executemany("INSERT INTO series VALUES (?, ?, ?)", rows)


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
    add_series(db, (5_555, "sentinel-customer", "sentinel-dimension"))
    apply(
        db,
        **layout(record_rows([record], [str(record.value)], [4_444], [5_555], full, shared_source)),
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
        "source": Source.VECTOR.value if shared_source else Source.OTLP.value,
        "received_ns": RECEIVED_NS,
    }
    assert {"ts", *RECORD_IDS, *RECORD_WIDE} <= set(expected)
    assert read(db, "records", tuple(expected)) == [expected]


def test_record_rows_follow_each_other_in_seq_order(db: sqlite3.Connection) -> None:
    records = [
        UsageRecord(timestamp_ns=t, customer_id=f"c{t}", dimension_id="d", value=Decimal(t))
        for t in (3, 1, 2)
    ]
    add_series(db, (7, "c3", "d"), (8, "c1", "d"), (9, "c2", "d"))
    rows = record_rows(records, ["3", "1", "2"], [None, None, None], [7, 8, 9], False, True)
    apply(db, **layout(rows), source=Source.REST.value)
    got = db.execute(
        "SELECT seq, ts, customer, value, meta_id FROM records ORDER BY seq"
    ).fetchall()
    assert got == [
        (FIRST_SEQ, 3, "c3", "3", None),
        (FIRST_SEQ + 1, 1, "c1", "1", None),
        (FIRST_SEQ + 2, 2, "c2", "2", None),
    ]


def test_a_record_of_a_series_never_inserted_fails_the_group(db: sqlite3.Connection) -> None:
    """A record's customer and dimension come from its series row: without one, the group
    fails (NOT NULL) rather than leaving the record out."""
    record = UsageRecord(timestamp_ns=5, customer_id="c", dimension_id="d", value=Decimal(1))
    add_series(db, (1, "c", "d"))
    rows = record_rows([record, record], ["1", "1"], [None, None], [1, 2], False, True)
    with pytest.raises(sqlite3.IntegrityError, match="NOT NULL"):
        apply(db, **layout(rows), source=Source.REST.value)
    assert db.execute("SELECT count(*) FROM records").fetchone() == (0,)


def test_integers_outside_their_widths_are_refused_before_sqlite() -> None:
    def rows(t: int, series: int, meta: int | None) -> tuple[bytes, bytes, int, bytes]:
        r = UsageRecord(timestamp_ns=t, customer_id="c", dimension_id="d", value=Decimal(1))
        return record_rows([r], ["1"], [meta], [series], False, True)

    for t in (-(1 << 63), (1 << 63) - 1, 10**18 - 1, 10**18):
        assert rows(t, MAX_ID, MAX_ID)[1:3] in ((b"%020d" % t, 1), (b"[%d]" % t, 2))
    for t, series, meta in (
        (1 << 63, 1, None),
        (-(1 << 63) - 1, 1, None),
        (1, MAX_ID + 1, None),
        (1, 1, MAX_ID + 1),
        (1, -1, None),
    ):
        with pytest.raises(ValueError, match="outside"):
            rows(t, series, meta)


_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(
        st.tuples(
            st.one_of(st.integers(-(1 << 63), (1 << 63) - 1), st.integers(10**18, 2 * 10**18)),
            st.integers(1, 3),
            st.decimals(allow_nan=False, allow_infinity=False, places=6),
            st.one_of(st.none(), st.integers(1, MAX_ID)),
            st.one_of(st.none(), _text),
            st.one_of(st.none(), st.dictionaries(_text, _text, max_size=2)),
            st.sampled_from(list(Source)),
        ),
        min_size=1,
        max_size=30,
    ),
    shared=st.booleans(),
)
def test_any_records_come_back_exactly(
    db: sqlite3.Connection, rows: list[tuple[Any, ...]], shared: bool
) -> None:
    """Generated records of every layout (narrow, own ids and metadata, own sources) read back
    field for field."""
    db.execute("DELETE FROM records")
    db.execute("DELETE FROM series")
    add_series(db, *((i, f"customer-{i}", f"dimension-{i}") for i in (1, 2, 3)))
    records = [
        UsageRecord(
            timestamp_ns=t,
            customer_id=f"customer-{sid}",
            dimension_id=f"dimension-{sid}",
            value=v,
            record_id=rid,
            metadata=meta,
            source=rows[0][6] if shared else src,
        )
        for t, sid, v, _, rid, meta, src in rows
    ]
    full = any(r.record_id is not None or r.metadata for r in records)
    values = [str(r.value) for r in records]
    built = record_rows(records, values, [r[3] for r in rows], [r[1] for r in rows], full, shared)
    apply(
        db,
        **layout(built),
        full=full,
        source=rows[0][6].value if shared else None,
    )
    got = db.execute(
        "SELECT seq, ts, customer, dimension, value, meta_id, series, record_id, metadata, "
        "source FROM records ORDER BY seq"
    ).fetchall()
    assert got == [
        (
            FIRST_SEQ + i,
            r.timestamp_ns,
            r.customer_id,
            r.dimension_id,
            values[i],
            row[3],
            row[1],
            r.record_id if full else None,
            orjson.dumps(r.metadata) if full and r.metadata else None,
            r.source.value,
        )
        for i, (r, row) in enumerate(zip(records, rows, strict=True))
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

    assert {"ts", *RECORD_IDS, *RECORD_WIDE} <= set(columns("records"))
    assert list(ROLLUP) == columns("rollups")
    assert list(STATE) == columns("receiver_state")
    assert list(DISTINCT) == columns("rollup_distinct")
    assert [r[1] for r in db.execute("PRAGMA table_info(apply_group)")] == list(ApplyParams._fields)


def test_the_text_of_id_pairs_is_remembered_from_group_to_group() -> None:
    records = [
        UsageRecord(timestamp_ns=10**18 + t, customer_id="c", dimension_id="d", value=Decimal(t))
        for t in range(3)
    ]
    pieces: dict[tuple[int, int | None], bytes] = {}
    first = record_rows(records, ["0", "1", "2"], [None, 9, 9], [7, 7, 8], False, True, pieces)
    assert pieces == {
        (7, None): b"%012d%012d" % (7, 0),
        (7, 9): b"%012d%012d" % (7, 9),
        (8, 9): b"%012d%012d" % (8, 9),
    }
    assert first[3] == b"".join(pieces[p] for p in ((7, None), (7, 9), (8, 9)))
    pieces[7, 9] = b"remembered"  # a second group takes the text it finds
    again = record_rows(records, ["0", "1", "2"], [None, 9, 9], [7, 7, 8], False, True, pieces)
    assert again[3] == pieces[7, None] + b"remembered" + pieces[8, 9]
