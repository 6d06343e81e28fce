"""What a store cannot keep (issue 13), on every store (METER_TEST_STORE): a group holding such
a record fails as ``Unstorable`` and writes nothing, the next group commits, rows stored before
stores refused such metadata still list, rejected text that no store can write is escaped, and
rollup sums stay exact at the value limit."""

from __future__ import annotations

import random
import sqlite3
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any

import psycopg
import pytest

from meter_gateway.aggregation.engine import aggregate
from meter_gateway.config import Dimension
from meter_gateway.decimals import EXACT
from meter_gateway.model import Batch, Reason, RecordError, Source, UsageRecord
from meter_gateway.store.base import (
    MAX_METADATA_DEPTH,
    UNREADABLE_METADATA,
    Store,
    Unstorable,
    unstorable_reason,
)
from meter_gateway.store.postgres import PostgresStore
from meter_gateway.store.sqlite import SQLiteStore
from tests.helpers import NS, open_store, rec, ts

NOW = ts("2026-05-02T00:00:00")
DAY = (ts("2026-05-01T00:00:00"), ts("2026-05-02T00:00:00"))


def nested(depth: int) -> dict[str, Any]:
    """Metadata ``depth`` objects deep (built in-process: no validation on the way)."""
    value: Any = "leaf"
    for _ in range(depth):
        value = {"k": value}
    return value  # type: ignore[no-any-return]


def with_metadata(r: UsageRecord, metadata: dict[str, Any]) -> UsageRecord:
    r.metadata = metadata
    return r


def listed(store: Store) -> list[Any]:
    return store.records(None, None, *DAY, None, 100)


@pytest.mark.parametrize("depth", [MAX_METADATA_DEPTH + 1, 253, 254, 300])
def test_metadata_too_deep_to_list_fails_the_group_and_writes_nothing(
    tmp_path: Path, depth: int
) -> None:
    s = open_store(tmp_path)
    bad = with_metadata(rec("2026-05-01T10:00:00", "1", rid="bad"), nested(depth))
    good = rec("2026-05-01T10:00:00", "2", rid="good")
    with pytest.raises(Unstorable):
        s.commit([Batch(Source.REST, [good, bad])], NOW)
    assert unstorable_reason(bad) is not None
    assert unstorable_reason(good) is None
    # nothing was written, no key marked: the same ids commit afterwards
    assert listed(s) == []
    (r,) = s.commit([Batch(Source.REST, [rec("2026-05-01T10:00:00", "2", rid="good")])], NOW)
    assert r.accepted == 1
    fixed = with_metadata(rec("2026-05-01T10:00:00", "1", rid="bad"), {"k": "v"})
    (r,) = s.commit([Batch(Source.REST, [fixed])], NOW)
    assert r.accepted == 1
    assert sorted(x.record_id or "" for x in listed(s)) == ["bad", "good"]
    (row,) = s.rollups("c1", "d1", *DAY)
    assert (row.count, row.sum) == (2, Decimal(3))
    s.close()


def test_metadata_as_deep_as_a_page_can_carry_is_stored_and_listed(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    meta = nested(MAX_METADATA_DEPTH)
    (r,) = s.commit(
        [Batch(Source.REST, [with_metadata(rec("2026-05-01T10:00:00", "1", rid="a"), meta)])],
        NOW,
    )
    assert r.accepted == 1
    (got,) = listed(s)
    assert got.metadata == meta
    s.close()


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("id", lambda r: setattr(r, "record_id", "nul\x00A")),
        ("customerId", lambda r: setattr(r, "customer_id", "c\ud800")),
        ("metadata", lambda r: setattr(r, "metadata", {"big": 2**70})),
        ("metadata", lambda r: setattr(r, "metadata", {"s": "\udfff"})),
    ],
)
def test_values_no_store_can_keep_unaltered_fail_as_unstorable(
    tmp_path: Path, field: str, change: Any
) -> None:
    s = open_store(tmp_path)
    bad = rec("2026-05-01T10:00:00", "1", rid="x")
    change(bad)
    reason = unstorable_reason(bad)
    assert reason is not None
    assert reason[0] == field
    with pytest.raises(Unstorable):
        s.commit([Batch(Source.REST, [rec("2026-05-01T10:00:00", "1", rid="ok"), bad])], NOW)
    assert listed(s) == []
    s.close()


def test_rejected_text_no_store_can_write_is_kept_escaped(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    err = RecordError(
        0, "tags.x", "bad tag \ud800 and \x00", Reason.INVALID_VALUE, '{"x":"\ud800"}'
    )
    (r,) = s.commit([Batch(Source.VECTOR, [rec("2026-05-01T10:00:00", "1")], [err])], NOW)
    assert (r.accepted, r.rejected) == (1, 1)
    (row,) = s.rejected(None, 10, None)
    assert row.error == "bad tag \\ud800 and \\u0000"
    assert row.raw == '{"x":"\\ud800"}'
    s.close()


def _store_deep_metadata_behind_its_back(s: Store, text: str) -> None:
    """A row as an older version could write it: metadata no page can carry."""
    if isinstance(s, SQLiteStore):
        conn = sqlite3.connect(s.path, isolation_level=None)
        conn.execute(
            "INSERT INTO records (seq, ts, customer, dimension, value, record_id, metadata, "
            "source, received_ns) VALUES (1000, ?, 'c1', 'd1', '1', 'old', CAST(? AS BLOB), "
            "'rest', ?)",
            (ts("2026-05-01T11:00:00"), text, NOW),
        )
        conn.close()
    else:
        assert isinstance(s, PostgresStore)
        with psycopg.connect(s.url, autocommit=True) as pg:
            pg.execute(
                "INSERT INTO records (seq, ts, customer, dimension, value, record_id, metadata, "
                "source, received_ns) VALUES (1000, %s, 'c1', 'd1', 1, 'old', %s, 'rest', %s)",
                (ts("2026-05-01T11:00:00"), text, NOW),
            )


@pytest.mark.parametrize("depth", [MAX_METADATA_DEPTH + 1, 254, 1100])
def test_a_raw_page_lists_metadata_it_cannot_decode_as_its_stored_text(
    tmp_path: Path, depth: int
) -> None:
    s = open_store(tmp_path)
    s.commit([Batch(Source.REST, [rec("2026-05-01T10:00:00", "1", rid="new")])], NOW)
    text = '{"k":' * depth + "1" + "}" * depth
    _store_deep_metadata_behind_its_back(s, text)
    old, new = sorted(listed(s), key=lambda r: r.record_id != "old")
    assert old.metadata == {UNREADABLE_METADATA: text}
    assert new.metadata is None
    s.close()


def test_rollups_stay_exact_at_the_value_limit(tmp_path: Path) -> None:
    """Item 10: sums of values just under 1e21 with 6 (and 18) places pass 28 significant
    digits; windows must equal the exact sum of the raw records."""
    s = open_store(tmp_path)
    rng = random.Random(13)
    t0 = ts("2026-05-01T00:00:00")
    values = [
        Decimal(f"{rng.randint(990 * 10**18, 10**21 - 1)}.{rng.randint(0, 10**6 - 1):06d}")
        for _ in range(300)
    ] + [Decimal(f"999999999999999999999.{'9' * 18}")] * 20
    records = []
    for i, v in enumerate(values):
        r = rec("2026-05-01T00:00:00", "1")
        r.value, r.timestamp_ns = v, t0 + i * 263 * NS  # across many hours, many commits
        records.append(r)
    for i in range(0, len(records), 7):
        s.commit([Batch(Source.REST, records[i : i + 7])], NOW)
    with localcontext(EXACT):
        exact = sum(values, Decimal(0))
        raw = sum((r.value for r in listed_all(s)), Decimal(0))
        rollups = sum((r.sum for r in s.rollups("c1", "d1", *DAY)), Decimal(0))
    assert raw == exact
    assert rollups == exact
    dim = Dimension.model_validate({"id": "d1", "name": "D", "aggregation": "sum"})
    # whole hours (from rollups), a window cut inside hours (raw at the edges), and daily
    hours = [(t0 + h * 3600 * NS, t0 + (h + 1) * 3600 * NS) for h in range(24)]
    by_hour = aggregate(s, "c1", dim, hours)
    assert sum_exact(by_hour) == exact
    (cut,) = aggregate(s, "c1", dim, [(t0 + 1, DAY[1] - 1)])
    assert cut == EXACT.subtract(exact, values[0])  # the first record sits at t0
    (day,) = aggregate(s, "c1", dim, [DAY])
    assert day == exact
    s.close()


def listed_all(s: Store) -> list[Any]:
    return s.records(None, None, *DAY, None, 10_000)


def sum_exact(values: list[Decimal | None]) -> Decimal:
    with localcontext(EXACT):
        return sum((v for v in values if v is not None), Decimal(0))
