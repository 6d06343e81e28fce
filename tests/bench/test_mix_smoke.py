"""bench.mix at toy size against a real gateway: every value it compares comes out exact, and a
batch left out of its expectation is caught. Speed is never asserted here."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import mix, stages
from bench.ingest import run_load
from tests import pgdb
from tests.gatewayproc import GatewayProcess

CUSTOMERS = 20


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    gw, _ = mix.start(tmp_path, pgdb.store_url(tmp_path), CUSTOMERS)
    yield gw
    gw.stop()


def test_the_mix_adds_up_exactly(gateway: GatewayProcess) -> None:
    plan = mix.MixPlan.new(2_000, 250, CUSTOMERS, 50, in_order=False)
    results, _, _ = run_load(gateway, plan, procs=1, connections=4)
    ok_batches = sorted(b for r in results for b in r.ok_batches)
    assert [m for r in results for m in r.bad] == []
    assert ok_batches == list(range(8))
    assert sum(r.accepted for r in results) == 2_000

    verified = mix.verify(gateway, plan, ok_batches)
    assert verified.problems == []
    # every dimension of every customer, in hour windows and in its summary
    assert verified.checked >= 2 * len(mix.DIMENSIONS) * CUSTOMERS

    short = mix.verify(gateway, plan, ok_batches[1:])
    assert short.problems, "a missing batch must show as a mismatch"
    assert mix.duplicates_ok(gateway, plan.body(0), plan.batch)


def test_the_command_runs_and_verifies() -> None:
    args = ["--store", pgdb.store_kind(), "--order", "in", "--records", "2000"]
    args += ["--customers", str(CUSTOMERS), "--read-customers", "3"]
    assert mix.main(args) == 0


def test_the_stage_bench_stores_every_record(capsys: pytest.CaptureFixture[str]) -> None:
    assert stages.main(["--records", "2000", "--batch", "500", "--customers", "20"]) == 0
    out = capsys.readouterr().out
    assert "verify: 2,000 accepted, 2,000 stored: ok" in out
    for stage in ("decode+validate", "prepare", "apply"):
        assert f"  {stage} " in out
