"""Runs the gateway: the HTTP API under uvicorn, then a clean drain on SIGTERM/SIGINT."""

from __future__ import annotations

import logging

import uvicorn

from meter_gateway.api.app import create_app
from meter_gateway.config import Config
from meter_gateway.service import Gateway

log = logging.getLogger(__name__)


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT; drain and commit what is in flight; return the exit code."""
    gw = Gateway(config)
    try:
        host, port = split_listen(config.server.http.listen)
        uv = uvicorn.Config(
            create_app(gw),
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_keep_alive=75,
            timeout_graceful_shutdown=30,
            server_header=False,
        )
        server = uvicorn.Server(uv)
        log.info("meter-gateway listening on http://%s:%d", host, port)
        server.run()  # returns once a signal asked it to stop and open requests finished
    finally:
        gw.close()
    return 0
