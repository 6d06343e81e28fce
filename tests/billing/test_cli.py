"""``meter-gateway invoice ...`` against a real gateway process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson

from tests.gatewayproc import ADMIN_KEY, READ_KEY, GatewayProcess
from tests.helpers import record


def cli(gw: GatewayProcess, key: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "meter_gateway", "invoice", "--config", str(gw.config_path), *args],
        capture_output=True,
        env={**os.environ, "METER_GATEWAY_API_KEY": key},
        timeout=60,
        check=False,
    )


def test_create_finalize_show_and_list(gateway: GatewayProcess, tmp_path: Path) -> None:
    with gateway.client() as c:
        assert c.post("/v1/usage", json=record("acme", "12.5")).status_code == 200
    created = cli(gateway, ADMIN_KEY, "create", "acme")
    assert created.returncode == 0, created.stderr
    inv = orjson.loads(created.stdout)
    assert inv["status"] == "draft"
    denied = cli(gateway, READ_KEY, "finalize", inv["id"])
    assert denied.returncode == 1
    assert b"HTTP 403" in denied.stderr
    done = cli(gateway, ADMIN_KEY, "finalize", inv["id"])
    assert orjson.loads(done.stdout)["status"] == "finalized"
    out = tmp_path / "invoice.csv"
    shown = cli(gateway, READ_KEY, "show", inv["id"], "--format", "csv", "-o", str(out))
    assert shown.returncode == 0, shown.stderr
    with gateway.client(READ_KEY) as c:
        served = c.get(f"/v1/invoices/{inv['id']}", params={"format": "csv"}).content
    assert out.read_bytes() == served
    listed = orjson.loads(cli(gateway, READ_KEY, "list", "acme").stdout)["data"]
    assert inv["id"] in [i["id"] for i in listed]
    missing = cli(gateway, READ_KEY, "show", "inv_missing")
    assert (missing.returncode, b"404" in missing.stderr) == (1, True)
