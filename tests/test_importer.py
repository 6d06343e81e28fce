"""``meter-gateway import``: history from CSV and NDJSON(.gz) files through a running gateway,
exact totals, a rejected summary beside the file, and resume after a SIGKILL without doubling.
"""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from meter_gateway import importer
from meter_gateway.importer import Checkpoint, Importer, Line
from tests.gatewayproc import BASE_CONFIG, INGEST_KEY, GatewayProcess
from tests.helpers import next_id

ROOT = Path(__file__).resolve().parents[1]
# History older than the default 35 days: the gateway must be told to take it.
BACKFILL_INGEST = {"late_arrival_limit": "400d", "dedup_window": "400d"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    config = {**BASE_CONFIG, "ingest": BACKFILL_INGEST}
    gw = GatewayProcess(Path(tmp_path_factory.mktemp("import-gw")), config).start()
    yield gw
    gw.stop()


@pytest.fixture
def customer(gateway: GatewayProcess) -> str:
    cid = f"hist-{next_id()}-{time.time_ns()}"
    with gateway.client() as c:
        r = c.post("/v1/customers", json={"id": cid, "name": cid, "offering": "pay-as-you-go"})
    assert r.status_code == 201, r.text
    return cid


DAY = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=60)


def at(seconds: int) -> str:
    return (DAY + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def day_total(gw: GatewayProcess, customer: str) -> Decimal:
    with gw.client() as c:
        r = c.get(
            "/v1/usage",
            params={
                "customerId": customer,
                "dimensionId": "data-processed",
                "window": "day",
                "from": DAY.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "to": (DAY + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
        )
    assert r.status_code == 200, r.text
    (row,) = r.json()["data"]
    return Decimal(row["value"] or 0)


def run_import(gw: GatewayProcess, path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meter_gateway", "import", str(path), "--url", gw.url, *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "METER_GATEWAY_API_KEY": INGEST_KEY}


def rejected_summary(path: Path) -> list[dict[str, Any]]:
    rejected = path.with_name(path.name + importer.REJECTED_SUFFIX)
    return [orjson.loads(line) for line in rejected.read_bytes().splitlines()]


def test_csv_history_is_imported_exactly_and_bad_lines_are_listed(
    gateway: GatewayProcess, customer: str, tmp_path: Path
) -> None:
    rows = ["id,customerId,dimensionId,recordValue,timestamp,metadata.region"]
    good = Decimal(0)
    for i in range(1, 101):  # data lines 2..101
        value = Decimal(i) / 1000
        rid = f"own-{customer}-{i}" if i % 2 else ""  # every other record has its own id
        rows.append(f"{rid},{customer},data-processed,{value},{at(i)},eu")
        good += value
    rows.append(f",nobody-{customer},data-processed,5,{at(200)},eu")  # line 102: unknown
    rows.append(f",{customer},data-processed,lots,{at(201)},eu")  # line 103: bad value
    rows.append(f",{customer},data-processed,7")  # line 104: short row
    old = (datetime.now(UTC) - timedelta(days=500)).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows.append(f",{customer},data-processed,9,{old},eu")  # line 105: past the limit
    rows.append("")  # a blank line is skipped, not rejected
    rows.append(f",{customer},data-processed,0.5,{at(300)},eu")  # line 107: good
    good += Decimal("0.5")
    path = tmp_path / "history.csv"
    path.write_text("\n".join(rows) + "\n")

    done = run_import(gateway, path, "--batch", "7")
    assert done.returncode == 0, done.stderr
    assert "accepted 101, duplicates 0, rejected 4" in done.stdout
    assert "records/s" in done.stdout
    assert day_total(gateway, customer) == good
    summary = rejected_summary(path)
    assert [(r["line"], r["reason"]) for r in summary] == [
        (102, "unknown_customer"),
        (103, "invalid_value"),
        (104, "malformed"),
        (105, "too_late"),
    ]
    assert summary[1]["field"] == "recordValue"
    assert summary[1]["record"]["recordValue"] == "lots"
    assert summary[2]["record"] == f",{customer},data-processed,7"

    again = run_import(gateway, path)
    assert again.returncode == 0
    assert "already imported" in again.stdout
    # Sending the whole file again (--restart) counts nothing twice: own and derived ids.
    restarted = run_import(gateway, path, "--restart", "--batch", "50")
    assert restarted.returncode == 0, restarted.stderr
    assert "accepted 0, duplicates 101, rejected 4" in restarted.stdout
    assert day_total(gateway, customer) == good
    assert len(rejected_summary(path)) == 4


def _ndjson_gz(path: Path, customer: str, n: int, bad_every: int) -> tuple[Decimal, list[int]]:
    """n lines without ids; every ``bad_every``-th line is bad, alternating unknown customer
    and broken JSON. Returns the good total and the bad line numbers."""
    lines, total, bad = [], Decimal(0), []
    for i in range(1, n + 1):
        if i % bad_every == 0:
            bad.append(i)
            if (i // bad_every) % 2:
                lines.append(b'{"customerId": "' + customer.encode() + b'", "recordValue": ')
            else:
                rec = {"customerId": f"nobody-{customer}", "dimensionId": "data-processed"}
                lines.append(orjson.dumps({**rec, "recordValue": "1", "timestamp": at(i)}))
            continue
        value = Decimal(i % 997) / 100
        total += value
        lines.append(
            orjson.dumps(
                {
                    "customerId": customer,
                    "dimensionId": "data-processed",
                    "recordValue": str(value),
                    "timestamp": at(i),
                }
            )
        )
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    return total, bad


def test_ndjson_gz_import_killed_midway_resumes_without_doubling(
    gateway: GatewayProcess, customer: str, tmp_path: Path
) -> None:
    n = 40_000
    path = tmp_path / "history.ndjson.gz"
    total, bad = _ndjson_gz(path, customer, n, bad_every=997)
    checkpoint = path.with_name(path.name + importer.CHECKPOINT_SUFFIX)

    command = [sys.executable, "-m", "meter_gateway", "import", str(path), "--url", gateway.url]
    proc = subprocess.Popen(
        [*command, "--batch", "100"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            cp = Checkpoint.load(checkpoint)
            if cp is not None and cp.line >= 5_000:
                break
            assert proc.poll() is None, "the import ended before it could be interrupted"
            time.sleep(0.01)  # polling the checkpoint file, not waiting for an outcome
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped = Checkpoint.load(checkpoint)
    assert stopped is not None
    assert not stopped.complete
    assert 5_000 <= stopped.line < n

    resumed = run_import(gateway, path, "--batch", "500")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed after line {stopped.line}" in resumed.stdout
    assert day_total(gateway, customer) == total
    final = Checkpoint.load(checkpoint)
    assert final is not None
    assert final.complete
    assert final.records == n
    # A batch committed but not yet checkpointed when the import died comes back duplicate.
    assert final.accepted + final.duplicates == n - len(bad)
    assert final.duplicates <= 100
    assert final.rejected == len(bad)
    summary = rejected_summary(path)
    assert [r["line"] for r in summary] == bad  # each bad line once, in order
    reasons = {r["reason"] for r in summary}
    assert reasons == {"unknown_customer", "malformed"}


# --- in-process: retries, formats, ids ----------------------------------------------------------


def test_429_and_503_are_retried_after_the_time_the_gateway_asks(tmp_path: Path) -> None:
    path = tmp_path / "few.ndjson"
    path.write_text('{"customerId":"acme","dimensionId":"d","recordValue":"1","id":"a"}\n')
    answers = [
        httpx.Response(429, headers={"Retry-After": "3"}),
        httpx.Response(503, headers={"Retry-After": "2"}),
        httpx.Response(503),
        httpx.Response(200, json={"accepted": 1, "duplicates": 0, "rejected": 0, "errors": []}),
    ]
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(gzip.decompress(request.content))
        return answers.pop(0)

    slept: list[float] = []
    client = httpx.Client(base_url="http://gw", transport=httpx.MockTransport(handler))
    summary = Importer(path, client, progress=False, sleep=slept.append).run()
    assert slept == [3.0, 2.0, 2.0]  # the last without Retry-After: its own backoff
    assert len(set(bodies)) == 1  # the same batch each time
    assert (summary.accepted, summary.records) == (1, 1)


def test_a_refused_batch_stops_the_import_at_the_last_acknowledged_line(tmp_path: Path) -> None:
    path = tmp_path / "two.ndjson"
    line = '{"customerId":"acme","dimensionId":"d","recordValue":"1"}\n'
    path.write_text(line * 4)
    answers = [
        httpx.Response(200, json={"accepted": 2, "duplicates": 0, "rejected": 0, "errors": []}),
        httpx.Response(401, json={"error": "bad key"}),
    ]
    client = httpx.Client(
        base_url="http://gw", transport=httpx.MockTransport(lambda r: answers.pop(0))
    )
    imp = Importer(path, client, batch_size=2, progress=False)
    with pytest.raises(importer.ImportFailed, match="HTTP 401"):
        imp.run()
    cp = Checkpoint.load(imp.checkpoint_path)
    assert cp is not None
    assert (cp.line, cp.accepted, cp.complete) == (2, 2, False)


def test_gzip_is_recognised_by_its_magic_and_the_format_by_content(tmp_path: Path) -> None:
    odd = tmp_path / "export.dat"
    odd.write_bytes(gzip.compress(b'{"customerId":"a"}\n'))
    assert importer.is_gzip(odd)
    assert importer.file_format(odd) == "ndjson"
    plain = tmp_path / "export.txt"
    plain.write_text("customerId,recordValue\na,1\n")
    assert importer.file_format(plain) == "csv"
    assert [ln.record for ln in importer.read_lines(plain)] == [
        {"customerId": "a", "recordValue": "1"}
    ]


def test_csv_rows_spanning_lines_keep_their_first_line_number(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text('customerId,metadata.note,metadata\na,"two\nlines",{"k": 1}\nb,,\n')
    lines = list(importer.read_lines(path))
    assert [ln.number for ln in lines] == [2, 4]
    assert lines[0].record == {"customerId": "a", "metadata": {"note": "two\nlines", "k": 1}}
    assert lines[1].record == {"customerId": "b"}


def test_derived_ids_are_stable_and_own_ids_win() -> None:
    a = Line(7, '{"x":1}', {"customerId": "c"})
    assert importer.with_id(a, "f.ndjson")["id"] == importer.with_id(a, "f.ndjson")["id"]
    assert importer.with_id(a, "f.ndjson")["id"] != importer.with_id(a, "g.ndjson")["id"]
    moved = Line(8, a.text, a.record)
    assert importer.with_id(a, "f.ndjson")["id"] != importer.with_id(moved, "f.ndjson")["id"]
    own = Line(7, "", {"customerId": "c", "id": "mine"})
    assert importer.with_id(own, "f.ndjson")["id"] == "mine"
