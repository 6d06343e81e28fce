"""The serving process collects cycles rarely, never walks what start-up built, and hands the
GIL over sooner than Python's default."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator

import pytest

from meter_gateway import server


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds, switch = gc.get_threshold(), sys.getswitchinterval()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)
    sys.setswitchinterval(switch)


def test_tune_runtime_freezes_start_up_objects_and_raises_the_thresholds(
    restored_gc: None,
) -> None:
    built_at_start_up = [object() for _ in range(10)]  # noqa: F841 - alive while frozen
    server._tune_runtime()
    assert gc.get_threshold() == server.GC_THRESHOLDS
    assert sys.getswitchinterval() == pytest.approx(server.SWITCH_INTERVAL_S)
    assert gc.get_freeze_count() > 0
    # cycles made while serving are still collected
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1
