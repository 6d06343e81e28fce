"""Cumulative → delta conversion: the pure rules, state encoding, and the per-series holds."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from meter_gateway.catalog import Catalog
from meter_gateway.clock import FixedClock
from meter_gateway.config import Config, IngestConfig, Rule
from meter_gateway.decimals import DecimalError, parse_value
from meter_gateway.model import (
    Batch,
    CommitResult,
    Observation,
    ObservationKind,
    Reason,
    Source,
    UsageRecord,
)
from meter_gateway.pipeline.cumulative import (
    Entry,
    InexactStep,
    SeriesMappings,
    StreamGroups,
    StreamsBusy,
    StreamState,
    StreamTable,
    TimeWindow,
    TotalGroups,
    Totals,
    convert,
    decode_group,
    decode_state,
    encode_state,
    entry,
)
from meter_gateway.pipeline.decode import Item
from meter_gateway.pipeline.mapping import Mapper
from meter_gateway.service import Gateway
from tests.gatewayproc import BASE_CONFIG

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

    def state_get(self, keys: Sequence[str]) -> dict[str, bytes]:
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


# --- state kept per group of series ---------------------------------------------------------


def E(sid: str, start: int, t: int, value: str, total: str | None = None) -> Entry:
    return entry(sid, start, t, Decimal(value), None if total is None else Decimal(total))


def test_a_group_row_round_trips_every_entry() -> None:
    entries = {"a": E("a", 1, 2, "3"), "b": E("b", 0, 5, "1E+3", "-0.25")}
    raw = ";".join(e[4] for e in entries.values()).encode()
    assert raw == b"a:1:2 3;b:0:5 1E+3 -0.25"
    assert decode_group(raw) == entries


def test_groups_commit_one_row_each_expect_its_bytes_and_cache_what_committed() -> None:
    store = DictState({"otlp/g/m": b"a:1:10 5;b:1:10 7", "otlp/g/other": b"z:1:1 1"})
    groups = StreamGroups(store, "otlp/")
    view = groups.load({"m": {"a", "c"}})
    assert (view.states["a"], "c" in view.states) == (E("a", 1, 10, "5"), False)
    changes = view.changes({"a": E("a", 1, 20, "9"), "c": E("c", 1, 20, "1")})
    # the whole row, b as it was, expecting the bytes read
    assert changes.state == {"otlp/g/m": b"a:1:20 9;b:1:10 7;c:1:20 1"}
    assert changes.expect == {"otlp/g/m": b"a:1:10 5;b:1:10 7"}
    groups.committed(changes)
    reads = store.reads
    again = groups.load({"m": {"b", "c"}})
    assert store.reads == reads  # the row as committed, from the cache
    assert again.changes({"b": E("b", 1, 30, "8")}).expect == changes.state
    # a new group: no row expected
    fresh = groups.load({"n": {"x"}}).changes({"x": E("x", 0, 5, "2")})
    assert (fresh.state, fresh.expect) == ({"otlp/g/n": b"x:0:5 2"}, {"otlp/g/n": None})


def test_a_series_in_a_row_of_its_own_moves_into_its_group_in_the_same_commit() -> None:
    """State written before groups (one row per series) is continued, never counted again."""
    legacy = encode_state(S(1, 10, "5"))
    store = DictState({"otlp/a": legacy, "otlp/g/m": b"b:1:10 7"})
    groups = StreamGroups(store, "otlp/")
    view = groups.load({"m": {"a", "b", "c"}})
    assert view.states["a"] == E("a", 1, 10, "5")
    changes = view.changes({"b": E("b", 1, 20, "8")})  # a did not move: it moves in anyway
    assert changes.state == {"otlp/g/m": b"b:1:20 8;a:1:10 5", "otlp/a": None}
    assert changes.expect == {"otlp/g/m": b"b:1:10 7", "otlp/a": legacy}


def test_a_group_another_replica_moved_conflicts_and_is_read_again() -> None:
    store = DictState({"otlp/g/m": b"a:1:10 5"})
    groups = StreamGroups(store, "otlp/")
    changes = groups.load({"m": {"a"}}).changes({"a": E("a", 1, 20, "6")})
    committer = Committed(store)
    store.rows["otlp/g/m"] = b"a:1:20 6"  # another replica committed first
    batch = Batch(Source.OTLP, state=changes.state, state_expect=changes.expect)
    assert committer.submit_sync(batch).conflict
    groups.forget({"m"})
    assert groups.load({"m": {"a"}}).states["a"] == E("a", 1, 20, "6")


def test_expiry_drops_stale_series_from_their_group_and_empty_groups_and_old_rows() -> None:
    store = DictState(
        {
            "otlp/g/m": b"a:1:10 5;b:1:30 7",
            "otlp/g/n": b"c:1:10 1",
            "otlp/d": encode_state(S(1, 10, "2")),
            "otlp/e": encode_state(S(1, 30, "2")),
        }
    )
    groups = StreamGroups(store, "otlp/")
    stale = groups.stale(20)
    assert stale == {"m": {"a"}, "n": {"c"}, "": {"d"}}
    changes, n = groups.expire(stale, 20)
    assert n == 3
    assert changes.state == {"otlp/g/m": b"b:1:30 7", "otlp/g/n": None, "otlp/d": None}
    assert changes.expect == {
        "otlp/g/m": b"a:1:10 5;b:1:30 7",
        "otlp/g/n": b"c:1:10 1",
        "otlp/d": store.rows["otlp/d"],
    }
    assert sum(map(len, groups.stale(20, limit=2).values())) == 2


def test_group_holds_exclude_each_other() -> None:
    groups = StreamGroups(DictState({}), "p/", wait_s=0.05)
    with groups.hold({"m"}):
        with pytest.raises(StreamsBusy), groups.hold({"m", "n"}):
            pass
        with groups.hold({"n"}):
            pass


# --- running totals: time window, exact steps, versions, known series ------------------------

NOW = 1_800_000_000 * 1_000_000_000


class RecordingSink:
    """The validator's part: every amount becomes a record of customer c1 / dimension d."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.seen: list[Observation] = []

    def observations(self, observations: Sequence[Observation], source: Source) -> Batch:
        self.seen.extend(observations)
        batch = Batch(source)
        for obs in observations:
            batch.records.append(
                UsageRecord(obs.timestamp_ns, "c1", "d", obs.value, None, {}, source, b"k")
            )
        return batch


class Committed:
    def __init__(self, table_store: DictState) -> None:
        self.store = table_store
        self.batches: list[Batch] = []

    def submit_sync(self, batch: Batch, timeout: float | None = None) -> CommitResult:
        current = self.store.rows
        if any(current.get(k) != v for k, v in batch.state_expect.items()):
            return CommitResult(0, 0, 0, conflict=True)
        for k, v in batch.state.items():
            if v is None:
                current.pop(k, None)
            else:
                current[k] = v
        self.batches.append(batch)
        return CommitResult(len(batch.records), 0, len(batch.errors))


def _totals(
    store: DictState, sink: RecordingSink, clock: FixedClock, mappings: bool = False
) -> tuple[Totals, Committed]:
    committer = Committed(store)
    known = None
    if mappings:
        rule = Rule.model_validate(
            {"match": {"source": "remote_write"}, "dimension": "d", "customer_attribute": "t"}
        )
        known = SeriesMappings(
            Source.REMOTE_WRITE, Mapper([rule]), lambda: sink.catalog, clock, IngestConfig()
        )
    totals = Totals(
        StreamTable(store, "rw/"),
        sink,
        committer,
        window=TimeWindow(clock, IngestConfig()),
        mappings=known,
    )
    return totals, committer


def _total(value: str, t: int) -> Observation:
    return Observation(
        Source.REMOTE_WRITE, "x_total", {"t": "a"}, Decimal(value), ObservationKind.CUMULATIVE, t
    )


def _send(totals: Totals, *points: tuple[str, int]) -> Batch:
    batch = Batch(Source.REMOTE_WRITE)
    batch.cumulative = [(i, _total(v, t)) for i, (v, t) in enumerate(points)]
    totals.commit(batch)
    return batch


@pytest.mark.parametrize(
    ("offset_s", "reason", "wording"),
    [
        (3600, Reason.IN_FUTURE, "is more than 5m in the future"),
        (-36 * 86400, Reason.TOO_LATE, "is older than the late-arrival limit (35d)"),
    ],
)
def test_a_total_out_of_the_time_window_is_refused_before_it_converts(
    offset_s: int, reason: Reason, wording: str
) -> None:
    store, clock = DictState({}), FixedClock(NOW)
    totals, _ = _totals(store, RecordingSink(Catalog()), clock)
    bad = _send(totals, ("1000", NOW + offset_s * 1_000_000_000))
    assert [(e.reason, e.field) for e in bad.errors] == [(reason, "timestamp")]
    assert wording in bad.errors[0].error  # the validator's wording (validate.time_window_error)
    assert store.rows == {}  # it did not become the series' state
    # the valid totals after it count as they should: baseline 10, then 4
    ok = _send(totals, ("10", NOW - 2_000_000_000), ("14", NOW - 1_000_000_000))
    assert ok.errors == []
    assert [r.value for r in ok.records] == [Decimal(4)]


def test_a_step_the_exact_context_would_round_is_refused_not_stored() -> None:
    # parse_value refuses such a total on the way in (more than 18 places), so no receiver
    # can send one; Totals still refuses to round if one ever gets here.
    with pytest.raises(DecimalError):
        parse_value("1e-200")
    with pytest.raises(InexactStep):
        convert(S(0, 1, "1E-200"), 0, 2, Decimal(5), None, True)
    store, clock = DictState({}), FixedClock(NOW)
    totals, _ = _totals(store, RecordingSink(Catalog()), clock)
    _send(totals, ("1E-200", NOW - 3_000_000_000))  # the baseline
    before = dict(store.rows)
    batch = _send(totals, ("5", NOW - 2_000_000_000))
    assert [(e.reason, e.field) for e in batch.errors] == [(Reason.INVALID_VALUE, "value")]
    assert "needs more than 120 digits" in batch.errors[0].error
    assert batch.records == []
    assert store.rows == before  # the state did not move to an altered value


def test_a_known_series_converts_against_its_version_without_reading_the_store() -> None:
    store, clock = DictState({}), FixedClock(NOW)
    totals, committer = _totals(store, RecordingSink(Catalog()), clock)
    _send(totals, ("10", NOW - 3_000_000_000))
    reads = store.reads
    batch = _send(totals, ("15", NOW - 2_000_000_000))
    assert store.reads == reads
    (key,) = batch.state_expect
    assert batch.state_expect[key] == b"0 %d 10" % (NOW - 3_000_000_000)
    # another replica moves the series: the commit conflicts, and the total converts again
    # against what that replica committed
    store.rows[key] = encode_state(S(0, NOW - 1_500_000_000, "20"))
    again = _send(totals, ("26", NOW - 1_000_000_000))
    assert [r.value for r in again.records] == [Decimal(6)]
    assert store.rows[key] == encode_state(S(0, NOW - 1_000_000_000, "26"))
    assert len(committer.batches) == 3


def test_known_series_skip_the_validator_until_the_catalog_changes() -> None:
    store, clock = DictState({}), FixedClock(NOW)
    sink = RecordingSink(Catalog())
    totals, _ = _totals(store, sink, clock, mappings=True)
    _send(totals, ("10", NOW - 4_000_000_000))
    _send(totals, ("15", NOW - 3_000_000_000))  # validated: its mapping is learned
    assert len(sink.seen) == 1
    fast = _send(totals, ("17", NOW - 2_000_000_000))
    assert len(sink.seen) == 1  # made directly
    (r,) = fast.records
    assert (r.customer_id, r.dimension_id, r.value) == ("c1", "d", Decimal(2))
    # no dedup key, as the validated amount had none: the series' state, committed with the
    # record, is what makes a resent total add nothing
    assert r.dedup_key is None
    assert sink.seen[0].natural_key is None
    again = _send(totals, ("17", NOW - 2_000_000_000))
    assert again.records == []
    old = weakref.ref(sink.catalog)
    sink.catalog = Catalog()  # a catalog change (an alias added, a customer replaced)
    gc.collect()
    assert old() is None, "a learned series mapping keeps an old catalog snapshot alive"
    _send(totals, ("20", NOW - 1_000_000_000))
    assert len(sink.seen) == 2  # validated again under the new snapshot
    _send(totals, ("22", NOW - 500_000_000))
    assert len(sink.seen) == 2  # learned again: made directly


def test_the_gateway_checks_vector_absolute_counters_against_the_window(tmp_path: Path) -> None:
    """The service hands Vector's Totals the time window: an absolute counter from the future
    is refused (in_future) and does not become its series' state."""
    config = dict(BASE_CONFIG)
    config["store"] = {"url": f"sqlite:///{tmp_path}/db.sqlite"}
    config["rules"] = [
        {
            "match": {"source": "vector", "metric": "app_total"},
            "dimension": "data-processed",
            "customer_attribute": "tenant",
        }
    ]
    clock = FixedClock(NOW)
    gw = Gateway(Config.model_validate(config), clock=clock)
    try:

        def post(*totals: tuple[float, int]) -> Batch:
            items: list[Item] = [
                {
                    "name": "app_total",
                    "kind": "absolute",
                    "counter": {"value": v},
                    "tags": {"tenant": "acme"},
                    "timestamp": datetime.fromtimestamp(t / 1e9, UTC).isoformat(),
                }
                for v, t in totals
            ]
            batch = gw.validator.batch(items, Source.REST)
            gw.totals.commit(batch)
            return batch

        future = post((1000.0, NOW + 3600 * 1_000_000_000))
        assert [(e.reason, e.field) for e in future.errors] == [(Reason.IN_FUTURE, "timestamp")]
        later = post((10.0, NOW - 2_000_000_000), (14.0, NOW - 1_000_000_000))
        assert later.errors == []
        assert [r.value for r in later.records] == [Decimal(4)]
    finally:
        gw.close()


# --- running totals kept one row per group (TotalGroups) ---------------------------------------


def _grouped(store: DictState, sink: RecordingSink, clock: FixedClock) -> tuple[Totals, Committed]:
    committer = Committed(store)
    totals = Totals(
        TotalGroups(store, "rw/", group_size=2),
        sink,
        committer,
        window=TimeWindow(clock, IngestConfig()),
    )
    return totals, committer


def _totals_of(*points: tuple[str, str, int]) -> Batch:
    batch = Batch(Source.REMOTE_WRITE)
    batch.cumulative = [
        (
            i,
            Observation(
                Source.REMOTE_WRITE, "x_total", {"t": t}, Decimal(v), ObservationKind.CUMULATIVE, ts
            ),
        )
        for i, (t, v, ts) in enumerate(points)
    ]
    return batch


def test_a_new_series_another_replica_gave_a_group_first_converts_into_that_group() -> None:
    """Two replicas first see one series at once: both write its pointer expecting none, the
    later commit conflicts, and the series converts again in the other replica's group."""
    store, clock = DictState({}), FixedClock(NOW)
    other, _ = _grouped(store, RecordingSink(Catalog()), clock)
    mine, committer = _grouped(store, RecordingSink(Catalog()), clock)
    t1, t2 = NOW - 2_000_000_000, NOW - 1_000_000_000
    submit = committer.submit_sync
    tries: list[bool] = []

    def racing(batch: Batch, timeout: float | None = None) -> CommitResult:
        if not tries:  # the other replica commits the same series' baseline and a step first
            other.commit(_totals_of(("a", "10", t1)))
            other.commit(_totals_of(("a", "13", t2)))
        result = submit(batch, timeout)
        tries.append(result.conflict)
        return result

    committer.submit_sync = racing  # type: ignore[method-assign]
    batch = _totals_of(("a", "20", NOW))
    mine.commit(batch)
    assert tries == [True, False]
    assert [r.value for r in batch.records] == [Decimal(7)]  # 20 - 13: counted once
    pointers = {k: v for k, v in store.rows.items() if not k.startswith("rw/g/")}
    groups = {k for k in store.rows if k.startswith("rw/g/")}
    assert len(pointers) == 1
    assert len(groups) == 1
    assert {b"@" + k.removeprefix("rw/g/").encode() for k in groups} == set(pointers.values())


def test_new_series_fill_groups_of_at_most_the_group_size_and_hold_them() -> None:
    store, clock = DictState({}), FixedClock(NOW)
    totals, _ = _grouped(store, RecordingSink(Catalog()), clock)
    t = NOW - 1_000_000_000
    totals.commit(_totals_of(("a", "1", t), ("b", "1", t), ("c", "1", t)))
    rows = {k: decode_group(v) for k, v in store.rows.items() if k.startswith("rw/g/")}
    assert sorted(len(r) for r in rows.values()) == [1, 2]
    # a series held holds its whole group: another series of it waits, one of another does not
    pair, single = sorted(rows.values(), key=len, reverse=True)
    table = TotalGroups(store, "rw/", group_size=2, wait_s=0.05)
    first, second = sorted(pair)
    with table.hold([first]):
        with pytest.raises(StreamsBusy), table.hold([second]):
            pass
        with table.hold(list(single)):
            pass
