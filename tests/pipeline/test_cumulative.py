"""Cumulative → delta conversion: the pure rules, state encoding, and the per-series holds."""

from __future__ import annotations

import threading
from decimal import Decimal

import pytest

from meter_gateway.pipeline.cumulative import (
    StreamsBusy,
    StreamState,
    StreamTable,
    convert,
    decode_state,
    encode_state,
)

# --- conversion rules (pure) -----------------------------------------------------------------


def S(start: int, t: int, value: str, total: str | None = None) -> StreamState:
    return StreamState(start, t, Decimal(value), None if total is None else Decimal(total))


@pytest.mark.parametrize(
    ("state", "point", "kind", "delta"),
    [
        (None, (100, 160, "42"), "delta", "42"),  # true start: the whole value
        (None, (160, 160, "42"), "baseline", "0"),  # unknown start: nothing
        (None, (0, 160, "42"), "baseline", "0"),  # no start at all: unknown
        (S(100, 160, "42"), (100, 220, "50"), "delta", "8"),
        (S(100, 160, "42"), (100, 220, "42"), "unchanged", "0"),
        (S(100, 160, "42"), (100, 160, "42"), "repeated", "0"),  # a retried export
        (S(100, 220, "50"), (100, 160, "42"), "repeated", "0"),  # an older export, late
        (S(100, 160, "42"), (100, 220, "5"), "delta", "5"),  # a drop: reset, count from 0
        (S(100, 160, "42"), (200, 220, "5"), "delta", "5"),  # new start time: app restart
        (S(100, 160, "42"), (220, 220, "5"), "baseline", "0"),  # restart, unknown start
        (S(200, 260, "5"), (100, 280, "60"), "stale", "0"),  # a point of the older run
        (S(0, 160, "42"), (0, 220, "45.5"), "delta", "3.5"),  # unknown start continues
    ],
)
def test_convert_monotonic(
    state: StreamState | None, point: tuple[int, int, str], kind: str, delta: str
) -> None:
    start, t, value = point
    step = convert(state, start, t, Decimal(value), None, True)
    assert (step.kind, step.delta) == (kind, Decimal(delta))
    if kind in ("delta", "baseline", "unchanged"):
        assert step.state == S(start, t, value)
    else:
        assert step.state is None


def test_convert_non_monotonic_gives_signed_changes() -> None:
    step = convert(S(100, 160, "40"), 100, 220, Decimal(25), None, False)
    assert (step.kind, step.delta) == ("delta", Decimal(-15))


def test_convert_histogram_sum_follows_count() -> None:
    step = convert(S(100, 160, "2", "1500"), 100, 220, Decimal(5), Decimal("1600.5"), True)
    assert (step.delta, step.delta_sum) == (Decimal(3), Decimal("100.5"))
    reset = convert(S(100, 160, "5", "1600"), 100, 220, Decimal(1), Decimal(100), True)
    assert (reset.delta, reset.delta_sum) == (Decimal(1), Decimal(100))


@pytest.mark.parametrize(
    "state", [S(1, 2, "3"), S(0, 2, "1E+3", "-0.25"), S(5, 6, "0.000000000000000001", "0")]
)
def test_state_round_trips(state: StreamState) -> None:
    assert decode_state(encode_state(state)) == state


class DictState:
    def __init__(self, rows: dict[str, bytes]) -> None:
        self.rows = rows
        self.reads = 0

    def state_get(self, keys: list[str]) -> dict[str, bytes]:
        self.reads += 1
        return {k: self.rows[k] for k in keys if k in self.rows}

    def state_scan(self, prefix: str) -> dict[str, bytes]:
        return {k: v for k, v in self.rows.items() if k.startswith(prefix)}


def test_table_reads_its_prefix_caches_commits_and_writes_state_keys() -> None:
    store = DictState({"vec/a": encode_state(S(0, 10, "5")), "otlp/a": encode_state(S(1, 2, "3"))})
    table = StreamTable(store, "vec/")
    assert table.load({"a", "b"}) == {"a": S(0, 10, "5")}
    new = {"a": S(0, 20, "7")}
    assert table.writes(new) == {"vec/a": b"0 20 7"}
    table.committed(new)
    reads = store.reads
    assert table.load({"a"}) == new
    assert store.reads == reads  # served from the cache
    # expiry looks at what the store has committed under this prefix only
    assert table.stale(10) == set()
    assert table.stale(11) == {"a"}


def test_holds_exclude_each_other_and_time_out() -> None:
    table = StreamTable(DictState({}), "p/", wait_s=0.05)
    with table.hold({"a", "b"}):
        with pytest.raises(StreamsBusy), table.hold({"b"}):
            pass
        with table.hold({"c"}):  # disjoint series do not wait
            pass
    got = threading.Event()

    def take() -> None:
        with table.hold({"a"}):
            got.set()

    t = threading.Thread(target=take)
    t.start()
    t.join()
    assert got.is_set()
