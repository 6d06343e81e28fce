"""Remote write's counter state, one row per group of series (``pipeline.cumulative.TotalGroups``),
in-process on the store METER_TEST_STORE names: what a request commits, a restart, state written
one row per series before groups, and other replicas moving a group first."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import cramjam
import pytest

from meter_gateway.clock import FixedClock
from meter_gateway.config import Config
from meter_gateway.model import Batch, CommitResult, Source
from meter_gateway.pipeline.cumulative import (
    GROUP_KEY,
    POINTER,
    StreamState,
    decode_group,
    encode_state,
)
from meter_gateway.service import Gateway
from receivers import prompb
from receivers.remote_write import STATE_PREFIX
from tests import pgdb
from tests.gatewayproc import BASE_CONFIG
from tests.pgdb import store_url

NOW = 1777637400000000000  # 2026-05-01T12:10:00Z
T0_MS = (NOW - 600 * 1_000_000_000) // 1_000_000
METRIC = "app_bytes_processed_total"


def _config(url: str) -> Config:
    config = dict(BASE_CONFIG)
    config["store"] = {"url": url}
    config["rules"] = [
        {
            "match": {"source": "remote_write", "metric": METRIC},
            "dimension": "data-processed",
            "customer_attribute": "tenant",
        }
    ]
    return Config.model_validate(config)


def _gateway(workdir: Path) -> Iterator[Gateway]:
    g = Gateway(_config(store_url(workdir, "g.db")), clock=FixedClock(NOW))
    try:
        yield g
    finally:
        g.close()


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[Gateway]:
    yield from _gateway(tmp_path)


def body(pods: range, value: float, second: int, tenant: str = "acme") -> bytes:
    req = prompb.WriteRequest()
    for i in pods:
        ts = req.timeseries.add()
        ts.labels.add(name="__name__", value=METRIC)
        ts.labels.add(name="pod", value=f"p{i}")
        ts.labels.add(name="tenant", value=tenant)
        ts.samples.add(value=value, timestamp=T0_MS + second * 1000)
    return bytes(cramjam.snappy.compress_raw(req.SerializeToString()))


def send(g: Gateway, raw: bytes) -> Batch:
    batch, decoded = g.remote_write.batch(raw)
    g.remote_write.commit(batch, decoded)
    return batch


def totals(g: Gateway) -> dict[str, Decimal]:
    out: dict[str, Decimal] = {}
    for r in g.store.records(None, None, 0, 2**62, None, 100_000):
        out[r.customer_id] = out.get(r.customer_id, Decimal(0)) + r.value
    return out


def state(g: Gateway) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """The receiver's state rows: (group rows by group id, other rows by series id)."""
    groups: dict[str, bytes] = {}
    series: dict[str, bytes] = {}
    for key, raw in g.store.state_scan(STATE_PREFIX).items():
        rest = key.removeprefix(STATE_PREFIX)
        if rest.startswith(GROUP_KEY):
            groups[rest.removeprefix(GROUP_KEY)] = raw
        else:
            series[rest] = raw
    return groups, series


def test_a_request_commits_a_row_per_group_and_a_pointer_once_per_series(gw: Gateway) -> None:
    size = gw.remote_write.totals.table._size  # type: ignore[union-attr]
    n = 2 * size + 10
    first = send(gw, body(range(n), 0, 0))
    groups, pointers = state(gw)
    assert sorted(len(decode_group(raw)) for raw in groups.values()) == [10, size, size]
    assert len(pointers) == n
    assert {raw[1:].decode() for raw in pointers.values()} == set(groups)
    assert all(raw.startswith(POINTER) for raw in pointers.values())
    assert len(first.state) == n + 3
    # the same series again: only their groups' rows are written
    again = send(gw, body(range(n), 3, 1))
    assert sorted(again.state) == sorted(STATE_PREFIX + GROUP_KEY + gid for gid in groups)
    assert totals(gw) == {"acme": Decimal(3 * n)}
    # a new series joins a group the request touches that has room
    send(gw, body(range(n + 1), 6, 2))
    after, pointers = state(gw)
    assert len(after) == 3
    assert sorted(len(decode_group(raw)) for raw in after.values()) == [11, size, size]
    assert totals(gw) == {"acme": Decimal(6 * n)}  # the new series' first total: a baseline


def test_a_restarted_gateway_continues_from_the_group_rows(tmp_path: Path) -> None:
    for g in _gateway(tmp_path):
        send(g, body(range(20), 10, 0))
        send(g, body(range(20), 12, 1))
    for g in _gateway(tmp_path):  # a new process: its caches are empty, the store has the state
        send(g, body(range(20), 12, 1))  # a retry of the last request
        send(g, body(range(20), 20, 2))
        send(g, body(range(20), 5, 3))  # a reset: counts from zero
        assert totals(g) == {"acme": Decimal(20 * (2 + 8 + 5))}
        groups, pointers = state(g)
        assert len(groups) == 1
        assert len(pointers) == 20


def test_state_kept_one_row_per_series_before_groups_is_continued(tmp_path: Path) -> None:
    """A gateway upgraded over state written one row per series (``remote_write/<series>``,
    ``StreamTable``) converts against it, and the commit that next moves a series puts it into
    a group and turns its row into the pointer."""
    for g in _gateway(tmp_path):
        send(g, body(range(3), 10, 0))
        groups, _pointers = state(g)
        ((gid, row),) = groups.items()
        old: dict[str, bytes | None] = {STATE_PREFIX + GROUP_KEY + gid: None}
        for sid, (start, t, value, _, _) in decode_group(row).items():
            old[STATE_PREFIX + sid] = encode_state(StreamState(start, t, value))
        g.store.commit([Batch(Source.REMOTE_WRITE, state=old)], NOW)
        assert state(g) == ({}, {k.removeprefix(STATE_PREFIX): v for k, v in old.items() if v})
    for g in _gateway(tmp_path):
        send(g, body(range(2), 14, 1))  # two of the three series move
        assert totals(g) == {"acme": Decimal(2 * 4)}
        groups, series = state(g)
        assert len(groups) == 1
        assert sorted(decode_group(next(iter(groups.values())))) == sorted(
            sid for sid, raw in series.items() if raw.startswith(POINTER)
        )
        assert sum(1 for raw in series.values() if raw.startswith(POINTER)) == 2
        assert sum(1 for raw in series.values() if not raw.startswith(POINTER)) == 1
        send(g, body(range(3), 15, 2))  # the third converts against its old row, then moves
        assert totals(g) == {"acme": Decimal(2 * 4 + 2 * 1 + 5)}
        groups, series = state(g)
        assert all(raw.startswith(POINTER) for raw in series.values())
        assert len(series) == 3


def test_a_group_another_replica_moved_converts_again_against_its_row(gw: Gateway) -> None:
    """Another replica commits a step of one series of a group this gateway has cached: the
    next request conflicts on the group's row and converts again against that replica's row,
    so the step counts once."""
    send(gw, body(range(4), 10, 0))
    send(gw, body(range(4), 12, 1))
    groups, _ = state(gw)
    ((gid, row),) = groups.items()
    entries = decode_group(row)
    moved = sorted(entries)[0]
    lines = [
        f"{sid}:0:{t + 500_000_000} 15" if sid == moved else line
        for sid, (_, t, _, _, line) in entries.items()
    ]
    key = STATE_PREFIX + GROUP_KEY + gid
    other = Batch(Source.REMOTE_WRITE, state={key: ";".join(lines).encode()})
    (result,) = gw.store.commit([other], NOW)  # the other replica's step of 3 (its record aside)
    assert not result.conflict
    conflicts = []
    submit = gw.remote_write.totals._committer.submit_sync

    def watch(batch: Batch, timeout: float | None = None) -> CommitResult:
        r = submit(batch, timeout)
        conflicts.append(r.conflict)
        return r

    gw.remote_write.totals._committer.submit_sync = watch  # type: ignore[method-assign]
    send(gw, body(range(4), 20, 2))
    assert conflicts == [True, False]
    # 4 × 2, then the moved series 20 - 15 and the others 20 - 12
    assert totals(gw) == {"acme": Decimal(4 * 2 + 5 + 3 * 8)}


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL database of its own, whichever store the suite runs on: replicas share
    one (as tests/test_replicas.py does)."""
    url = pgdb.create_database()
    yield url
    pgdb.drop_database(url)


def test_replicas_alternating_on_one_group_count_every_step_once(pg_url: str) -> None:
    a = Gateway(_config(pg_url), clock=FixedClock(NOW))
    b = Gateway(_config(pg_url), clock=FixedClock(NOW))
    try:
        replicas = [a, b]
        for k in range(8):  # every request on the other replica than the last
            send(replicas[k % 2], body(range(30), 3 * k, k))
        # new series first seen on both at once: one group each, one pointer wins per series
        send(a, body(range(30, 40), 0, 8))
        send(b, body(range(30, 40), 1, 8))  # a repeat of the same time: nothing, one group
        send(b, body(range(30, 40), 4, 9))
        assert totals(a) == {"acme": Decimal(30 * 7 * 3 + 10 * 4)}
        groups, pointers = state(a)
        assert set(groups) == {raw[1:].decode() for raw in pointers.values()}
    finally:
        a.close()
        b.close()
