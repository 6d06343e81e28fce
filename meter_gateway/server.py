"""Runs the gateway: the HTTP API under uvicorn, then a clean drain on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
from types import FrameType

import uvicorn

from meter_gateway.api.app import create_app
from meter_gateway.config import Config
from meter_gateway.service import Gateway

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn re-raises the signal after its graceful shutdown, which would skip our drain and
    exit with -15; here SIGTERM/SIGINT only mean "stop taking requests"."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


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
        server = _Server(uv)
        log.info("meter-gateway listening on http://%s:%d", host, port)
        server.run()  # returns once a signal asked it to stop and open requests finished
    finally:
        gw.close()
    return 0
