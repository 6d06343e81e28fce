"""The SQLite store's own rules: one process per file, and its URLs."""

from __future__ import annotations

from pathlib import Path

import pytest

from meter_gateway.store.sqlite import SQLiteStore, StoreLockedError, path_from_url
from tests.helpers import ts

NOW = ts("2026-05-02T00:00:00")


def open_store(tmp_path: Path) -> SQLiteStore:
    return SQLiteStore(str(tmp_path / "t.db"), 35 * 86400, NOW)


def test_a_second_process_cannot_open_the_same_file(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    with pytest.raises(StoreLockedError, match="in use"):
        open_store(tmp_path)
    s.close()
    open_store(tmp_path).close()


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///./x.db", "./x.db"),
        ("sqlite:////var/lib/x.db", "/var/lib/x.db"),
        ("sqlite:///x.db", "x.db"),
    ],
)
def test_sqlite_urls(url: str, path: str) -> None:
    assert path_from_url(url) == path
