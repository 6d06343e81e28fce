"""The store interface: one atomic commit for a group of batches, and the reads aggregation needs.

Implementations: ``sqlite.SQLiteStore`` (embedded default) and, later, PostgreSQL. Whatever the
implementation, ``commit`` is all-or-nothing: records, their dedup keys, rollups and rejected
records land in one transaction, and dedup keys are marked only if that transaction commits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from meter_gateway.model import Batch, CommitResult


@dataclass(frozen=True, slots=True)
class RollupRow:
    """Partial aggregates of one (customer, dimension, UTC hour) bucket.

    ``wsum`` is Σ value × (bucket_end − timestamp) in value·nanoseconds: with it a window's
    time-weighted level integral follows from rollups alone (see aggregation.engine).
    """

    bucket_ns: int
    count: int
    sum: Decimal
    min: Decimal
    max: Decimal
    last_ts: int
    last_seq: int
    last_value: Decimal
    wsum: Decimal


@dataclass(frozen=True, slots=True)
class RawPoint:
    ts: int
    seq: int
    value: Decimal
    unique: str | None


@dataclass(frozen=True, slots=True)
class StoredRecord:
    seq: int
    timestamp_ns: int
    customer_id: str
    dimension_id: str
    value: Decimal
    record_id: str | None
    metadata: dict[str, Any] | None
    source: str
    received_ns: int


@dataclass(frozen=True, slots=True)
class RejectedRow:
    seq: int
    received_ns: int
    source: str
    reason: str
    field: str | None
    error: str
    raw: str | None


class Store(Protocol):
    """Where usage lives. One writer calls ``commit``; any thread may read."""

    def commit(self, batches: Sequence[Batch], now_ns: int) -> list[CommitResult]:
        """Dedup, write records, update rollups and store rejected records in one transaction."""
        ...

    def state_get(self, keys: Sequence[str]) -> dict[str, bytes]:
        """Committed receiver state for these keys (absent keys are left out)."""
        ...

    def state_scan(self, prefix: str) -> dict[str, bytes]:
        """Committed receiver state whose keys start with ``prefix``."""
        ...

    # --- scheduled work: one replica at a time
    def lease(self, name: str, holder: str, ttl_ns: int, now_ns: int) -> bool:
        """Take or renew the named lease for ``holder`` until ``now_ns + ttl_ns``; False when
        another holder's lease has not expired. Jobs run only while their lease is held."""
        ...

    def release(self, name: str, holder: str) -> None:
        """Give the lease up (if ``holder`` holds it) so another replica takes over at once."""
        ...

    # --- catalog (dimensions, offerings, customers, meters) as JSON documents
    def catalog_load(self) -> dict[str, dict[str, dict[str, Any]]]: ...

    def catalog_put(self, kind: str, id: str, body: Mapping[str, Any]) -> None: ...

    def catalog_delete(self, kind: str, id: str) -> bool: ...

    # --- reads for aggregation
    def rollups(
        self, customer: str, dimension: str, from_bucket: int, to_bucket: int
    ) -> list[RollupRow]:
        """Rollup rows with ``from_bucket <= bucket < to_bucket``, in bucket order."""
        ...

    def raw(
        self, customer: str, dimension: str, from_ns: int, to_ns: int, unique_key: str | None = None
    ) -> list[RawPoint]:
        """Records with ``from_ns <= ts < to_ns`` ordered by (ts, seq); with ``unique_key``,
        each point's ``unique`` is its metadata value under that key."""
        ...

    def distinct(
        self, customer: str, dimension: str, from_bucket: int, to_bucket: int
    ) -> list[tuple[int, str]]:
        """(bucket, unique value) pairs of the distinct-value rollup."""
        ...

    def last_before(self, customer: str, dimension: str, ts_ns: int) -> RawPoint | None:
        """The latest record (by ts, then seq) strictly before ``ts_ns``."""
        ...

    def pairs(
        self, customer: str | None, dimension: str | None, before_ns: int
    ) -> list[tuple[str, str]]:
        """(customer, dimension) pairs that have usage before ``before_ns``."""
        ...

    # --- raw listing and rejected records
    def records(
        self,
        customer: str | None,
        dimension: str | None,
        from_ns: int,
        to_ns: int,
        after: tuple[int, int] | None,
        limit: int,
    ) -> list[StoredRecord]: ...

    def rejected(
        self, after_seq: int | None, limit: int, reason: str | None
    ) -> list[RejectedRow]: ...

    def close(self) -> None: ...
