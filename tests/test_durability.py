"""Accepted means durable: restarts, SIGTERM drains, SIGKILL right after a 2xx."""

from __future__ import annotations

import signal
import threading
from decimal import Decimal
from pathlib import Path

import httpx

from tests.gatewayproc import GatewayProcess
from tests.helpers import record, total


def test_data_and_dedup_survive_sigkill_after_2xx(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path).start()
    batch = [record("acme", "0.5") for _ in range(100)]
    with gw.client() as c:
        assert c.post("/v1/usage", json=batch).json()["accepted"] == 100
    gw.kill()  # no drain, no clean close: only what was committed survives
    gw.start()
    with gw.client() as c:
        assert total(c, "acme") == Decimal(50)
        assert c.post("/v1/usage", json=batch).json()["duplicates"] == 100
        assert total(c, "acme") == Decimal(50)
    assert gw.stop() == 0


def test_sigterm_drains_in_flight_batches_and_exits_zero(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path).start()
    results: list[httpx.Response] = []

    def post() -> None:
        with gw.client() as c:
            for _ in range(20):
                try:
                    results.append(
                        c.post("/v1/usage", json=[record("acme", "1") for _ in range(500)])
                    )
                except httpx.TransportError:
                    return

    threads = [threading.Thread(target=post) for _ in range(4)]
    for t in threads:
        t.start()
    while not results:
        threading.Event().wait(0.01)
    assert gw.stop(signal.SIGTERM) == 0
    for t in threads:
        t.join()
    accepted = sum(r.json()["accepted"] for r in results if r.status_code == 200)
    assert accepted > 0
    gw.start()
    with gw.client() as c:
        # every 2xx that reached a client is in the store, nothing more
        assert total(c, "acme") == Decimal(accepted)
    assert gw.stop() == 0


def test_catalog_created_through_the_api_persists(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path).start()
    with gw.client() as c:
        r = c.post(
            "/v1/dimensions",
            json={
                "id": "api-calls",
                "name": "API Calls",
                "unit": "request",
                "aggregation": "count",
            },
        )
        assert r.status_code == 201
    gw.stop()
    gw.start()
    with gw.client() as c:
        assert c.get("/v1/dimensions/api-calls").json()["aggregation"] == "count"
    gw.stop()
