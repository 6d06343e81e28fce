"""Stores: where committed usage, dedup keys, rollups, the catalog and rejected records live."""

from __future__ import annotations

import sqlite3
from urllib.parse import urlsplit, urlunsplit

from meter_gateway.store.base import RawPoint, RejectedRow, RollupRow, Store, StoredRecord

__all__ = [
    "RawPoint",
    "RejectedRow",
    "RollupRow",
    "Store",
    "StoreUnavailableError",
    "StoredRecord",
    "open_store",
]

POSTGRES_EXTRA = "pip install 'meter-gateway[postgres]'"


class StoreUnavailableError(Exception):
    """The store ``store.url`` names cannot be opened: another gateway holds it, it is
    unreachable, or its driver is not installed. The message is one line, for a person."""


def open_store(url: str, dedup_window_s: int, now_ns: int, pool_size: int = 8) -> Store:
    """Open the store a ``store.url`` names: ``sqlite:///path`` or ``postgresql://...``.

    ``pool_size`` is the most connections a PostgreSQL store opens (SQLite ignores it).
    Raises ``StoreUnavailableError`` when it cannot be opened.
    """
    if url.startswith("sqlite://"):
        from meter_gateway.store.sqlite import SQLiteStore, StoreLockedError, path_from_url

        path = path_from_url(url)
        try:
            return SQLiteStore(path, dedup_window_s, now_ns)
        except StoreLockedError as exc:
            raise StoreUnavailableError(f"store {url}: {exc}") from None
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailableError(
                f"store {url}: cannot open {path}: {_one_line(exc)}"
            ) from None
    if url.startswith(("postgresql://", "postgres://")):
        try:
            import psycopg

            from meter_gateway.store.postgres import PostgresStore, SchemaTooNewError
        except ImportError as exc:
            if not (exc.name or "").startswith("psycopg"):
                raise
            raise StoreUnavailableError(
                f"store {redact(url)}: PostgreSQL support is not installed ({exc.name} is "
                f"missing); install it with: {POSTGRES_EXTRA}"
            ) from None
        try:
            return PostgresStore(url, dedup_window_s, now_ns, pool_max=pool_size)
        except (psycopg.Error, SchemaTooNewError) as exc:
            raise StoreUnavailableError(
                f"store {redact(url)}: cannot open PostgreSQL: {_one_line(exc)}"
            ) from None
    raise ValueError(f"unsupported store URL {url!r}: expected sqlite:///path or postgresql://...")


def redact(url: str) -> str:
    """The URL with its password replaced by ``***`` (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
