"""The catalog across replicas (SQLite or PostgreSQL, per METER_TEST_STORE): two catalog
services on one store stand for two replicas. A change made through one is seen by the other
once its version check is due (by the injected clock), at once by ``fresh()`` and so before usage
is turned away for an unknown customer, and before the other validates a change of its own; a
change validated against a catalog that moved before it was written is validated again, and
changes made through several replicas at once take turns (PostgreSQL) instead of starving."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meter_gateway.catalog import CatalogError, CatalogService
from meter_gateway.clock import FixedClock
from meter_gateway.config import Config, Customer, IngestConfig, Offering
from meter_gateway.model import Reason, Source
from meter_gateway.pipeline.mapping import Mapper
from meter_gateway.pipeline.validate import Validator
from meter_gateway.store import Store
from meter_gateway.store.postgres import PostgresStore
from tests import pgdb
from tests.helpers import open_store, ts

NOW = ts("2026-05-02T00:00:00")
CONFIG = Config.model_validate(
    {
        "dimensions": [{"id": "d1", "name": "D1", "unit": "gigabyte"}],
        "offerings": [
            {"id": "o1", "name": "O1", "charges": [{"dimension": "d1", "model": "per_unit"}]}
        ],
        "customers": [{"id": "c1", "name": "C1", "offering": "o1"}],
    }
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(tmp_path)
    yield s
    s.close()


def replicas(store: Store) -> tuple[FixedClock, CatalogService, CatalogService]:
    clock = FixedClock(NOW)
    return clock, CatalogService(store, CONFIG, clock), CatalogService(store, CONFIG, clock)


def test_another_replicas_change_is_seen_once_the_check_is_due(store: Store) -> None:
    clock, a, b = replicas(store)
    a.put("customers", Customer(id="c2", name="C2", offering="o1"), create_only=True)
    assert "c2" in a.current.customers  # the replica that made it serves it at once
    clock.advance(0.9)
    assert "c2" not in b.current.customers  # checked at most every second
    clock.advance(0.1)
    assert b.current.customers["c2"].name == "C2"
    a.delete("customers", "c2")
    clock.advance(1)
    assert "c2" not in b.current.customers


class CountingStore:
    """The store, counting the version checks made through it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.checks = 0

    def catalog_version(self) -> Any:
        self.checks += 1
        return self.store.catalog_version()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_an_unmoved_version_keeps_the_snapshot_and_its_caches_across_a_check(
    store: Store,
) -> None:
    clock = FixedClock(NOW)
    b = CatalogService(store, CONFIG, clock)  # first: starting up writes the config entries
    counting = CountingStore(store)
    a = CatalogService(counting, CONFIG, clock)  # type: ignore[arg-type]
    s = a.current
    checks = counting.checks
    clock.advance(1)
    assert a.current is s  # nothing changed: the same object, not a reload of equal content
    assert counting.checks == checks + 1  # ... though the version was checked
    b.put("customers", Customer(id="c2", name="C2"))
    clock.advance(1)
    moved = a.current
    assert moved is not s  # the version moved: a new snapshot
    assert "c2" in moved.customers
    clock.advance(1)
    assert a.current is moved


def test_fresh_checks_at_once(store: Store) -> None:
    _, a, b = replicas(store)
    stale = b.current
    a.put("customers", Customer(id="c2", name="C2", aliases=("c2-alias",)))
    assert b.current is stale
    assert b.fresh().customer_id("c2-alias") == "c2"


def test_changes_are_validated_against_the_catalog_as_stored(store: Store) -> None:
    _, a, b = replicas(store)
    b_stale = b.current
    a.put("offerings", Offering(id="o2", name="O2"), create_only=True)
    # b has not checked yet, but validates against what a stored: o2 exists
    b.put("customers", Customer(id="c2", name="C2", offering="o2"))
    # ... and c2 (b's) uses o2, so a may not delete it, though a has not seen c2 yet
    with pytest.raises(CatalogError, match="still in use") as exc:
        a.delete("offerings", "o2")
    assert exc.value.status == 409
    # creating what another replica created is a clash, deleting it works
    with pytest.raises(CatalogError, match="already exists"):
        a.put("customers", Customer(id="c2", name="again"), create_only=True)
    assert a.delete("customers", "c2")
    assert b_stale is not b.current


def test_a_change_racing_another_replicas_is_validated_again(store: Store) -> None:
    _, a, b = replicas(store)
    a.put("offerings", Offering(id="o2", name="O2"))
    b.fresh()

    class Racing:
        """The store, where o2 is deleted just before b's write lands, by a writer that does
        not take the catalog lock (as a replica starting up writes its config entries)."""

        def __init__(self, store: Store) -> None:
            self.store = store
            self.raced = 0

        def catalog_put(self, *args: Any) -> None:
            if not self.raced:
                self.raced += 1
                self.store.catalog_delete("offerings", "o2")
            self.store.catalog_put(*args)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.store, name)

    b._store = Racing(store)  # type: ignore[assignment]
    # validated while o2 existed, written after it was deleted: refused, validated again
    with pytest.raises(CatalogError, match="unknown offering 'o2'"):
        b.put("customers", Customer(id="c2", name="C2", offering="o2"))
    assert "c2" not in store.catalog_load()["customers"]
    b.put("offerings", Offering(id="o3", name="O3"))  # the next change goes through
    assert set(b.current.offerings) == {"o1", "o3"}


def test_replicas_changing_the_catalog_at_once_take_turns() -> None:
    """Always on PostgreSQL: three stores on one database, as three replicas."""
    url = pgdb.create_database()
    stores = [PostgresStore(url, 86400, NOW) for _ in range(3)]
    try:
        services = [CatalogService(s, CONFIG, FixedClock(NOW)) for s in stores]
        failures: list[Exception] = []

        def admin(k: int) -> None:
            try:
                for i in range(20):
                    services[k].put("customers", Customer(id=f"c-{k}-{i}", name="C", offering="o1"))
            except Exception as exc:  # reported below
                failures.append(exc)

        threads = [threading.Thread(target=admin, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []  # none starved: the catalog lock queues them
        for s in services:
            assert len(s.fresh().customers) == 1 + 3 * 20
    finally:
        for st in stores:
            st.close()
        pgdb.drop_database(url)


def test_a_failed_version_check_keeps_the_snapshot(store: Store) -> None:
    class Down:
        """The store, unreachable for catalog version checks."""

        def __init__(self, store: Store) -> None:
            self.store = store
            self.down = False

        def catalog_version(self) -> int:
            if self.down:
                raise OSError("connection refused")
            return self.store.catalog_version()

        def __getattr__(self, name: str) -> Any:
            return getattr(self.store, name)

    down = Down(store)
    clock = FixedClock(NOW)
    a = CatalogService(store, CONFIG, clock)
    b = CatalogService(down, CONFIG, clock)  # type: ignore[arg-type]
    before = b.current
    a.put("customers", Customer(id="c2", name="C2"))
    down.down = True
    clock.advance(1)
    assert b.current is before
    assert b.fresh() is before
    down.down = False
    assert b.current is before  # a failed check counts as one: the next is due in a second
    clock.advance(1)
    assert "c2" in b.current.customers


def test_usage_for_a_customer_another_replica_just_created_is_accepted(store: Store) -> None:
    clock, a, b = replicas(store)
    limits = IngestConfig()
    with_refresh = Validator(lambda: b.current, clock, limits, Mapper(()), b.fresh)
    without = Validator(lambda: b.current, clock, limits, Mapper(()))
    a.put("customers", Customer(id="c2", name="C2"))
    usage = {"dimensionId": "d1", "recordValue": 1, "timestamp": "2026-05-02T00:00:00Z"}
    items: list[Any] = [{"customerId": "c2", **usage}, {"customerId": "nobody", **usage}]
    stale = without.batch(items, Source.REST)
    assert [e.reason for e in stale.errors] == [Reason.UNKNOWN_CUSTOMER] * 2
    batch = with_refresh.batch(items, Source.REST)
    assert [r.customer_id for r in batch.records] == ["c2"]
    assert [(e.index, e.reason) for e in batch.errors] == [(1, Reason.UNKNOWN_CUSTOMER)]
