"""The PostgreSQL commit sends its bulk columns as array literals it writes itself (not lists
psycopg dumps element by element): every text and number must come back exactly as sent."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import psycopg
import pytest

from meter_gateway.model import Batch, Source
from meter_gateway.store.postgres import PostgresStore, _array, _text_array
from meter_gateway.timebuckets import BUCKET_NS
from tests import pgdb
from tests.helpers import rec, ts

NOW = ts("2026-05-02T00:00:00")
WINDOW_S = 35 * 86400
AWKWARD = ['a"b', "c\\d", "{x}", "a,b", " sp ", "NULL", "", "é☃\U0001f600", '\\"', "x\ty\n", "()"]


@pytest.fixture
def url() -> Iterator[str]:
    u = pgdb.create_database()
    yield u
    pgdb.drop_database(u)


def test_literals_read_back_as_the_lists_they_encode(url: str) -> None:
    numbers = [Decimal("1E+3"), Decimal("-0.000001"), Decimal("12345678901234567890.5"), 7, -0]
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT %s::text[], %s::numeric[], %s::text[]",
            (_text_array(AWKWARD), _array(numbers), _text_array([])),
        ).fetchone()
    assert row == (AWKWARD, [Decimal(n) for n in numbers], [])


def test_awkward_customers_dimensions_and_distinct_values_commit_exactly(url: str) -> None:
    store = PostgresStore(url, WINDOW_S, NOW)
    try:
        records = [
            rec(f"2026-05-01T10:{i:02d}:00", f"{i}.25", customer=s, dimension=s, unique=s)
            for i, s in enumerate(AWKWARD)
        ]
        [result] = store.commit([Batch(Source.REST, records)], NOW)
        assert result.accepted == len(AWKWARD)
        bucket = ts("2026-05-01T10:00:00")
        for i, s in enumerate(AWKWARD):
            [row] = store.rollups(s, s, bucket, bucket + BUCKET_NS)
            assert (row.count, row.sum, row.max) == (1, Decimal(f"{i}.25"), Decimal(f"{i}.25"))
            assert store.distinct(s, s, bucket, bucket + BUCKET_NS) == [(bucket, s)]
    finally:
        store.close()


@pytest.mark.parametrize("awkward", AWKWARD)
def test_one_awkward_string_among_plain_ones_reads_back(url: str, awkward: str) -> None:
    # plain strings skip the escaping; one that needs it must not slip through with them
    values = ["cust-1", awkward, "cust-2"]
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT %s::text[], %s::text[]", (_text_array(values), _text_array(["a", "b"]))
        ).fetchone()
    assert row == (values, ["a", "b"])
