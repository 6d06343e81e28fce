"""Decoded JSON items → validated usage records, or per-record errors that say what to fix.

Accepts Paigo's record shape (``customerId``, ``dimensionId``, ``recordValue``, ``timestamp``,
optional ``id`` and ``metadata``), Logstash's ``@timestamp`` in place of ``timestamp``, ignores
envelope fields (``host``, ``message``, ``@version``...), and turns Vector metric events into
observations for the mapping rules.

Limits are checked here so the store never sees what it cannot write or read back: values by
``decimals.parse_value`` (observations after scaling too), timestamps by RFC 3339 and the
late/future window, ids without control characters (``MAX_ID_LENGTH``), metadata at most
``MAX_METADATA_DEPTH`` levels deep and ``metadata_max_bytes`` long, without NUL, and no text
that is not Unicode (a lone surrogate escape such as ``\\ud800``) anywhere that is stored.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

import orjson

from meter_gateway.catalog import Catalog
from meter_gateway.clock import Clock
from meter_gateway.config import IngestConfig, format_duration
from meter_gateway.decimals import DecimalError, check_value, fmt, parse_value
from meter_gateway.model import (
    Batch,
    Observation,
    ObservationKind,
    Reason,
    RecordError,
    SeriesMetadata,
    Source,
    UsageRecord,
    dedup_key,
)
from meter_gateway.pipeline.decode import Item, ItemError, clip_json
from meter_gateway.pipeline.mapping import Mapped, Mapper
from meter_gateway.pipeline.timestamps import format_timestamp, parse_timestamp

_METRIC_VALUES = (
    "counter",
    "gauge",
    "set",
    "distribution",
    "aggregated_histogram",
    "aggregated_summary",
    "sketch",
)
MAX_ID_LENGTH = 512
# Levels of objects and arrays in a record's metadata, the metadata object itself being the
# first. JSON encoders stop at about 254 (orjson) and a store must read back what it wrote.
MAX_METADATA_DEPTH = 32
NS = 1_000_000_000
# A nanosecond timestamp is stored as a signed 64-bit integer (1677-09-21 .. 2262-04-11).
MIN_NS, MAX_NS = -(2**63), 2**63 - 1
# C0 control characters and DEL: SQLite cuts text at NUL, PostgreSQL cannot store it, and the
# others have no place in an identifier.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UNKNOWN = (Reason.UNKNOWN_CUSTOMER, Reason.UNKNOWN_DIMENSION)


class _Reject(Exception):
    def __init__(self, reason: Reason, field: str | None, error: str) -> None:
        self.reason, self.field, self.error = reason, field, error


class Validator:
    """``catalog`` gives the current snapshot; ``refresh``, if given, a snapshot checked against
    the store right now (``CatalogService.fresh``): a batch that names an unknown customer or
    dimension is validated again against it when it is newer (another replica added them)."""

    def __init__(
        self,
        catalog: Callable[[], Catalog],
        clock: Clock,
        limits: IngestConfig,
        mapper: Mapper,
        refresh: Callable[[], Catalog] | None = None,
    ) -> None:
        self._catalog = catalog
        self._refresh = refresh
        self._clock = clock
        self._limits = limits
        self._mapper = mapper
        self._late_ns = int(limits.late_arrival_limit.total_seconds()) * NS
        self._future_ns = int(limits.future_tolerance.total_seconds()) * NS

    def batch(self, items: list[Item], source: Source) -> Batch:
        catalog = self._catalog()
        batch = self._batch(items, source, catalog)
        fresh = self._fresher(batch, catalog)
        return batch if fresh is None else self._batch(items, source, fresh)

    def _fresher(self, batch: Batch, catalog: Catalog) -> Catalog | None:
        """A newer snapshot to validate the batch against again, if it turned something away
        as unknown and the catalog moved since ``catalog``."""
        if self._refresh is None or not any(e.reason in _UNKNOWN for e in batch.errors):
            return None
        fresh = self._refresh()
        return None if fresh is catalog else fresh

    def _batch(self, items: list[Item], source: Source, catalog: Catalog) -> Batch:
        batch = Batch(source)
        now = self._clock.now_ns()
        lo, hi = now - self._late_ns, now + self._future_ns
        records, errors = batch.records, batch.errors
        for index, item in enumerate(items):
            if isinstance(item, ItemError):
                errors.append(RecordError(index, None, item.error, Reason.MALFORMED, item.raw))
                continue
            try:
                if "recordValue" not in item and _is_vector_metric(item):
                    obs = vector_observation(item, now)
                    if obs.kind is ObservationKind.CUMULATIVE:
                        batch.cumulative.append((index, obs))  # see pipeline.cumulative.Totals
                    else:
                        records.append(self._observation(obs, catalog, lo, hi))
                else:
                    records.append(self._record(item, catalog, lo, hi, source))
            except _Reject as r:
                errors.append(RecordError(index, r.field, r.error, r.reason, _clip(item)))
        return batch

    def _record(
        self, item: dict[str, Any], catalog: Catalog, lo: int, hi: int, source: Source
    ) -> UsageRecord:
        customer = item.get("customerId")
        if customer is None:
            raise _Reject(Reason.MISSING_FIELD, "customerId", "customerId is required")
        dimension = item.get("dimensionId")
        if dimension is None:
            raise _Reject(Reason.MISSING_FIELD, "dimensionId", "dimensionId is required")
        if "recordValue" not in item:
            raise _Reject(
                Reason.MISSING_FIELD,
                "recordValue",
                "recordValue is required (a decimal number or string)",
            )
        if "timestamp" in item:
            raw_ts, ts_field = item["timestamp"], "timestamp"
        else:
            raw_ts, ts_field = item.get("@timestamp"), "@timestamp"
        if raw_ts is None:
            raise _Reject(
                Reason.MISSING_FIELD,
                "timestamp",
                "timestamp is required (RFC 3339, e.g. 2026-05-01T12:00:00Z)",
            )
        ts = _timestamp(raw_ts, ts_field)
        try:
            value = parse_value(item["recordValue"])
        except DecimalError as exc:
            raise _Reject(Reason.INVALID_VALUE, "recordValue", f"recordValue {exc}") from None
        rid = item.get("id")
        if rid is not None:
            if isinstance(rid, int) and not isinstance(rid, bool):
                rid = str(rid)
            if type(rid) is not str or not rid or len(rid) > MAX_ID_LENGTH:
                raise _Reject(
                    Reason.INVALID_VALUE,
                    "id",
                    f"id must be a non-empty string of at most {MAX_ID_LENGTH} "
                    f"characters, got {_short(rid)}",
                )
            if not (rid.isascii() and rid.isprintable()):
                _check_id_text(rid, "id")
        metadata = item.get("metadata")
        if metadata is not None:
            if not isinstance(metadata, dict):
                raise _Reject(
                    Reason.INVALID_VALUE,
                    "metadata",
                    f"metadata must be a JSON object, got {_short(metadata)}",
                )
            metadata, size = _storable(metadata)
            if size > self._limits.metadata_max_bytes:
                raise _Reject(
                    Reason.TOO_LARGE,
                    "metadata",
                    f"metadata is {size} bytes as JSON: expected at most "
                    f"{self._limits.metadata_max_bytes}",
                )
        return self._finish(
            catalog,
            customer,
            dimension,
            value,
            ts,
            lo,
            hi,
            rid,
            metadata or None,
            source,
            dedup_key("id", rid) if rid is not None else None,
        )

    def _finish(
        self,
        catalog: Catalog,
        customer: Any,
        dimension: Any,
        value: Decimal,
        ts: int,
        lo: int,
        hi: int,
        rid: str | None,
        metadata: dict[str, Any] | None,
        source: Source,
        key: bytes | None,
    ) -> UsageRecord:
        if not isinstance(customer, str) or (cid := catalog.customer_id(customer)) is None:
            if isinstance(customer, str):
                _check_id_text(customer, "customerId")
            raise _Reject(
                Reason.UNKNOWN_CUSTOMER,
                "customerId",
                f"unknown customer {_short(customer)} (not a customer id or alias)",
            )
        dim = catalog.dimensions.get(dimension) if isinstance(dimension, str) else None
        if dim is None:
            if isinstance(dimension, str):
                _check_id_text(dimension, "dimensionId")
            raise _Reject(
                Reason.UNKNOWN_DIMENSION, "dimensionId", f"unknown dimension {_short(dimension)}"
            )
        if value < 0 and dim.aggregation != "weighted_sum":
            raise _Reject(
                Reason.NEGATIVE_VALUE,
                "recordValue",
                f"{value} is negative; only weighted_sum dimensions take negative "
                f"values, {dim.id!r} aggregates by {dim.aggregation}",
            )
        self._check_time(ts, lo, hi)
        unique = None
        if dim.unique_key is not None:
            raw_u = (metadata or {}).get(dim.unique_key)
            if raw_u is None:
                raise _Reject(
                    Reason.MISSING_FIELD,
                    f"metadata.{dim.unique_key}",
                    f"dimension {dim.id!r} counts distinct metadata.{dim.unique_key}; "
                    "the record has none",
                )
            unique = raw_u if isinstance(raw_u, str) else orjson.dumps(raw_u, default=str).decode()
        return UsageRecord(ts, cid, dim.id, value, rid, metadata, source, key, unique)

    def _check_time(self, ts: int, lo: int, hi: int) -> None:
        why = time_window_error(ts, lo, hi, self._limits)
        if why is not None:
            raise _Reject(why[0], "timestamp", why[1])

    def observations(self, observations: Sequence[Observation], source: Source) -> Batch:
        """Map and validate observations (amounts or levels) into a batch.

        Cumulative observations must already be converted to amounts by the receiver; the
        index of an error is the observation's position in ``observations``.
        """
        catalog = self._catalog()
        batch = self._observations(observations, source, catalog)
        fresh = self._fresher(batch, catalog)
        return batch if fresh is None else self._observations(observations, source, fresh)

    def _observations(
        self, observations: Sequence[Observation], source: Source, catalog: Catalog
    ) -> Batch:
        batch = Batch(source)
        now = self._clock.now_ns()
        lo, hi = now - self._late_ns, now + self._future_ns
        for index, obs in enumerate(observations):
            try:
                if obs.kind is ObservationKind.CUMULATIVE:
                    raise _Reject(
                        Reason.INVALID_VALUE,
                        "kind",
                        "cumulative values must be converted to deltas first",
                    )
                batch.records.append(self._observation(obs, catalog, lo, hi))
            except _Reject as r:
                raw = clip_json(
                    {
                        "source": obs.source.value,
                        "name": obs.name,
                        "attributes": obs.attributes,
                        "value": str(obs.value),
                        "kind": obs.kind.value,
                        # a time past 64 bits (a remote-write sample at 2^63 ms) stays exact
                        "timeUnixNano": obs.timestamp_ns
                        if MIN_NS <= obs.timestamp_ns <= MAX_NS
                        else str(obs.timestamp_ns),
                    },
                    8192,
                )
                batch.errors.append(RecordError(index, r.field, r.error, r.reason, raw))
        return batch

    def _observation(self, obs: Observation, catalog: Catalog, lo: int, hi: int) -> UsageRecord:
        self._check_time(obs.timestamp_ns, lo, hi)  # before anything computes with it
        mapped = self._mapper.map(obs)
        if not isinstance(mapped, Mapped):
            raise _Reject(mapped.reason, mapped.field, mapped.error)
        _check_attributes(obs.name, obs.attributes)
        try:
            value = check_value(self._mapper.scale(mapped, obs))
        except DecimalError as exc:
            scale = self._mapper.rules[mapped.rule_index].scale
            scaled = "" if scale == 1 else f" × scale {fmt(scale)} of rule {mapped.rule_index}"
            raise _Reject(
                Reason.INVALID_VALUE,
                "value",
                f"value {_short(obs.value)} of metric {_short(obs.name)}{scaled}: {exc}",
            ) from None
        key = None if obs.natural_key is None else dedup_key(obs.source.value, obs.natural_key)
        meta = SeriesMetadata(metric=obs.name, attributes=obs.attributes)
        return self._finish(
            catalog,
            mapped.customer_name,
            mapped.dimension_id,
            value,
            obs.timestamp_ns,
            lo,
            hi,
            None,
            meta,
            obs.source,
            key,
        )


def time_window_error(ts: int, lo: int, hi: int, limits: IngestConfig) -> tuple[Reason, str] | None:
    """Why a time outside [lo, hi] (now − late-arrival limit, now + future tolerance) is
    refused, or None: one wording for every receiver (golden files in tests/testdata/otlp hold
    it)."""
    if ts < lo:
        return (
            Reason.TOO_LATE,
            f"timestamp {_when(ts)} is older than the late-arrival limit "
            f"({format_duration(limits.late_arrival_limit)}): expected {format_timestamp(lo)} "
            "or later (raise ingest.late_arrival_limit to backfill)",
        )
    if ts > hi:
        return (
            Reason.IN_FUTURE,
            f"timestamp {_when(ts)} is more than "
            f"{format_duration(limits.future_tolerance)} in the future: expected "
            f"{format_timestamp(hi)} or earlier",
        )
    return None


def _when(ts: int) -> str:
    try:
        return format_timestamp(ts)
    except (ValueError, OverflowError):  # past what a datetime holds
        return f"{ts} ns after 1970"


def _is_unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _check_id_text(text: str, field: str) -> None:
    """Reject an identifier holding a control character or a lone surrogate, saying which."""
    if (m := _CONTROL.search(text)) is not None:
        raise _Reject(
            Reason.INVALID_VALUE,
            field,
            f"{field} {_short(text)} contains the control character U+{ord(m.group()):04X}: "
            "expected printable text (control characters cannot be stored exactly)",
        )
    if not text.isascii() and not _is_unicode(text):
        raise _Reject(
            Reason.INVALID_VALUE,
            field,
            f"{field} {_short(text)} is not valid Unicode (a lone UTF-16 surrogate escape "
            "such as \\udc00): expected text",
        )


def _check_text(text: str, field: str) -> None:
    """Stored text (metadata, attributes, metric names) may hold anything but NUL and lone
    surrogates: tabs and newlines are fine."""
    if "\x00" in text:
        raise _Reject(
            Reason.INVALID_VALUE,
            field,
            f"{field} {_short(text)} contains U+0000 (NUL): expected text without NUL, "
            "which the stores cannot keep exactly",
        )
    if not text.isascii() and not _is_unicode(text):
        raise _Reject(
            Reason.MALFORMED,
            field,
            f"{field} {_short(text)} is not valid Unicode (a lone UTF-16 surrogate escape such "
            "as \\ud800): expected text",
        )


def _check_attributes(name: str, attributes: dict[str, str], field: str = "attributes") -> None:
    if "\x00" in name or not name.isascii():
        _check_text(name, "name")
    for k, v in attributes.items():
        if "\x00" in k or "\x00" in v or not (k.isascii() and v.isascii()):
            _check_text(k, f"{field} key")
            _check_text(v, f"{field}.{k}"[:200])


def _storable(metadata: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Metadata as it will be stored, and its size in bytes as JSON.

    Numbers beyond what JSON encoders carry (long decimals, integers past 64 bits) are kept
    exactly as strings; text that is not Unicode (a lone surrogate escape such as ``\\ud800``)
    or holds NUL, and nesting deeper than ``MAX_METADATA_DEPTH``, are refused.
    """
    try:
        text = orjson.dumps(metadata, default=str)
    except orjson.JSONEncodeError as exc:
        _refuse_surrogates(exc)
        _check_metadata(metadata)  # too deep for orjson, or a number it cannot write
        portable = _big_ints_as_text(metadata)
        try:
            # the first error may have hidden a lone surrogate further on
            return portable, len(orjson.dumps(portable, default=str))
        except orjson.JSONEncodeError as again:
            _refuse_surrogates(again)
            raise
    # Nesting needs as many brackets as levels (two bytes each, with their closers), and
    # orjson writes NUL as \u0000: most metadata is cleared by its length and one byte search.
    if (b"\\" in text and b"\\u0000" in text) or (
        len(text) > 2 * MAX_METADATA_DEPTH
        and text.count(b"{") + text.count(b"[") > MAX_METADATA_DEPTH
    ):
        _check_metadata(metadata)
    return metadata, len(text)


def _refuse_surrogates(exc: orjson.JSONEncodeError) -> None:
    """Reject the record if orjson refused its metadata for a lone surrogate."""
    if "surrogates" in str(exc):
        raise _Reject(
            Reason.MALFORMED,
            "metadata",
            "metadata holds text that is not valid Unicode (a lone UTF-16 surrogate "
            "escape such as \\ud800): expected text",
        ) from None


def _check_metadata(metadata: dict[str, Any]) -> None:
    """Reject metadata nested deeper than ``MAX_METADATA_DEPTH`` or holding NUL in a key or a
    string; iterative, so no depth of input can exhaust the stack."""
    stack: list[tuple[dict[str, Any] | list[Any], int, str]] = [(metadata, 1, "metadata")]
    while stack:
        node, depth, path = stack.pop()
        if depth > MAX_METADATA_DEPTH:
            raise _Reject(
                Reason.TOO_LARGE,
                "metadata",
                f"metadata nests more than {MAX_METADATA_DEPTH} levels of objects and arrays "
                f"(at {path[:120]}): expected at most {MAX_METADATA_DEPTH}",
            )
        pairs = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in pairs:
            if isinstance(k, str) and "\x00" in k:
                _check_text(k, f"{path} key")
            sub = f"{path}.{k}" if isinstance(k, str) else f"{path}[{k}]"
            if isinstance(v, str):
                if "\x00" in v:
                    _check_text(v, sub[:200])
            elif isinstance(v, dict | list):
                stack.append((v, depth + 1, sub))


def _big_ints_as_text(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _big_ints_as_text(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_big_ints_as_text(x) for x in v]
    if isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**64:
        return str(v)
    return v


def _is_vector_metric(item: dict[str, Any]) -> bool:
    return (
        isinstance(item.get("name"), str)
        and item.get("kind") in ("absolute", "incremental")
        and any(k in item for k in _METRIC_VALUES)
    )


def vector_observation(item: dict[str, Any], received_ns: int) -> Observation:
    """A Vector metric event (JSON codec) as an observation; raises _Reject if unusable."""
    name = item["name"]
    tags = item.get("tags") or {}
    if not isinstance(tags, dict):
        raise _Reject(Reason.MALFORMED, "tags", f"tags must be an object, got {_short(tags)}")
    attrs = {k: v if isinstance(v, str) else _tag_text(k, v) for k, v in tags.items()}
    _check_attributes(name, attrs, "tags")
    # StatsD and aggregated metrics often carry no timestamp: they count at receipt.
    ts = _timestamp(item["timestamp"], "timestamp") if "timestamp" in item else received_ns
    if not MIN_NS <= ts <= MAX_NS:  # before it is written into the dedup identity
        raise _Reject(
            Reason.INVALID_TIMESTAMP,
            "timestamp",
            f"timestamp {item['timestamp']!r} is outside 1677-09-21..2262-04-11: expected a "
            "time a 64-bit nanosecond clock holds",
        )
    incremental = item["kind"] == "incremental"
    if "counter" in item:
        raw, kind = (
            _value_of(item, "counter"),
            (ObservationKind.AMOUNT if incremental else ObservationKind.CUMULATIVE),
        )
    elif "gauge" in item:
        raw, kind = _value_of(item, "gauge"), ObservationKind.LEVEL
    else:
        present = next(k for k in _METRIC_VALUES if k in item)
        raise _Reject(
            Reason.INVALID_VALUE,
            present,
            f"{present} metrics carry no billable amount; send a counter or gauge",
        )
    try:
        value = parse_value(raw)
    except DecimalError as exc:
        field = "counter.value" if "counter" in item else "gauge.value"
        raise _Reject(Reason.INVALID_VALUE, field, f"{field} {exc}") from None
    if kind is ObservationKind.AMOUNT and value < 0:
        raise _Reject(Reason.NEGATIVE_VALUE, "counter.value", "incremental counter is negative")
    namespace = item.get("namespace")
    full = f"{namespace}.{name}" if isinstance(namespace, str) and namespace else name
    # A sample is identified by (series, time) — and, for increments, value — so a batch that
    # Vector resends after a timeout counts once. Vector emits one event per series per
    # timestamp (aggregate flushes, statsd receipt in ns), so distinct increments never share
    # all three. Events stamped at receipt (no timestamp) have no stable identity.
    identity = None
    if "timestamp" in item:
        parts: list[Any] = [full, sorted(attrs.items()), ts]
        if kind is ObservationKind.AMOUNT:
            parts.append(str(value))
        identity = orjson.dumps(parts).decode()

    return Observation(Source.VECTOR, name, attrs, value, kind, ts, identity)


def _tag_text(key: str, value: Any) -> str:
    """A tag that is not a string (Vector sends arrays for multi-value tags) as JSON text."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        raise _Reject(
            Reason.MALFORMED,
            f"tags.{key}"[:200],
            f"tags.{key} is {_short(value)}: expected a string or a short array of strings",
        ) from None


def _value_of(item: dict[str, Any], key: str) -> Any:
    obj = item[key]
    if not isinstance(obj, dict) or "value" not in obj:
        raise _Reject(Reason.MALFORMED, key, f"{key} must be an object with a value")
    return obj["value"]


def _timestamp(raw: Any, field: str) -> int:
    if not isinstance(raw, str):
        raise _Reject(
            Reason.INVALID_TIMESTAMP,
            field,
            f"expected an RFC 3339 timestamp string, got {_short(raw)}",
        )
    try:
        return parse_timestamp(raw)
    except ValueError as exc:
        raise _Reject(Reason.INVALID_TIMESTAMP, field, str(exc)) from None


def _short(v: Any) -> str:
    if isinstance(v, str | int | float | Decimal | None):
        text = clip_json(v, 81) if isinstance(v, int) and v.bit_length() > 256 else repr(v)
    else:  # a repr of any depth or size could fail; this cannot
        text = clip_json(v, 81)
    return text if len(text) <= 80 else text[:77] + "..."


def _clip(item: dict[str, Any]) -> str:
    """The record as received, for the rejected store (escaped where orjson cannot write it)."""
    return clip_json(item, 8192)
