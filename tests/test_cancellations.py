"""Usage corrections (SPEC 11): records cancelled by id, on either store (METER_TEST_STORE).

In-process: for every aggregation, cancelling a record leaves each window and each rollup
exactly as a store that never received it (windows cut through buckets included); statuses
(cancelled, not_found, already_cancelled, invoiced); the id sent again is a duplicate; the audit
list. Against a running gateway: POST/GET /v1/usage/cancellations, Idempotency-Key, and the
bill that follows.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, get_args

import httpx
import pytest

from meter_gateway.aggregation.engine import aggregate
from meter_gateway.config import Aggregation, Dimension
from meter_gateway.model import Batch, Source, UsageRecord, dedup_key
from meter_gateway.store import Store
from meter_gateway.store import open_store as open_any_store
from meter_gateway.store.base import InvoiceRow
from tests.gatewayproc import READ_KEY, GatewayProcess
from tests.helpers import next_id, now_iso, open_store, sqlite_at_version, ts

KINDS: tuple[str, ...] = get_args(Aggregation)
NOW = "2026-05-02T00:00:00"
DAY = (ts("2026-05-01T00:00:00"), ts("2026-05-02T00:00:00"))
# hours, and windows whose bounds cut buckets (the engine reads raw records there)
WINDOWS = [
    [DAY],
    [(ts(f"2026-05-01T{h:02d}:00:00"), ts(f"2026-05-01T{h + 1:02d}:00:00")) for h in range(23)],
    [
        (ts("2026-05-01T09:15:00"), ts("2026-05-01T10:20:00")),
        (ts("2026-05-01T10:20:00"), ts("2026-05-01T10:40:00")),
        (ts("2026-05-01T10:40:00"), ts("2026-05-01T12:00:00")),
    ],
]


def usage(
    when: str, value: str, rid: str, user: str = "u1", customer: str = "c1", dim: str = "d1"
) -> UsageRecord:
    """A record as ingest makes it: id, dedup key, metadata with the distinct value."""
    return UsageRecord(
        ts(when), customer, dim, Decimal(value), rid, {"user_id": user}, Source.REST,
        dedup_key("id", rid), user,
    )  # fmt: skip


# Several records per bucket, ties in time, the extremes and the last one among them.
RECORDS = [
    usage("2026-05-01T10:05:00", "3", "a", "u1"),
    usage("2026-05-01T10:30:00", "9.5", "b", "u2"),  # the max, the last of its bucket
    usage("2026-05-01T10:30:00", "0.25", "c", "u3"),  # same time, received later: the last
    usage("2026-05-01T10:10:00", "1", "d", "u2"),
    usage("2026-05-01T11:00:00", "4", "e", "u1"),  # alone in its bucket
    usage("2026-05-01T09:59:59", "2", "f", "u4"),
]


def store_with(
    tmp_path: Path, name: str, records: list[UsageRecord], sqlite: bool = False
) -> Store:
    """A store holding ``records`` (per METER_TEST_STORE, or SQLite when ``sqlite``)."""
    if sqlite:
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
        s = open_any_store(f"sqlite:///{tmp_path / name / 't.db'}", 35 * 86400, ts(NOW))
    else:
        s = open_store(tmp_path / name)
    # one record per commit, as separate requests would: rollups are merged, not built once
    for r in records:
        s.commit([Batch(Source.REST, [r])], ts(NOW))
    return s


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[list[Store]]:
    opened: list[Store] = []
    yield opened
    for s in opened:
        s.close()


def dimension(kind: str) -> Dimension:
    return Dimension(id="d1", name="D", aggregation=kind, unique_key="user_id")  # type: ignore[arg-type]


@pytest.mark.parametrize("gone", ["b", "c", "e", "a", "f"])
def test_a_cancelled_record_leaves_every_window_as_if_never_sent(
    tmp_path: Path, stores: list[Store], gone: str
) -> None:
    s = store_with(tmp_path, "cancelled", RECORDS)
    never = store_with(tmp_path, "never", [r for r in RECORDS if r.record_id != gone])
    stores += [s, never]
    before = {k: [aggregate(s, "c1", dimension(k), w) for w in WINDOWS] for k in KINDS}
    [result] = s.cancel_records([gone], "sent twice by mistake", ts(NOW), {"d1": "user_id"})
    assert (result.id, result.status, result.invoice_id) == (gone, "cancelled", None)
    for kind in KINDS:
        dim = dimension(kind)
        after = [aggregate(s, "c1", dim, w) for w in WINDOWS]
        assert after == [aggregate(never, "c1", dim, w) for w in WINDOWS], kind
        if kind in ("sum", "count", "weighted_sum"):
            assert after != before[kind]  # the case is not vacuous
    # the rollups themselves, not only what the engine makes of them
    span = (DAY[0], DAY[1])
    assert s.rollups("c1", "d1", *span) == never.rollups("c1", "d1", *span) or _same_rollups(
        s, never
    )
    assert sorted(s.distinct("c1", "d1", *span)) == sorted(never.distinct("c1", "d1", *span))
    assert [r.record_id for r in s.records("c1", "d1", *span, None, 100)] == [
        r.record_id for r in never.records("c1", "d1", *span, None, 100)
    ]


def _same_rollups(a: Store, b: Store) -> bool:
    # Sums are equal decimals, written perhaps with other trailing zeros; seqs differ by one
    # store's extra record, so the last record is compared by time and value.
    def key(s: Store) -> list[tuple[Any, ...]]:
        return [
            (r.bucket_ns, r.count, r.sum, r.min, r.max, r.last_ts, r.last_value, r.wsum)
            for r in s.rollups("c1", "d1", *DAY)
        ]

    return key(a) == key(b)


def test_cancelling_every_record_of_a_bucket_removes_its_rollup(
    tmp_path: Path, stores: list[Store]
) -> None:
    s = store_with(tmp_path, "s", RECORDS)
    stores.append(s)
    assert [r.status for r in s.cancel_records(["e"], None, ts(NOW), {})] == ["cancelled"]
    assert [r.bucket_ns for r in s.rollups("c1", "d1", *DAY)] == [
        ts("2026-05-01T09:00:00"),
        ts("2026-05-01T10:00:00"),
    ]
    s.cancel_records(["f"], None, ts(NOW), {})
    assert s.pairs("c1", None, DAY[1]) == [("c1", "d1")]
    s.cancel_records(["a", "b", "c", "d"], None, ts(NOW), {})
    assert s.rollups("c1", "d1", *DAY) == []
    assert s.pairs("c1", None, DAY[1]) == []  # no usage left: not listed


def test_statuses_and_the_id_sent_again_is_a_duplicate(tmp_path: Path, stores: list[Store]) -> None:
    s = store_with(tmp_path, "s", RECORDS)
    stores.append(s)
    results = s.cancel_records(["b", "nope", "b"], "typo", ts(NOW), {"d1": "user_id"})
    # a repeated id is answered for each occurrence with what became of it
    assert [(r.id, r.status) for r in results] == [
        ("b", "cancelled"),
        ("nope", "not_found"),
        ("b", "cancelled"),
    ]
    [again] = s.cancel_records(["b"], None, ts(NOW), {})
    assert again.status == "already_cancelled"
    [resent] = s.commit([Batch(Source.REST, [RECORDS[1]])], ts(NOW))
    assert (resent.accepted, resent.duplicates) == (0, 1)
    [entry] = s.cancellations(None, 10)
    assert (entry.record_id, entry.value, entry.reason) == ("b", Decimal("9.5"), "typo")
    assert (entry.customer_id, entry.dimension_id, entry.timestamp_ns) == (
        "c1",
        "d1",
        ts("2026-05-01T10:30:00"),
    )
    assert entry.metadata == {"user_id": "u2"}
    assert s.cancellations(entry.seq, 10) == []


def test_a_record_in_a_finalized_invoices_period_is_invoiced_and_kept(
    tmp_path: Path, stores: list[Store]
) -> None:
    s = store_with(tmp_path, "s", RECORDS)
    stores.append(s)
    s.invoice_create(
        InvoiceRow("inv_1", "c1", "draft", ts(NOW), None, {"lines": []}, {}, None, *DAY)
    )
    draft = s.cancel_records(["a"], None, ts(NOW), {})
    assert draft[0].status == "cancelled"  # a draft is recomputed: the record just goes
    row = s.invoice_get("inv_1")
    assert row is not None
    s.invoice_finalize(row, ts(NOW), [], lambda n: _final(n))
    [kept] = s.cancel_records(["b"], None, ts(NOW), {})
    assert (kept.status, kept.invoice_id) == ("invoiced", "inv_1")
    assert len(s.raw("c1", "d1", *DAY)) == len(RECORDS) - 1


def _final(number: str) -> Any:
    from meter_gateway.store.base import FinalInvoice

    return FinalInvoice({"number": number, "lines": []}, {"json": b"{}"}, [])


def test_seqs_of_cancelled_records_are_not_given_again(tmp_path: Path) -> None:
    s = store_with(tmp_path, "s", RECORDS)
    last = max(r.seq for r in s.records("c1", "d1", *DAY, None, 100))
    s.cancel_records(["e"], None, ts(NOW), {})  # the latest record by seq
    s.close()
    s = open_store(tmp_path / "s")
    try:
        s.commit([Batch(Source.REST, [usage("2026-05-01T12:00:00", "1", "g")])], ts(NOW))
        [g] = [r for r in s.records("c1", "d1", *DAY, None, 100) if r.record_id == "g"]
        assert g.seq > last
    finally:
        s.close()


def test_sqlite_cancellation_waits_for_groups_in_flight_and_keeps_its_cache(
    tmp_path: Path, stores: list[Store]
) -> None:
    from meter_gateway.store.sqlite import SQLiteStore

    # The SQLite pipeline (prepare/apply) and its rollup cache: SQLite in both suite runs.
    s = store_with(tmp_path, "s", RECORDS, sqlite=True)
    stores.append(s)
    assert isinstance(s, SQLiteStore)
    late = usage("2026-05-01T10:45:00", "7", "late", "u9")
    prepared = s.prepare([Batch(Source.REST, [late])], ts(NOW))  # merged with "b" in it
    results: list[Any] = []
    t = threading.Thread(target=lambda: results.extend(s.cancel_records(["b"], None, 0, {})))
    t.start()
    s.apply(prepared)  # had the cancellation not waited, this would write "b" back
    t.join()
    assert [r.status for r in results] == ["cancelled"]
    after = usage("2026-05-01T10:50:00", "1", "after", "u9")
    s.commit([Batch(Source.REST, [after])], ts(NOW))  # merged from the rebuilt row
    never = store_with(
        tmp_path, "never", [r for r in RECORDS if r.record_id != "b"] + [late, after], sqlite=True
    )
    stores.append(never)
    assert _same_rollups(s, never)
    for kind in KINDS:
        assert aggregate(s, "c1", dimension(kind), WINDOWS[2]) == aggregate(
            never, "c1", dimension(kind), WINDOWS[2]
        ), kind


# --- against a running gateway ----------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(Path(tmp_path_factory.mktemp("gateway"))).start()
    yield gw
    gw.stop()


def _post(client: httpx.Client, records: list[dict[str, Any]]) -> None:
    r = client.post("/v1/usage", json=records)
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == len(records), r.text


def test_cancellation_over_http(client: httpx.Client) -> None:
    n = next_id()
    ids = [f"cx-{n}-{i}" for i in range(3)]
    records = [
        {"id": rid, "timestamp": now_iso(), "customerId": "acme", "dimensionId": "active-users",
         "recordValue": 1, "metadata": {"user_id": f"user-{n}-{i % 2}"}}
        for i, rid in enumerate(ids)
    ]  # fmt: skip
    _post(client, records)
    summary = client.get("/v1/customers/acme/usage-summary").json()
    users = next(d for d in summary["dimensions"] if d["dimensionId"] == "active-users")

    body = {"ids": [ids[2], f"cx-{n}-missing"], "reason": "test traffic"}
    key = {"Idempotency-Key": f"cancel-{n}"}
    r = client.post("/v1/usage/cancellations", json=body, headers=key)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "results": [
            {"id": ids[2], "status": "cancelled", "invoiceId": None},
            {"id": f"cx-{n}-missing", "status": "not_found", "invoiceId": None},
        ]
    }
    replay = client.post("/v1/usage/cancellations", json=body, headers=key)
    assert (replay.status_code, replay.json()) == (200, r.json())
    assert replay.headers["Idempotent-Replayed"] == "true"
    other = client.post("/v1/usage/cancellations", json={"ids": [ids[0]]}, headers=key)
    assert other.status_code == 409
    again = client.post("/v1/usage/cancellations", json={"ids": [ids[2]]})
    assert again.json()["results"][0]["status"] == "already_cancelled"

    # user-{n}-0 still has a record (ids[0]); the count did not move. Cancel it too: one less.
    after = client.get("/v1/customers/acme/usage-summary").json()
    assert next(d for d in after["dimensions"] if d["dimensionId"] == "active-users") == users
    client.post("/v1/usage/cancellations", json={"ids": [ids[0]]})
    fewer = client.get("/v1/customers/acme/usage-summary").json()
    now_users = next(d for d in fewer["dimensions"] if d["dimensionId"] == "active-users")
    assert Decimal(now_users["quantity"]) == Decimal(users["quantity"]) - 1

    # the id sent again is a duplicate
    resent = client.post("/v1/usage", json=records[2])
    assert resent.json()["duplicates"] == 1, resent.text
    page = client.get("/v1/usage/cancellations", params={"limit": 1000}).json()
    mine = [c for c in page["data"] if c["id"] in ids]
    assert [(c["id"], c["reason"]) for c in mine] == [(ids[2], "test traffic"), (ids[0], None)]
    assert (mine[0]["customerId"], mine[0]["recordValue"]) == ("acme", "1")


def test_cancellation_of_invoiced_usage_and_bad_bodies(
    client: httpx.Client, gateway: GatewayProcess
) -> None:
    n = next_id()
    rid = f"inv-{n}"
    _post(client, [{"id": rid, "timestamp": now_iso(), "customerId": "dumm-ai",
                    "dimensionId": "data-processed", "recordValue": "2.5"}])  # fmt: skip
    created = client.post(
        "/v1/customers/dumm-ai/invoices",
        json={"from": "2020-01-01T00:00:00Z", "to": "2100-01-01T00:00:00Z"},
    )
    assert created.status_code == 201, created.text
    inv = created.json()["id"]
    assert client.post(f"/v1/invoices/{inv}/finalize").status_code == 200
    r = client.post("/v1/usage/cancellations", json={"ids": [rid]})
    assert r.json()["results"] == [{"id": rid, "status": "invoiced", "invoiceId": inv}]
    assert client.post(f"/v1/invoices/{inv}/void").status_code == 200
    r = client.post("/v1/usage/cancellations", json={"ids": [rid]})
    assert r.json()["results"][0]["status"] == "cancelled"  # the void freed the period

    for bad in ({"ids": []}, {"ids": [rid], "extra": 1}, {"ids": "x"}, {"reason": "no ids"}):
        assert client.post("/v1/usage/cancellations", json=bad).status_code in (400, 422)
    assert client.get("/v1/usage/cancellations", params={"bogus": "1"}).status_code == 400
    with gateway.client(READ_KEY) as reader:
        assert reader.post("/v1/usage/cancellations", json={"ids": [rid]}).status_code == 403
        assert reader.get("/v1/usage/cancellations").status_code == 200


def test_sqlite_finds_ids_both_indexed_and_not_yet_indexed(
    tmp_path: Path, stores: list[Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite indexes record ids behind the commits, in batches (``record_ids``): an id is
    found whether its record is indexed yet or not, once per record even when the same id was
    sent again after the dedup window, and a reopened store goes on from where indexing was."""
    from meter_gateway.store import sqlite

    monkeypatch.setattr(sqlite, "_IDS_BATCH", 4)
    monkeypatch.setattr(sqlite, "_IDS_CHUNK", 3)
    s = store_with(tmp_path, "s", RECORDS, sqlite=True)
    stores.append(s)
    assert isinstance(s, sqlite.SQLiteStore)
    with s._dialect.reading() as tx:
        indexed = {str(r[0]) for r in tx.all("SELECT record_id FROM record_ids")}
        upto = tx.one("SELECT seq FROM record_ids_upto")
    assert indexed == {"a", "b", "c"}  # at the 4th commit, one chunk of 3; d, e, f are not yet
    assert upto == (3,)
    # an id seen again after the window is a second record with the same id (two seqs)
    s.commit([Batch(Source.REST, [usage("2026-05-01T12:00:00", "1", "a")])], ts("2026-06-10"))
    results = s.cancel_records(["a", "e", "zz", "c"], None, ts(NOW), {})
    assert [(r.id, r.status) for r in results] == [
        ("a", "cancelled"),
        ("e", "cancelled"),
        ("zz", "not_found"),
        ("c", "cancelled"),
    ]
    gone = s.cancellations(None, 100)
    assert sorted(g.record_id for g in gone) == ["a", "a", "c", "e"]
    left = {r.record_id for r in s.records("c1", "d1", 0, ts("2026-07-01T00:00:00"), None, 100)}
    assert left == {"b", "d", "f"}
    s.close()
    stores.remove(s)
    s = open_any_store(f"sqlite:///{tmp_path / 's' / 't.db'}", 35 * 86400, ts(NOW))
    stores.append(s)
    assert [r.status for r in s.cancel_records(["d", "a"], None, ts(NOW), {})] == [
        "cancelled",
        "already_cancelled",
    ]


def test_sqlite_version_7_database_gets_its_ids_indexed(tmp_path: Path) -> None:
    """Migration 8 moves the ids of an existing database into ``record_ids``."""
    path = tmp_path / "old.db"
    sqlite_at_version(
        path, 7, [(1, ts("2026-05-01T10:00:00"), "x"), (2, ts("2026-05-01T10:01:00"), None)]
    ).close()
    s = open_any_store(f"sqlite:///{path}", 35 * 86400, ts(NOW))
    try:
        assert [r.status for r in s.cancel_records(["x"], None, ts(NOW), {})] == ["cancelled"]
        assert [r.record_id for r in s.records("c1", "d1", *DAY, None, 10)] == [None]
    finally:
        s.close()
