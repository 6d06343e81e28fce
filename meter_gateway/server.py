"""Runs the gateway: the HTTP API and OTLP/HTTP under uvicorn in one event loop, OTLP/gRPC on
its own threads, then a clean drain on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import uvicorn
from starlette.types import ASGIApp

from meter_gateway.api.app import create_app
from meter_gateway.config import Config
from meter_gateway.service import Gateway
from receivers.otlp_grpc import GrpcSettings, OtlpGrpcServer
from receivers.otlp_http import HttpSettings
from receivers.otlp_http import create_app as create_otlp_app

GRACE_S = 30.0

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn re-raises the signal after its graceful shutdown, which would skip our drain and
    exit with -15; here SIGTERM/SIGINT only mean "stop taking requests"."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        # serve() installs one handler for every server of the process.
        yield


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _uvicorn(app: ASGIApp, listen: str, cert: str | None = None, key: str | None = None) -> _Server:
    host, port = split_listen(listen)
    return _Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_keep_alive=75,
            timeout_graceful_shutdown=int(GRACE_S),
            server_header=False,
            ssl_certfile=cert,
            ssl_keyfile=key,
        )
    )


async def _run(servers: list[_Server], grpc_server: OtlpGrpcServer | None) -> None:
    """Serve until a signal; then every server stops taking requests and finishes its own."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(sig: int, frame: FrameType | None) -> None:
        for server in servers:
            server.handle_exit(sig, frame)
        loop.call_soon_threadsafe(stop.set)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        tasks = [asyncio.create_task(server.serve()) for server in servers]
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([*tasks, stopping], return_when=asyncio.FIRST_COMPLETED)
        for server in servers:
            server.should_exit = True
        stopped = grpc_server.stop(GRACE_S) if grpc_server is not None else None
        await asyncio.gather(*tasks)
        stopping.cancel()
        if stopped is not None:
            await loop.run_in_executor(None, stopped.wait, GRACE_S + 5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT; drain and commit what is in flight; return the exit code."""
    gw = Gateway(config)
    grpc_server: OtlpGrpcServer | None = None
    try:
        limits, server_cfg = config.ingest, config.server
        servers = [_uvicorn(create_app(gw), server_cfg.http.listen)]
        log.info("meter-gateway listening on http://%s", server_cfg.http.listen)
        otlp_http = server_cfg.otlp_http
        if otlp_http.enabled:
            settings = HttpSettings(
                limits.max_body_bytes,
                limits.max_decompressed_bytes,
                limits.retry_after.total_seconds(),
            )
            app = create_otlp_app(gw.otlp, gw.keys, gw.telemetry, settings)
            servers.append(_uvicorn(app, otlp_http.listen, otlp_http.cert_file, otlp_http.key_file))
            log.info("OTLP/HTTP listening on %s", otlp_http.listen)
        otlp_grpc = server_cfg.otlp_grpc
        if otlp_grpc.enabled:
            grpc_server = OtlpGrpcServer(
                gw.otlp,
                gw.keys,
                gw.telemetry,
                GrpcSettings(
                    otlp_grpc.listen,
                    limits.max_body_bytes,
                    limits.retry_after.total_seconds(),
                    otlp_grpc.cert_file,
                    otlp_grpc.key_file,
                ),
            )
            grpc_server.start()
            log.info("OTLP/gRPC listening on %s", otlp_grpc.listen)
        gw.start()
        loop_factory = servers[0].config.get_loop_factory()
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            # returns once a signal asked it to stop and open requests finished
            runner.run(_run(servers, grpc_server))
    finally:
        if grpc_server is not None:
            grpc_server.stop(0)
        gw.close()
    return 0
