"""Building blocks for tests that drive the store and engine directly."""

from __future__ import annotations

import itertools
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import httpx

from meter_gateway.model import Batch, Source, UsageRecord, dedup_key
from meter_gateway.store import Store
from meter_gateway.store import open_store as open_any_store
from meter_gateway.store.sqlite import MIGRATIONS
from tests.pgdb import store_url

NS = 1_000_000_000

T = TypeVar("T")


def sqlite_at_version(
    path: Path, version: int, records: list[tuple[int, int, str | None]]
) -> sqlite3.Connection:
    """A SQLite database as an older meter-gateway left it: the store's first ``version``
    migrations and ``records`` (seq, ts, record id) of customer c1, dimension d1, value 1. The
    caller may change more through the connection, then closes it."""
    conn = sqlite3.connect(path, isolation_level=None)
    for script in MIGRATIONS[:version]:
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)
    conn.execute(f"PRAGMA user_version={version}")
    conn.executemany(
        "INSERT INTO records (seq, ts, customer, dimension, value, record_id, metadata, source, "
        "received_ns) VALUES (?, ?, 'c1', 'd1', '1', ?, NULL, 'rest', 0)",
        records,
    )
    return conn


def eventually(check: Callable[[], T], what: str, timeout: float = 60.0) -> T:
    """Poll ``check`` until it returns something truthy, and return that.

    The synchronisation point of tests that wait on another thread or process: the deadline
    only keeps a broken test from hanging. Polls at once, then backs off from 10 ms to 250 ms.
    On timeout raises AssertionError naming ``what`` and the last value (or exception) seen.
    Exceptions from ``check`` count as not yet (a server still starting refuses connections),
    except AssertionError: an assertion inside ``check`` is a failure, raised at once.
    """
    deadline = time.monotonic() + timeout
    pause = 0.01
    last: object = None
    while True:
        try:
            got = check()
        except AssertionError:
            raise
        except Exception as exc:  # reported, and chained, if still failing at the deadline
            last = exc
        else:
            if got:
                return got
            last = got
        if time.monotonic() >= deadline:
            cause = last if isinstance(last, Exception) else None
            raise AssertionError(
                f"not reached within {timeout}s: {what} (last: {last!r})"
            ) from cause
        time.sleep(pause)
        pause = min(pause * 2, 0.25)


def ts(text: str) -> int:
    """'2026-05-01T12:00:00' (UTC) → ns."""
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()) * NS


def rec(
    when: str,
    value: str,
    customer: str = "c1",
    dimension: str = "d1",
    rid: str | None = None,
    unique: str | None = None,
) -> UsageRecord:
    return UsageRecord(
        ts(when),
        customer,
        dimension,
        Decimal(value),
        rid,
        None,
        Source.REST,
        dedup_key("id", rid) if rid else None,
        unique,
    )


def open_store(tmp_path: Path, now: str = "2026-05-02T00:00:00") -> Store:
    """The store of ``tmp_path`` (SQLite or PostgreSQL per METER_TEST_STORE, see tests/pgdb.py);
    opening it again on the same directory finds the same data."""
    return open_any_store(store_url(tmp_path, "t.db"), 35 * 86400, ts(now))


def commit(store: Store, *records: UsageRecord, now: str = "2026-05-02T00:00:00") -> None:
    store.commit([Batch(Source.REST, list(records))], ts(now))


# --- for tests against a running gateway --------------------------------------------

_ids = itertools.count()


def next_id() -> int:
    return next(_ids)


def now_iso(delta: timedelta = timedelta()) -> str:
    return (datetime.now(UTC) + delta).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record(customer: str = "acme", value: Any = "1", **extra: Any) -> dict[str, Any]:
    return {
        "id": f"rest-{next(_ids)}-{datetime.now(UTC).timestamp()}",
        "timestamp": now_iso(),
        "customerId": customer,
        "dimensionId": "data-processed",
        "recordValue": value,
        **extra,
    }


def month_values(
    client: httpx.Client, customer: str, dimension: str, to: timedelta = timedelta(minutes=10)
) -> list[str | None]:
    """The month windows' values of a customer's dimension, from 2020 to now + ``to``."""
    r = client.get(
        "/v1/usage",
        params={
            "customerId": customer,
            "dimensionId": dimension,
            "window": "month",
            "from": "2020-01-01T00:00:00Z",
            "to": now_iso(to),
        },
    )
    assert r.status_code == 200, r.text
    return [w["value"] for w in r.json()["data"]]


def total(client: httpx.Client, customer: str, dimension: str = "data-processed") -> Decimal:
    values = month_values(client, customer, dimension)
    return sum((Decimal(v) for v in values if v is not None), Decimal(0))
