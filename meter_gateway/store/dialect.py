"""What differs between the SQL backends, and nothing else: the small layer ``store.billing``
writes its SQL over, once for SQLite and PostgreSQL.

SQL is written with ``?`` placeholders and standard upserts (``ON CONFLICT .. DO UPDATE`` /
``DO NOTHING``, which SQLite has since 3.24); a dialect supplies connections and transactions,
its placeholder, row locks (PostgreSQL ``FOR UPDATE``/``FOR SHARE``; SQLite has one writer, so
none), savepoints, named locks, how decimals and text are bound, which error is a unique
violation, and whether one process owns the database (SQLite's lock file: every lease is held).
The implementations live beside their stores (``sqlite.SqliteDialect``,
``postgres.PostgresDialect``), so this module imports no driver.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from decimal import Decimal
from functools import lru_cache
from typing import Any, Protocol

Row = tuple[Any, ...]


class Tx(Protocol):
    """One connection, inside a transaction (``Dialect.writing``) or not (``reading``). SQL
    uses ``?`` placeholders; the implementation rewrites them for its driver."""

    def one(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        """The first row of a query, or None."""
        ...

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        """Every row of a query."""
        ...

    def run(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run a statement; how many rows it changed."""
        ...

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run a statement once per row of arguments (nothing when there are none)."""
        ...

    def savepoint(self) -> AbstractContextManager[None]:
        """A nested transaction: an error inside rolls back to here and propagates, leaving
        the outer transaction usable."""
        ...


class Dialect(Protocol):
    """A backend's connections and the few SQL spellings that differ."""

    #: One process owns the database (SQLite's lock file): every lease is this process's, so
    #: leases are granted at once and fences always hold.
    single_owner: bool
    #: Row-lock clauses appended to a SELECT inside a write transaction ("" where the
    #: database has one writer, which already serializes the transaction).
    for_update: str
    for_share: str
    #: The condition on ``records`` selecting the rows of one record id: ``?`` placeholders,
    #: each bound to the id (SQLite finds ids through ``record_ids`` plus the records not
    #: indexed there yet; PostgreSQL through an index on ``records``).
    record_id_match: str
    #: The condition on ``records`` selecting one (customer, dimension)'s rows: two ``?``
    #: placeholders, bound to the customer and the dimension (SQLite numbers the pairs in
    #: ``series`` and indexes records by that number; PostgreSQL indexes the pair).
    series_match: str

    def reading(self) -> AbstractContextManager[Tx]:
        """A connection for reads; each statement sees committed data."""
        ...

    def writing(self) -> AbstractContextManager[Tx]:
        """One write transaction: committed when the block ends, rolled back on an error."""
        ...

    def exclusive(self, key: int) -> AbstractContextManager[None]:
        """A named lock (``key``) held across transactions and replicas for the block."""
        ...

    def decimal(self, value: Decimal) -> Any:
        """A decimal as bound to a parameter (exact text or a ``numeric``)."""
        ...

    def text(self, value: str) -> str:
        """Free text as the database can keep it (PostgreSQL text holds no NUL)."""
        ...

    def is_unique_violation(self, exc: BaseException) -> bool:
        """Whether ``exc`` is a unique or primary-key violation (and not another constraint)."""
        ...


@lru_cache(maxsize=512)
def positional(sql: str) -> str:
    """``?`` placeholders as ``%s`` (DB-API ``format`` style; a literal ``%`` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")
