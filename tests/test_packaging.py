"""The wheel carries every module of the three import packages, and the console script."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_wheel_contains_every_module(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("meter_gateway-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        str(p.relative_to(ROOT))
        for pkg in ("meter_gateway", "receivers", "exporters")
        for p in (ROOT / pkg).rglob("*.py")
    }
    assert expected, "no modules found"
    missing = expected - names
    assert not missing, f"missing from the wheel: {sorted(missing)}"
    for marker in ("meter_gateway/py.typed", "receivers/py.typed", "exporters/py.typed"):
        assert marker in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert (
        "meter-gateway = meter_gateway.cli:main"
        in zipfile.ZipFile(wheel).read(entry_points).decode()
    )
