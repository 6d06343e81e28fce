"""Datastore receiver: usage read from a customer's own PostgreSQL by a scheduled SQL query,
forward from a persisted watermark (``receivers.datastore[]``; Paigo's datastore-based method).

Each configured datastore is one scheduled job (one replica at a time, under a store lease).
A run wraps the configured query and reads the next page of rows past the watermark::

    SELECT * FROM (<query>) AS src
    WHERE (<watermark>, <id>) > (<last watermark>, <last id>) AND <watermark> <= <now - delay>
    ORDER BY <watermark>, <id> LIMIT <page_size>

maps each row to a usage record (customer, dimension, value, time columns) whose id is the
receiver name + the row's id, and commits the records together with the new watermark in one
transaction, compare-and-set on the watermark it read (``Batch.state_expect``). So a restart
neither skips nor repeats a page, a replica that lost its lease cannot move the watermark back,
and a row read twice anyway counts once (its id deduplicates).

Rows with equal watermark values across a page edge: the (watermark, id) pair orders them
totally, so the next page starts exactly after the last row read. Without an id column the
natural key is a digest of the row's content and the read is inclusive (``>=``): the watermark
keeps the keys of the rows already read at its value, the page is that much longer, and only
rows not among them are new, so a page all of one value still moves on and a row written
later at that same value is still read. Rows the gateway rejects (unknown customer, bad value)
are kept in the rejected store with their reason and the watermark moves past them.

Rows must reach the source in watermark order, or at least within ``delay``: a row committed
later with a watermark value already passed is not read (use a column the database sets on
insert, or give ``delay`` the longest transaction's duration).

``page_query``, ``to_records`` and ``advance`` are pure; ``PostgresSource`` is the I/O.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from meter_gateway.config import DatastoreReceiverConfig
from meter_gateway.model import Batch, Source
from meter_gateway.pipeline.cumulative import Committer, StateReader

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql

log = logging.getLogger(__name__)

NS = 1_000_000_000
STATE_PREFIX = "datastore/"
# Pages read in one run before the job yields (its lease is renewed between runs).
MAX_PAGES_PER_RUN = 20

Row = Mapping[str, Any]


class DatastoreFailed(Exception):
    """The source could not be read or the page not committed; the scheduler retries with
    backoff (``meter_gateway_job_errors_total{job="datastore:<name>"}``)."""


class RecordSink(Protocol):
    """Validates Paigo records into a batch (``pipeline.validate.Validator``)."""

    def batch(self, items: list[Any], source: Source) -> Batch: ...


# --- the watermark -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Watermark:
    """The last row read: its watermark value and its id; without an id column, the natural
    keys of every row read at that value (the next read takes ``>=`` and skips them)."""

    value: Any
    id: Any = None
    seen: tuple[str, ...] = ()

    def encode(self) -> bytes:
        return orjson.dumps(
            {"v": _tagged(self.value), "id": _tagged(self.id), "seen": list(self.seen)}
        )

    @staticmethod
    def decode(raw: bytes) -> Watermark:
        d = orjson.loads(raw)
        return Watermark(_untagged(d["v"]), _untagged(d["id"]), tuple(d["seen"]))


def _tagged(v: Any) -> list[Any] | None:
    """A watermark value as JSON with its type, so it goes back to SQL as the same type."""
    if v is None:
        return None
    if isinstance(v, datetime):
        return ["ts", (v if v.tzinfo else v.replace(tzinfo=UTC)).isoformat()]
    if isinstance(v, date):
        return ["date", v.isoformat()]
    if isinstance(v, bool):
        return ["bool", v]
    if isinstance(v, int):
        return ["int", str(v)]
    if isinstance(v, Decimal | float):
        return ["dec", str(v)]
    return ["str", str(v)]


def _untagged(t: list[Any] | None) -> Any:
    if t is None:
        return None
    kind, v = t
    if kind == "ts":
        return datetime.fromisoformat(v)
    if kind == "date":
        return date.fromisoformat(v)
    if kind == "int":
        return int(v)
    if kind == "dec":
        return Decimal(v)
    return v


# --- pure: the query, the records, the next watermark ------------------------------------------


def watermark_column(cfg: DatastoreReceiverConfig) -> str:
    return cfg.watermark_column or cfg.columns.time


def page_query(
    cfg: DatastoreReceiverConfig, after: Watermark | None, until: datetime | None
) -> sql.Composed:
    """The next page past ``after``. Values go in as literals, so the query is sent without
    parameters and a ``%`` in the configured query needs no escaping."""
    from psycopg import sql

    wm = sql.Identifier(watermark_column(cfg))
    rid = sql.Identifier(cfg.columns.id) if cfg.columns.id else None
    where: list[sql.Composable] = []
    if after is not None:
        if rid is not None:
            where.append(
                sql.SQL("({}, {}) > ({}, {})").format(
                    wm, rid, sql.Literal(after.value), sql.Literal(after.id)
                )
            )
        else:
            where.append(sql.SQL("{} >= {}").format(wm, sql.Literal(after.value)))
    if until is not None:
        where.append(sql.SQL("{} <= {}").format(wm, sql.Literal(until)))
    order: list[sql.Composable] = [wm] if rid is None else [wm, rid]
    query = sql.SQL("SELECT * FROM ({}) AS meter_gateway_src").format(
        sql.SQL(cfg.query.strip().rstrip(";"))  # the operator's SQL, as configured
    )
    if where:
        query = sql.SQL("{} WHERE {}").format(query, sql.SQL(" AND ").join(where))
    query = sql.SQL("{} ORDER BY {}").format(query, sql.SQL(", ").join(order))
    return sql.SQL("{} LIMIT {}").format(query, sql.Literal(page_limit(cfg, after)))


def page_limit(cfg: DatastoreReceiverConfig, after: Watermark | None) -> int:
    """Rows already read at the watermark's value come first again (``>=``): they do not
    count against the page."""
    return cfg.page_size + (0 if after is None else len(after.seen))


def row_key(cfg: DatastoreReceiverConfig, row: Row) -> str:
    """The row's natural key within its receiver: its id, or a digest of its content."""
    if cfg.columns.id is not None:
        return str(row[cfg.columns.id])
    content = orjson.dumps([[k, _text(v)] for k, v in row.items()])
    return "row-" + hashlib.blake2b(content, digest_size=16).hexdigest()


def _text(v: Any) -> Any:
    if isinstance(v, datetime):
        return _rfc3339(v)
    if v is None or isinstance(v, bool | int | str):
        return v
    return str(v)


def _rfc3339(t: datetime) -> str:
    t = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def to_records(cfg: DatastoreReceiverConfig, rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Rows → Paigo usage records; the validator says what is wrong with any of them."""
    c = cfg.columns
    out: list[dict[str, Any]] = []
    for row in rows:
        value = row.get(c.value)
        when = row.get(c.time)
        record: dict[str, Any] = {
            "id": f"datastore:{cfg.name}:{row_key(cfg, row)}",
            "customerId": _str_or_none(row.get(c.customer)),
            "dimensionId": cfg.dimension or _str_or_none(row.get(c.dimension or "")),
            "timestamp": _rfc3339(when) if isinstance(when, datetime) else _str_or_none(when),
        }
        if value is not None:
            # Text keeps numeric and integer columns exact; a float column's shortest repr.
            record["recordValue"] = value if isinstance(value, str) else str(value)
        out.append(record)
    return out


def _str_or_none(v: Any) -> str | None:
    return None if v is None else str(v)


def advance(
    cfg: DatastoreReceiverConfig, rows: Sequence[Row], after: Watermark | None
) -> tuple[list[Row], Watermark | None]:
    """The rows of a page not read before, and the watermark after it (``after`` itself when
    nothing is new)."""
    if cfg.columns.id is not None:
        if not rows:
            return [], after
        last = rows[-1]
        return list(rows), Watermark(last[watermark_column(cfg)], last[cfg.columns.id])
    wm = watermark_column(cfg)
    keys = [row_key(cfg, r) for r in rows]
    seen = set() if after is None else set(after.seen)
    fresh = [
        r
        for r, k in zip(rows, keys, strict=True)
        if after is None or r[wm] != after.value or k not in seen
    ]
    if not fresh:
        return [], after
    value = rows[-1][wm]
    at_value = {k for r, k in zip(rows, keys, strict=True) if r[wm] == value}
    if after is not None and value == after.value:
        at_value |= seen
    return fresh, Watermark(value, None, tuple(sorted(at_value)))


# --- I/O ---------------------------------------------------------------------------------------


class RowSource(Protocol):
    """Runs a page query against the customer's database (``PostgresSource`` below)."""

    def rows(self, query: sql.Composed) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


class PostgresSource:
    """One read-only connection, opened on first use and again after a failure. The session
    runs in UTC, so ``timestamp`` columns (without time zone) are read and compared as UTC."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self._url = url
        self._timeout_ms = int(timeout_s * 1000)
        self._conn: psycopg.Connection[dict[str, Any]] | None = None

    def rows(self, query: sql.Composed) -> list[dict[str, Any]]:
        import psycopg
        from psycopg.rows import dict_row

        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(
                    self._url,
                    autocommit=True,
                    row_factory=dict_row,
                    connect_timeout=max(1, self._timeout_ms // 1000),
                    options=f"-c statement_timeout={self._timeout_ms} -c TimeZone=UTC "
                    "-c default_transaction_read_only=on",
                )
            return self._conn.execute(query).fetchall()
        except psycopg.Error as exc:
            self.close()
            raise DatastoreFailed(f"query failed: {str(exc).strip()[:500]}") from exc

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


class DatastoreJob:
    """One configured datastore as a scheduled job (``scheduler.Job``)."""

    def __init__(
        self,
        cfg: DatastoreReceiverConfig,
        source: RowSource,
        state: StateReader,
        sink: RecordSink,
        committer: Committer,
        commit_timeout_s: float = 120.0,
    ) -> None:
        self.cfg = cfg
        self.name = f"datastore:{cfg.name}"
        self._source = source
        self._state = state
        self._sink = sink
        self._committer = committer
        self._commit_timeout = commit_timeout_s
        self._key = f"{STATE_PREFIX}{cfg.name}/wm"
        self._interval_s = cfg.interval.total_seconds()
        self._delay_ns = int(cfg.delay.total_seconds() * NS)
        # `now - delay` bounds the watermark only when it is a time (not a sequence).
        self._bounded = watermark_column(cfg) == cfg.columns.time

    def watermark(self) -> Watermark | None:
        raw = self._state.state_get([self._key]).get(self._key)
        return None if raw is None else Watermark.decode(raw)

    def run(self, now_ns: int) -> float:
        until = None
        if self._bounded:
            until = datetime.fromtimestamp((now_ns - self._delay_ns) / NS, UTC)
        for _ in range(MAX_PAGES_PER_RUN):
            if not self._page(until):
                return self._interval_s
        return 0.0  # more to read: run again at once (the lease is renewed in between)

    def _page(self, until: datetime | None) -> bool:
        """Read and commit one page; whether a next page may be waiting."""
        raw = self._state.state_get([self._key]).get(self._key)
        after = None if raw is None else Watermark.decode(raw)
        page = self._source.rows(page_query(self.cfg, after, until))
        full = len(page) >= page_limit(self.cfg, after)
        rows, new = advance(self.cfg, page, after)
        if not rows or new is None:
            return False
        batch = self._sink.batch(to_records(self.cfg, rows), Source.DATASTORE)
        batch.state[self._key] = new.encode()
        batch.state_expect[self._key] = raw
        try:
            result = self._committer.submit_sync(batch, self._commit_timeout)
        except Exception as exc:
            raise DatastoreFailed(f"commit failed: {exc or type(exc).__name__}") from exc
        if result.conflict:
            # Another replica moved the watermark first (its lease outlived ours): read on
            # from where it got to.
            log.info("%s: the watermark moved under this run; reading on from it", self.name)
            return True
        if batch.errors:
            log.warning(
                "%s: %d of %d rows rejected (see /v1/rejected), e.g. %s",
                self.name,
                len(batch.errors),
                len(rows),
                batch.errors[0].error,
            )
        return full

    def close(self) -> None:
        self._source.close()


def build_jobs(
    configs: Sequence[DatastoreReceiverConfig],
    sink: RecordSink,
    state: StateReader,
    committer: Committer,
    source_for: Callable[[DatastoreReceiverConfig], RowSource] | None = None,
) -> list[DatastoreJob]:
    """One job per configured datastore."""

    def default_source(cfg: DatastoreReceiverConfig) -> RowSource:
        return PostgresSource(cfg.url, cfg.timeout.total_seconds())

    make = source_for or default_source
    return [DatastoreJob(cfg, make(cfg), state, sink, committer) for cfg in configs]
