"""Which store the suite runs against, and throwaway PostgreSQL databases for it.

``METER_TEST_STORE=sqlite`` (the default) or ``postgres`` picks the store of every gateway and
store the tests open (CI runs the suite once per store). ``METER_TEST_PG_URL`` is a database
to connect to for creating others (default ``postgresql://postgres@127.0.0.1:5432/test``).
Each workdir gets its own database, named after the workdir, so a test that reopens a store or
restarts a gateway on the same directory finds its data; every database made here is dropped
when the test session ends (``drop_all``, called from conftest).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

ADMIN_URL = os.environ.get("METER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
PREFIX = "mgtest_"

_created: set[str] = set()


def store_kind() -> str:
    kind = os.environ.get("METER_TEST_STORE", "sqlite")
    if kind not in ("sqlite", "postgres"):
        raise ValueError(f"METER_TEST_STORE={kind!r}: expected sqlite or postgres")
    return kind


def url_for(name: str) -> str:
    """The URL of database ``name`` on the server of ``ADMIN_URL``."""
    return urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{name}"))


def create_database(name: str | None = None) -> str:
    """Create a fresh database (a random name unless given; an existing one is reused)."""
    name = name or f"{PREFIX}{uuid.uuid4().hex[:16]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    _created.add(name)
    return url_for(name)


def drop_database(url_or_name: str) -> None:
    name = urlsplit(url_or_name).path.lstrip("/") if "://" in url_or_name else url_or_name
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
    _created.discard(name)


def drop_all() -> None:
    for name in sorted(_created):
        drop_database(name)


def database_for(workdir: Path) -> str:
    """The database of a test directory (created on first use)."""
    digest = hashlib.blake2b(str(workdir.resolve()).encode(), digest_size=10).hexdigest()
    return create_database(f"{PREFIX}{digest}")


def store_url(workdir: Path, file: str = "gateway.db") -> str:
    """``store.url`` for a gateway or store working in ``workdir``, per ``METER_TEST_STORE``."""
    if store_kind() == "postgres":
        return database_for(workdir)
    return f"sqlite:///{workdir / file}"


def schema_at(url: str, version: int) -> None:
    """Bring a fresh database to ``version`` of the PostgreSQL store's migrations, as a
    gateway of that version left it (to test the migrations after it)."""
    from meter_gateway.store.postgres import MIGRATIONS

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE meter_gateway_schema "
            "(version int PRIMARY KEY, applied_ns bigint NOT NULL)"
        )
        for i, script in enumerate(MIGRATIONS[:version], start=1):
            conn.execute(script)
            conn.execute("INSERT INTO meter_gateway_schema VALUES (%s, 0)", (i,))
