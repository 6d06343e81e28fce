"""Fixtures of the fuzz and fault suite: one gateway per module with the fuzz catalog, and the
tally of fuzz answers by receiver and status, printed at the end of the run (and written as JSON
to ``METER_FUZZ_REPORT`` if set)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.gatewayproc import GatewayProcess
from tests.reliability.fuzzing import PROFILE, Tally, fuzz_config

_TALLY = pytest.StashKey[Tally]()


def _tally_of(config: pytest.Config) -> Tally:
    if _TALLY not in config.stash:
        config.stash[_TALLY] = Tally()
    return config.stash[_TALLY]


@pytest.fixture(scope="session")
def tally(request: pytest.FixtureRequest) -> Tally:
    return _tally_of(request.config)


@pytest.fixture(scope="module")
def fuzz_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(Path(tmp_path_factory.mktemp("fuzz")), fuzz_config()).start()
    yield gw
    code = gw.stop()
    assert code == 0, f"gateway exited {code}:\n{gw.log()[-5000:]}"


@pytest.fixture(scope="module")
def admin(fuzz_gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with fuzz_gateway.client() as c:
        yield c


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    config = terminalreporter.config
    if _TALLY not in config.stash or not config.stash[_TALLY].counts:
        return
    t = config.stash[_TALLY]
    store = os.environ.get("METER_TEST_STORE", "sqlite")
    terminalreporter.section(f"fuzz answers by receiver and status ({store}, profile {PROFILE})")
    for line in t.lines():
        terminalreporter.write_line(line)
    report = os.environ.get("METER_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps({"store": store, "profile": PROFILE, **t.as_json()}))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # the long profile runs for hours: lift pytest-timeout's per-test limit for this directory
    if PROFILE == "long":
        here = Path(__file__).parent
        for item in items:
            if here in Path(item.path).parents:
                item.add_marker(pytest.mark.timeout(0))


def pytest_configure(config: pytest.Config) -> None:
    # hypothesis's report of a failing example touches mypy_extensions.TypedDict, deprecated;
    # under filterwarnings=error that would hide the falsifying example behind INTERNALERROR
    config.addinivalue_line(
        "filterwarnings", "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
    )
