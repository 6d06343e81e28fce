"""Faults on the store the suite runs against (METER_TEST_STORE): kill -9 mid-stream with every
batch resent after the restart, and a full disk.

tests/test_durability.py covers one SIGKILL right after a 2xx and a SIGTERM drain;
tests/test_replicas.py a SIGKILLed replica on PostgreSQL. Here: SIGKILL while batches are in
flight on either store, then the sender's retry of everything (answered or not) — 0 lost, 0
doubled; and a disk that fills up under the store (a small tmpfs; on PostgreSQL, a tablespace
on it) — 503 not 500, not ready while commits fail, and everything resent after space returns
counts exactly once.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from tests import pgdb
from tests.gatewayproc import INGEST_KEY, GatewayProcess
from tests.helpers import eventually
from tests.reliability.fuzzing import PROFILE, fuzz_config, raw_records, to_iso, window_total
from tests.reliability.oracle import NS

KILLS = 1 if PROFILE == "ci" else 5


def _batches(
    customer: str, n_batches: int, per_batch: int, pad: int = 0
) -> list[list[dict[str, Any]]]:
    stamp = to_iso(time.time_ns() - 120 * NS)
    run = uuid.uuid4().hex[:8]
    return [
        [
            {
                "id": f"{run}-{b}-{i}",
                "timestamp": stamp,
                "customerId": customer,
                "dimensionId": "data-processed",
                "recordValue": f"{(b * per_batch + i) % 97}.{i % 1000:03d}",
                **({"metadata": {"pad": "x" * pad}} if pad else {}),
            }
            for i in range(per_batch)
        ]
        for b in range(n_batches)
    ]


def _exact_total(batches: list[list[dict[str, Any]]]) -> Decimal:
    return sum((Decimal(r["recordValue"]) for b in batches for r in b), Decimal(0))


def _post(url: str, body: list[dict[str, Any]]) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/usage", json=body, headers={"Authorization": f"Bearer {INGEST_KEY}"}, timeout=60
    )


def _assert_exactly_once(
    client: httpx.Client, customer: str, ids: set[str]
) -> list[dict[str, Any]]:
    rows = raw_records(client, customer)
    seen = [r["id"] for r in rows]
    doubled = {i for i in seen if seen.count(i) > 1} if len(seen) != len(set(seen)) else set()
    assert not doubled, f"{len(doubled)} ids stored twice, e.g. {sorted(doubled)[:5]}"
    lost = ids - set(seen)
    assert not lost, f"{len(lost)} acknowledged ids lost, e.g. {sorted(lost)[:5]}"
    return rows


def _sender(
    url: str,
    batches: list[list[dict[str, Any]]],
    todo: queue.Queue[int],
    acked: set[int],
    enough: threading.Event,
) -> None:
    """Post batches until none is left or the gateway dies; note the acknowledged ones."""
    while True:
        try:
            b = todo.get_nowait()
        except queue.Empty:
            return
        try:
            r = _post(url, batches[b])
        except httpx.TransportError:
            return  # the gateway died under this request
        assert r.status_code in (200, 429, 503), r.text[:300]
        if r.status_code == 200:
            acked.add(b)  # set.add is atomic under the GIL
            if len(acked) >= 5:
                enough.set()


def test_kill_9_mid_stream_then_resend_everything_loses_and_doubles_nothing(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path, fuzz_config()).start()
    customer = "acme"
    batches = _batches(customer, n_batches=30, per_batch=200)
    acked: set[int] = set()
    try:
        for _ in range(KILLS):
            todo: queue.Queue[int] = queue.Queue()
            for b in range(len(batches)):
                todo.put(b)
            enough = threading.Event()
            threads = [
                threading.Thread(target=_sender, args=(gw.url, batches, todo, acked, enough))
                for _ in range(3)
            ]
            for t in threads:
                t.start()
            assert enough.wait(120), "no batch was acknowledged"
            gw.kill()  # SIGKILL with batches in flight: no drain, no clean close
            for t in threads:
                t.join(120)
            gw.start()
            with gw.client() as c:
                _assert_exactly_once(
                    c, customer, {r["id"] for b in sorted(acked) for r in batches[b]}
                )
        # the sender retries everything, answered or not: dedup makes that exact
        for batch in batches:
            r = _post(gw.url, batch)
            assert r.status_code == 200, r.text[:300]
        all_ids = {r["id"] for b in batches for r in b}
        with gw.client() as c:
            rows = _assert_exactly_once(c, customer, all_ids)
            assert len(rows) == len(all_ids)
            assert sum(Decimal(r["recordValue"]) for r in rows) == _exact_total(batches)
            assert window_total(c, customer, "data-processed") == _exact_total(batches)
    finally:
        gw.stop()


# --- full disk ------------------------------------------------------------------------------


def _mount_tmpfs(where: Path, size_mb: int) -> None:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0777", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:  # CI runs as root; a missing fault injector is a failure
        pytest.fail(f"cannot mount a tmpfs to fill (needs root): {done.stderr.strip()}")


def _fill(where: Path) -> Path:
    """Write a ballast file until the filesystem is full."""
    ballast = where / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return ballast


@pytest.fixture
def small_disk() -> Iterator[tuple[Path, dict[str, Any]]]:
    """A 48 MiB filesystem the store lives on, and the store config for it (mounted outside
    pytest's private temporary tree, which the postgres user cannot enter)."""
    disk = Path(tempfile.gettempdir()) / f"mg-disk-{uuid.uuid4().hex[:8]}"
    _mount_tmpfs(disk, 48)
    cleanup = []
    try:
        if pgdb.store_kind() == "postgres":
            pg_dir = disk / "pg"
            pg_dir.mkdir()
            shutil.chown(pg_dir, "postgres", "postgres")
            name = f"mgtest_disk_{uuid.uuid4().hex[:8]}"
            ts = f"{name}_ts"
            with psycopg.connect(pgdb.ADMIN_URL, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("CREATE TABLESPACE {} LOCATION {}").format(
                        sql.Identifier(ts), sql.Literal(str(pg_dir))
                    )
                )
                conn.execute(
                    sql.SQL("CREATE DATABASE {} TABLESPACE {}").format(
                        sql.Identifier(name), sql.Identifier(ts)
                    )
                )

            def drop() -> None:
                pgdb.drop_database(name)
                with psycopg.connect(pgdb.ADMIN_URL, autocommit=True) as conn:
                    conn.execute(sql.SQL("DROP TABLESPACE IF EXISTS {}").format(sql.Identifier(ts)))

            cleanup.append(drop)
            store = {"url": pgdb.url_for(name)}
        else:
            store = {"url": f"sqlite:///{disk / 'gateway.db'}"}
        yield disk, store
    finally:
        for f in cleanup:
            f()
        subprocess.run(["umount", "-l", str(disk)], check=False)
        disk.rmdir()


def test_a_full_disk_answers_503_is_not_ready_and_recovers_exactly(
    tmp_path: Path, small_disk: tuple[Path, dict[str, Any]]
) -> None:
    disk, store = small_disk
    config = {**fuzz_config(), "store": store}
    work = tmp_path / "gw"
    work.mkdir()
    gw = GatewayProcess(work, config).start()
    customer = "acme"
    batches = _batches(customer, n_batches=200, per_batch=200, pad=200)
    acked: list[int] = []
    refused: list[int] = []
    try:
        r0 = _post(gw.url, batches[0])
        assert r0.status_code == 200, r0.text[:300]
        acked.append(0)
        ballast = _fill(disk)
        for b in range(1, len(batches)):
            r = _post(gw.url, batches[b])
            assert r.status_code in (200, 503, 507), f"full disk: {r.status_code} {r.text[:300]}"
            if r.status_code == 200:
                acked.append(b)
                continue
            refused.append(b)
            ready = httpx.get(f"{gw.url}/readyz", timeout=10)
            assert ready.status_code != 200, f"ready while commits fail: {ready.text}"
            if len(refused) >= 3:
                break
        assert refused, "the disk never filled: the test did not test a full disk"
        # still refused cleanly while full: a valid request is 503, not 500, and no crash
        r = _post(gw.url, batches[refused[0]])
        assert r.status_code in (503, 507), r.text[:300]
        assert gw.proc is not None
        assert gw.proc.poll() is None, gw.log()[-3000:]

        os.remove(ballast)

        def taken_again() -> bool:  # the sender retries until the gateway takes it again
            r = _post(gw.url, batches[refused[0]])
            assert r.status_code in (200, 503, 507), r.text[:300]
            return r.status_code == 200

        eventually(taken_again, "the refused batch to be taken after space returned", 60)
        assert httpx.get(f"{gw.url}/readyz", timeout=10).status_code == 200
        sent = [0, *acked, *refused]
        for b in sent:
            assert _post(gw.url, batches[b]).status_code == 200
        ids = {r["id"] for b in set(sent) for r in batches[b]}
        with gw.client() as c:
            rows = _assert_exactly_once(c, customer, ids)
            assert len(rows) == len(ids)
            exact = _exact_total([batches[b] for b in set(sent)])
            assert window_total(c, customer, "data-processed") == exact
    finally:
        gw.stop()
