"""Stores: where committed usage, dedup keys, rollups, the catalog and rejected records live."""

from __future__ import annotations

from meter_gateway.store.base import RawPoint, RejectedRow, RollupRow, Store, StoredRecord

__all__ = ["RawPoint", "RejectedRow", "RollupRow", "Store", "StoredRecord", "open_store"]


def open_store(url: str, dedup_window_s: int, now_ns: int, pool_size: int = 8) -> Store:
    """Open the store a ``store.url`` names: ``sqlite:///path`` or ``postgresql://...``.

    ``pool_size`` is the most connections a PostgreSQL store opens (SQLite ignores it).
    """
    if url.startswith("sqlite://"):
        from meter_gateway.store.sqlite import SQLiteStore, path_from_url

        return SQLiteStore(path_from_url(url), dedup_window_s, now_ns)
    if url.startswith(("postgresql://", "postgres://")):
        from meter_gateway.store.postgres import PostgresStore

        return PostgresStore(url, dedup_window_s, now_ns, pool_max=pool_size)
    raise ValueError(f"unsupported store URL {url!r}: expected sqlite:///path or postgresql://...")
