from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import pgdb
from tests.gatewayproc import GatewayProcess
from tests.helpers import next_id


@pytest.fixture(scope="session", autouse=True)
def _drop_test_databases() -> Iterator[None]:
    """PostgreSQL databases the tests created (METER_TEST_STORE=postgres) go at the end."""
    yield
    pgdb.drop_all()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A running gateway with the standard test catalog, shared by a test module."""
    gw = GatewayProcess(Path(tmp_path_factory.mktemp("gateway"))).start()
    yield gw
    gw.stop()


@pytest.fixture
def client(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with gateway.client() as c:
        yield c


@pytest.fixture
def customer(client: httpx.Client) -> str:
    """A fresh customer per test, so totals start at zero."""
    cid = f"cust-{next_id()}"
    r = client.post(
        "/v1/customers",
        json={"id": cid, "name": cid, "offering": "pay-as-you-go", "aliases": [f"{cid}-alias"]},
    )
    assert r.status_code == 201, r.text
    return cid
