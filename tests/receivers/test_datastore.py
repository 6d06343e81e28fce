"""The datastore receiver against a real PostgreSQL source and a running gateway: rows counted
exactly once across pages of equal timestamps, gateway restarts and (on PostgreSQL) two
replicas; a bad row rejected with its reason while the rest count. The paging rules are also
held in-process."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from meter_gateway.config import DatastoreReceiverConfig
from receivers.datastore import Watermark, advance, page_query, row_key, to_records
from tests import pgdb
from tests.gatewayproc import BASE_CONFIG, GatewayProcess
from tests.helpers import eventually, next_id

JOB = "datastore:billing-db"


@pytest.fixture
def source() -> Iterator[str]:
    """A fresh database standing for the customer's own, with the usage tables."""
    url = pgdb.create_database()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE usage_events (id bigint PRIMARY KEY, tenant text, gb numeric,"
            " happened_at timestamptz NOT NULL)"
        )
        # No id column: rows are told apart by their content.
        conn.execute(
            "CREATE TABLE api_calls (tenant text, calls integer, at timestamp NOT NULL,"
            " request text)"
        )
    yield url
    pgdb.drop_database(url)


def receivers(source_url: str) -> dict[str, Any]:
    # The password comes from the environment (trust auth ignores it; ${...} is what matters).
    url = source_url.replace("postgresql://postgres@", "postgresql://postgres:${SRC_PG_PW}@")
    return {
        "datastore": [
            {
                "name": "billing-db",
                "url": url,
                "query": "SELECT id, tenant, gb, happened_at FROM usage_events"
                " WHERE gb IS DISTINCT FROM 0",
                "columns": {"id": "id", "customer": "tenant", "value": "gb", "time": "happened_at"},
                "dimension": "data-processed",
                "interval": "200ms",
                "page_size": 3,
            },
            {
                "name": "api-calls",
                "url": url,
                "query": "SELECT tenant, 'compute-time' AS dim, calls, at, request FROM api_calls",
                "columns": {
                    "customer": "tenant",
                    "dimension": "dim",
                    "value": "calls",
                    "time": "at",
                },
                "interval": "200ms",
                "page_size": 2,
            },
        ]
    }


def start_gateway(workdir: Path, source_url: str, store: str | None = None) -> GatewayProcess:
    config: dict[str, Any] = {**BASE_CONFIG, "receivers": receivers(source_url)}
    if store is not None:
        config["store"] = {"url": store}
    return GatewayProcess(workdir, config, env={"SRC_PG_PW": "unused-with-trust"}).start()


def insert(url: str, table: str, rows: list[tuple[Any, ...]]) -> None:
    cols = {
        "usage_events": "id, tenant, gb, happened_at",
        "api_calls": "tenant, calls, at, request",
    }
    marks = ", ".join(["%s"] * len(rows[0]))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.cursor().executemany(f"INSERT INTO {table} ({cols[table]}) VALUES ({marks})", rows)


def total(gw: GatewayProcess, customer: str, dimension: str = "data-processed") -> Decimal:
    now = datetime.now(UTC)
    with gw.client() as c:
        r = c.get(
            "/v1/usage",
            params={
                "customerId": customer,
                "dimensionId": dimension,
                "window": "day",
                "from": (now - timedelta(days=2)).strftime("%Y-%m-%dT00:00:00Z"),
                "to": (now + timedelta(days=1)).strftime("%Y-%m-%dT00:00:00Z"),
            },
        )
    assert r.status_code == 200, r.text
    return sum((Decimal(w["value"] or 0) for w in r.json()["data"]), Decimal(0))


def job_runs(gw: GatewayProcess, job: str = JOB) -> float:
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    m = re.search(rf'^meter_gateway_job_runs_total\{{job="{job}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def settled(gw: GatewayProcess, runs: int = 3) -> None:
    """Let the job run a few more times, so a repeat would have shown in the totals."""
    start = job_runs(gw)
    eventually(lambda: job_runs(gw) >= start + runs, f"{runs} more runs of {JOB}")


def new_customer(gw: GatewayProcess) -> str:
    cid = f"ds-{next_id()}-{time.time_ns()}"
    with gw.client() as c:
        r = c.post("/v1/customers", json={"id": cid, "name": cid, "offering": "pay-as-you-go"})
    assert r.status_code == 201, r.text
    return cid


def known(gw: GatewayProcess, customer: str) -> bool:
    with gw.client() as c:
        return c.get(f"/v1/customers/{customer}").status_code == 200


def test_rows_count_once_across_pages_restarts_and_bad_rows(source: str, tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, source)
    try:
        cust = new_customer(gw)
        t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
        # 1..4 at distinct times, then 5..11 all at one instant across three pages of 3.
        first = [(i, cust, Decimal(i) / 8, t0 + timedelta(seconds=i)) for i in range(1, 5)]
        same = t0 + timedelta(seconds=30)
        first += [(i, cust, Decimal(2**i) / 1024, same) for i in range(5, 12)]
        insert(source, "usage_events", first)
        want = sum((r[2] for r in first), Decimal(0))
        eventually(lambda: total(gw, cust) == want, f"{want} GB counted")
        settled(gw)
        assert total(gw, cust) == want

        gw.stop()
        # Written while the gateway is down: more rows at that same instant with higher ids,
        # one row for a customer the gateway does not know, and later rows.
        later = [(i, cust, Decimal(3**i) / 100, same) for i in range(12, 15)]
        later.append((15, f"nobody-{cust}", Decimal(1), same + timedelta(seconds=1)))
        later += [(i, cust, Decimal(i), same + timedelta(seconds=i)) for i in range(16, 20)]
        insert(source, "usage_events", later)
        want += sum((r[2] for r in later if r[1] == cust), Decimal(0))
        gw.start()
        eventually(lambda: total(gw, cust) == want, f"{want} GB counted after the restart")
        settled(gw)
        assert total(gw, cust) == want

        with gw.client() as c:
            rejected = c.get("/v1/rejected", params={"reason": "unknown_customer"}).json()["data"]
        (bad,) = [r for r in rejected if "datastore:billing-db:15" in r["record"]]
        assert bad["field"] == "customerId"
        assert f"nobody-{cust}" in bad["error"]
    finally:
        gw.stop()


def test_rows_without_an_id_count_once_even_when_a_page_is_all_one_time(
    source: str, tmp_path: Path
) -> None:
    gw = start_gateway(tmp_path, source)
    try:
        cust = new_customer(gw)
        at = datetime.now(UTC).replace(tzinfo=None, microsecond=0) - timedelta(minutes=2)
        # Five rows at one instant with pages of 2 (no id to page within it), then later ones.
        rows = [(cust, 60 * (i + 1), at, f"req-{i}") for i in range(5)]
        rows += [(cust, 7, at + timedelta(seconds=i), f"late-{i}") for i in range(1, 4)]
        insert(source, "api_calls", rows)
        want = Decimal(sum(r[1] for r in rows))
        eventually(lambda: total(gw, cust, "compute-time") == want, f"{want} calls counted")
        settled(gw)
        gw.stop()
        gw.start()
        insert(source, "api_calls", [(cust, 11, at + timedelta(seconds=3), "same-time-as-last")])
        want += 11
        eventually(lambda: total(gw, cust, "compute-time") == want, "the late row counted")
        settled(gw)
        assert total(gw, cust, "compute-time") == want
    finally:
        gw.stop()


def test_two_replicas_count_each_row_once(source: str, tmp_path: Path) -> None:
    store = pgdb.create_database()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = start_gateway(tmp_path / "a", source, store)
    b = start_gateway(tmp_path / "b", source, store)
    try:
        cust = new_customer(a)
        # A read through another replica may lag a catalog change by up to a second.
        eventually(lambda: known(b, cust), "replica b to know the new customer")
        t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=3)
        rows = [(i, cust, Decimal(i) / 10, t0 + timedelta(seconds=i // 4)) for i in range(1, 40)]
        insert(source, "usage_events", rows)
        want = sum((r[2] for r in rows), Decimal(0))
        eventually(lambda: total(b, cust) == want, f"{want} GB counted")
        a.kill()  # the lease holder may die mid-read; the other takes over
        more = [(i, cust, Decimal(1), t0 + timedelta(seconds=60)) for i in range(40, 50)]
        insert(source, "usage_events", more)
        want += 10
        eventually(lambda: total(b, cust) == want, "rows after a replica died", timeout=60)
        settled(b)
        assert total(b, cust) == want
    finally:
        a.stop()
        b.stop()


# --- in-process: the paging rules ----------------------------------------------------------------


def _cfg(**extra: Any) -> DatastoreReceiverConfig:
    doc: dict[str, Any] = {
        "name": "db",
        "url": "postgresql://x@h/d",
        "query": "SELECT * FROM t;",
        "columns": {"id": "id", "customer": "c", "value": "v", "time": "ts"},
        "dimension": "d",
    }
    doc.update(extra)
    return DatastoreReceiverConfig.model_validate(doc)


def _sql(q: Any) -> str:
    text: str = q.as_string(None)
    return text


def test_the_page_query_is_keyset_on_time_and_id() -> None:
    cfg = _cfg(page_size=3)
    at = datetime(2026, 5, 1, 12, tzinfo=UTC)
    q = _sql(page_query(cfg, Watermark(at, 42), at))
    assert q.startswith('SELECT * FROM (SELECT * FROM t) AS meter_gateway_src WHERE ("ts", "id") >')
    assert "42" in q
    assert q.endswith('ORDER BY "ts", "id" LIMIT 3')
    assert _sql(page_query(cfg, None, None)).endswith('ORDER BY "ts", "id" LIMIT 3')
    rows = [{"id": 1, "ts": 5}, {"id": 2, "ts": 5}]
    assert advance(cfg, rows, None) == (rows, Watermark(5, 2))
    assert advance(cfg, [], Watermark(5, 2)) == ([], Watermark(5, 2))


def test_without_an_id_rows_at_the_watermark_are_read_again_and_skipped() -> None:
    cfg = _cfg(columns={"customer": "c", "value": "v", "time": "ts"}, page_size=2)
    r1, r2, r3 = ({"c": "a", "v": v, "ts": 7} for v in (1, 2, 3))
    k1, k2, k3 = (row_key(cfg, r) for r in (r1, r2, r3))
    # A full page all at one time moves on: its keys are kept and the next page is longer.
    fresh, wm = advance(cfg, [r1, r2], None)
    assert fresh == [r1, r2]
    assert wm == Watermark(7, None, tuple(sorted([k1, k2])))
    q = _sql(page_query(cfg, wm, None))
    assert '"ts" >= 7' in q
    assert q.endswith("LIMIT 4")
    # The same rows again plus one written later at that time: only the new one is fresh.
    fresh, wm2 = advance(cfg, [r1, r2, r3], wm)
    assert fresh == [r3]
    assert wm2 == Watermark(7, None, tuple(sorted([k1, k2, k3])))
    assert advance(cfg, [r1, r2, r3], wm2) == ([], wm2)
    later = {"c": "a", "v": 1, "ts": 8}
    assert advance(cfg, [r1, r2, r3, later], wm2) == (
        [later],
        Watermark(8, None, (row_key(cfg, later),)),
    )


def test_rows_become_records_with_natural_ids() -> None:
    cfg = _cfg()
    # a `timestamp` column (without time zone) reads as a naive datetime: it is UTC
    naive = datetime(2026, 5, 1, 12, 0, 0, 250000, tzinfo=UTC).replace(tzinfo=None)
    (rec,) = to_records(cfg, [{"id": 7, "c": "acme", "v": Decimal("0.10"), "ts": naive}])
    assert rec == {
        "id": "datastore:db:7",
        "customerId": "acme",
        "dimensionId": "d",
        "timestamp": "2026-05-01T12:00:00.250000Z",
        "recordValue": "0.10",
    }
    assert "recordValue" not in to_records(cfg, [{"id": 8, "c": "a", "v": None, "ts": naive}])[0]


def test_watermarks_keep_their_type_through_the_store() -> None:
    for wm in (
        Watermark(datetime(2026, 5, 1, tzinfo=UTC), 3),
        Watermark(17, None, ("row-ab", "row-cd")),
        Watermark(Decimal("1.5"), "a-uuid-text"),
    ):
        assert Watermark.decode(wm.encode()) == wm


def test_config_wants_exactly_one_dimension_source() -> None:
    with pytest.raises(ValueError, match="exactly one of 'dimension'"):
        _cfg(dimension=None)
    with pytest.raises(ValueError, match="exactly one of 'dimension'"):
        _cfg(columns={"customer": "c", "value": "v", "time": "ts", "dimension": "dim"})
