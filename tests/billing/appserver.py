"""An in-process gateway (injected clock, real store: SQLite or PostgreSQL per METER_TEST_STORE)
served over real HTTP by uvicorn on a free loopback port, for tests that need to move time
without a subprocess."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml

from meter_gateway.api.app import create_app
from meter_gateway.clock import FixedClock
from meter_gateway.config import parse_config
from meter_gateway.service import Gateway
from tests.gatewayproc import ADMIN_KEY, free_port
from tests.pgdb import store_url


@contextmanager
def serve(
    tmp_path: Path, config: dict[str, Any], clock: FixedClock
) -> Iterator[tuple[Gateway, httpx.Client]]:
    """The gateway and an admin client for it; the scheduler does not run by itself (tests call
    ``gw.scheduler.run_due()``)."""
    # SQLite or PostgreSQL per METER_TEST_STORE (tests/pgdb.py); one database per tmp_path
    cfg = {"store": {"url": store_url(tmp_path, "gw.db")}, **config}
    gw = Gateway(parse_config(yaml.safe_dump(cfg)), clock=clock)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(gw), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers) as client:
            yield gw, client
    finally:
        server.should_exit = True
        thread.join()
        gw.close()
