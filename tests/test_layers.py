"""The import rules of ``.importlinter`` hold: layers run one way (a module imports only from
floors below its own), the store backends stand alone, billing persistence names no driver,
receivers and sinks do not import each other. An import back up the layers fails here."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def lint_imports(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which(
        "lint-imports"
    )
    if exe is None:
        pytest.fail("lint-imports is missing: pip install -e '.[dev]' (import-linter)")
    return subprocess.run(
        [exe, "--no-cache", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_import_contract_is_kept() -> None:
    done = lint_imports()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_the_contracts_cover_every_floor_of_the_package() -> None:
    """A new top-level module must be placed on a floor, or the layers say nothing about it."""
    config = (ROOT / ".importlinter").read_text()
    floors = config.split("layers =", 1)[1].split("\n\n", 1)[0]
    placed = {name.strip() for line in floors.splitlines() for name in line.split(":")}
    placed = {n.strip() for p in placed for n in p.split("|")}
    modules = {
        f"meter_gateway.{p.stem}"
        for p in (ROOT / "meter_gateway").iterdir()
        if (p.suffix == ".py" and p.stem != "__init__")
        or (p.is_dir() and (p / "__init__.py").exists())
    }
    assert modules - placed == set()
