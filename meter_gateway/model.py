"""The records that flow through the pipeline: observations in, usage records out.

Receivers produce ``Observation``s (a metric point with attributes) or, for REST, usage records
directly; the pipeline turns both into ``UsageRecord``s, and a ``Batch`` carries the valid records
of one request together with the rejected ones and why.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any


class Source(StrEnum):
    """Which receiver produced a record; doubles as a metric label value."""

    REST = "rest"
    VECTOR = "vector"
    OTLP = "otlp"
    REMOTE_WRITE = "remote_write"
    PROMETHEUS = "prometheus"
    DATASTORE = "datastore"


class Reason(StrEnum):
    """Why a record was rejected; the values double as metric label values."""

    MALFORMED = "malformed"
    MISSING_FIELD = "missing_field"
    INVALID_VALUE = "invalid_value"
    INVALID_TIMESTAMP = "invalid_timestamp"
    TOO_LATE = "too_late"
    IN_FUTURE = "in_future"
    UNKNOWN_CUSTOMER = "unknown_customer"
    UNKNOWN_DIMENSION = "unknown_dimension"
    NEGATIVE_VALUE = "negative_value"
    UNMAPPED = "unmapped"
    TOO_LARGE = "too_large"
    UNSTORABLE = "unstorable"  # valid, but the store cannot keep it as given (store.base)


class ObservationKind(StrEnum):
    AMOUNT = "amount"  # a delta: add it up
    CUMULATIVE = "cumulative"  # a monotonic counter's running total
    LEVEL = "level"  # a gauge sample


@dataclass(slots=True)
class Observation:
    """A metric point before mapping rules decide which customer and dimension it bills.

    Never changed once made; not ``frozen`` because receivers build one per point and a frozen
    dataclass is built about four times slower (it holds dicts, so it was never hashable)."""

    source: Source
    name: str
    attributes: dict[str, str]
    value: Decimal
    kind: ObservationKind
    timestamp_ns: int
    natural_key: str | None = None
    resource_attributes: dict[str, str] = field(default_factory=dict)


class SeriesMetadata(dict[str, Any]):
    """Metadata every record of one series shares (metric name and attributes of OTLP,
    Vector or Prometheus points): a store may keep it once and refer to it from each record."""

    __slots__ = ()


@dataclass(slots=True)
class UsageRecord:
    """One validated usage record, ready to commit."""

    timestamp_ns: int
    customer_id: str
    dimension_id: str
    value: Decimal
    record_id: str | None = None
    metadata: dict[str, Any] | None = None
    source: Source = Source.REST
    # 16-byte digest of the dedup identity (record id or natural key); None: never deduplicated.
    dedup_key: bytes | None = None
    # metadata[unique_key] for unique_count dimensions, kept in the distinct-value rollup.
    unique_value: str | None = None


@dataclass(frozen=True, slots=True)
class RecordError:
    """Why one record of a request was rejected."""

    index: int
    field: str | None
    error: str
    reason: Reason
    raw: str | None = None  # the record as received (truncated), for the rejected store

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "field": self.field,
            "error": self.error,
            "reason": self.reason.value,
        }


@dataclass(slots=True)
class Batch:
    """What one request or export carries into the commit: valid records and rejected ones."""

    source: Source
    records: list[UsageRecord] = field(default_factory=list)
    errors: list[RecordError] = field(default_factory=list)
    # Receiver state that must move with these records (cumulative-stream baselines, query
    # watermarks): key → new value, None deletes. Written in the same transaction.
    state: dict[str, bytes | None] = field(default_factory=dict)
    # What ``state`` expects each key to hold now (None: absent), compare-and-set: if another
    # replica moved one of them first, the store commits nothing of this batch and answers
    # ``CommitResult.conflict``, so the receiver reloads the state and converts again.
    state_expect: dict[str, bytes | None] = field(default_factory=dict)
    # Running totals still to be turned into amounts against their series' committed state
    # (request index, observation); ``pipeline.cumulative.Totals`` does it before the commit.
    cumulative: list[tuple[int, Observation]] = field(default_factory=list)
    # All or nothing (REST ``?atomic=true``): a record the store cannot keep stores none of it.
    atomic: bool = False


@dataclass(frozen=True, slots=True)
class CommitResult:
    accepted: int
    duplicates: int
    rejected: int
    # The batch's ``state_expect`` did not hold: nothing of it was written.
    conflict: bool = False


def dedup_key(namespace: str, identity: str) -> bytes:
    """The 128-bit dedup digest of an identity within a namespace ("id", "otlp", ...): BLAKE2b
    over the namespace, a NUL and the identity (UTF-8, lone surrogates passed through), hashed
    on from a copy of the namespace's state (a third cheaper than hashing it again)."""
    h = dedup_prefix(namespace).copy()
    h.update(identity.encode("utf-8", "surrogatepass"))
    return h.digest()


def dedup_prefix(namespace: str) -> hashlib.blake2b:
    """The state of ``dedup_key`` after the namespace and its NUL, shared (copy it before
    ``update``): hot paths hash their identities on from it without a call a point."""
    prefix = _NAMESPACES.get(namespace)
    if prefix is None:
        prefix = hashlib.blake2b(
            f"{namespace}\x00".encode("utf-8", "surrogatepass"), digest_size=16
        )
        _NAMESPACES[namespace] = prefix  # a handful: "id" and the receivers' sources
    return prefix


_NAMESPACES: dict[str, hashlib.blake2b] = {}
