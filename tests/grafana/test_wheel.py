"""``dashboards push`` must work from an installed wheel, with no checkout beside it: the
dashboards are code in the wheel, and exporting them from the unpacked wheel gives exactly the
committed JSON."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.grafana.dashboard_queries import DASHBOARD_DIR, ROOT


def test_the_wheel_builds_the_committed_dashboards(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path),
         str(ROOT)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    [wheel] = tmp_path.glob("meter_gateway-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"  # not the repository: nothing to find there
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = [sys.executable, "-m", "meter_gateway"]
    where = subprocess.run(
        [sys.executable, "-c", "import meter_gateway.dashboards as d; print(d.__file__)"],
        env=env, cwd=elsewhere, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert where.stdout.startswith(str(site)), where.stdout
    out = tmp_path / "exported"
    r = subprocess.run(
        [*run, "dashboards", "export", "--out", str(out)],
        env=env, cwd=elsewhere, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    committed = sorted(DASHBOARD_DIR.glob("*.json"))
    assert [p.name for p in committed] == sorted(p.name for p in out.iterdir())
    for p in committed:
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name
