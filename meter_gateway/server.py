"""Runs the gateway: the HTTP API and OTLP/HTTP under uvicorn in one event loop, OTLP/gRPC on
its own threads, then a clean drain on SIGTERM/SIGINT.

Start-up opens the store and binds every listener before anything else runs, so what stops it
(a port in use, a store held by another gateway or unreachable, a missing extra) is one
``StartupError`` with one line for a person.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import uvicorn
from starlette.types import ASGIApp

from meter_gateway.api.app import create_app
from meter_gateway.config import Config

# _clock_from: the store opens at the gateway's time (a test clock may be offset).
from meter_gateway.service import Gateway, _clock_from
from meter_gateway.store import Store, StoreUnavailableError, open_store
from receivers.otlp_grpc import GrpcSettings, OtlpGrpcServer
from receivers.otlp_http import HttpSettings
from receivers.otlp_http import create_app as create_otlp_app

GRACE_S = 30.0

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The gateway cannot start; the message is one line naming the cause."""


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


def _bind(listen: str, what: str, setting: str) -> socket.socket:
    """A socket bound to ``listen`` (not yet listening), or StartupError naming the setting."""
    host, port = split_listen(listen)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(
            f"{what} could not listen on {listen} ({setting}): {exc.strerror}"
        ) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and gRPC do
        sock.bind(address)
    except OSError as exc:
        sock.close()
        cause = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise StartupError(f"{what} could not listen on {listen} ({setting}): {cause}") from None
    sock.set_inheritable(True)
    return sock


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


async def _run(
    servers: list[tuple[_Server, socket.socket]], grpc_server: OtlpGrpcServer | None
) -> None:
    """Serve until a signal; then every server stops taking requests and finishes its own."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(sig: int, frame: FrameType | None) -> None:
        for server, _ in servers:
            server.handle_exit(sig, frame)
        loop.call_soon_threadsafe(stop.set)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        tasks = [asyncio.create_task(server.serve(sockets=[sock])) for server, sock in servers]
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([*tasks, stopping], return_when=asyncio.FIRST_COMPLETED)
        for server, _ in servers:
            server.should_exit = True
        stopped = grpc_server.stop(GRACE_S) if grpc_server is not None else None
        await asyncio.gather(*tasks)
        stopping.cancel()
        if stopped is not None:
            await loop.run_in_executor(None, stopped.wait, GRACE_S + 5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _open_store(config: Config, now_ns: int) -> Store:
    try:
        return open_store(config.store.url, int(config.ingest.dedup_window.total_seconds()), now_ns)
    except StoreUnavailableError as exc:
        raise StartupError(str(exc)) from None


def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT; drain and commit what is in flight; return the exit code.

    Raises StartupError, before anything is served, when the store or a listener is unavailable.
    """
    _limit_malloc_arenas()
    server_cfg, limits = config.server, config.ingest
    otlp_http, otlp_grpc = server_cfg.otlp_http, server_cfg.otlp_grpc
    sockets: list[socket.socket] = []
    store: Store | None = None
    try:
        # Listeners first: a port in use must not leave a new, empty database behind.
        sockets.append(_bind(server_cfg.http.listen, "the HTTP API", "server.http.listen"))
        if otlp_http.enabled:
            sockets.append(_bind(otlp_http.listen, "OTLP/HTTP", "server.otlp_http.listen"))
        if otlp_grpc.enabled:
            # gRPC binds its own socket once the gateway exists; trying the address first keeps
            # a port in use a one-line failure before anything starts.
            _bind(otlp_grpc.listen, "OTLP/gRPC", "server.otlp_grpc.listen").close()
        clock = _clock_from(os.environ)
        store = _open_store(config, clock.now_ns())
        gw = Gateway(config, clock=clock, store=store)
    except BaseException:
        for sock in sockets:
            sock.close()
        if store is not None:
            store.close()
            _remove_lock_file(config.store.url)
        raise
    grpc_server: OtlpGrpcServer | None = None
    try:
        servers = [(_uvicorn(create_app(gw), server_cfg.http.listen), sockets[0])]
        log.info("meter-gateway listening on http://%s", _address(sockets[0]))
        if otlp_http.enabled:
            settings = HttpSettings(
                limits.max_body_bytes,
                limits.max_decompressed_bytes,
                limits.retry_after.total_seconds(),
            )
            app = create_otlp_app(gw.otlp, gw.keys, gw.telemetry, settings)
            server = _uvicorn(app, otlp_http.listen, otlp_http.cert_file, otlp_http.key_file)
            servers.append((server, sockets[1]))
            log.info("OTLP/HTTP listening on %s", _address(sockets[1]))
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
            try:
                grpc_server.start()
            except OSError as exc:  # taken between the check above and now
                raise StartupError(str(exc)) from None
            log.info("OTLP/gRPC listening on %s", otlp_grpc.listen)
        _tune_runtime()
        gw.start()
        loop_factory = servers[0][0].config.get_loop_factory()
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            # returns once a signal asked it to stop and open requests finished
            runner.run(_run(servers, grpc_server))
    finally:
        if grpc_server is not None:
            grpc_server.stop(0)
        gw.close()
        for sock in sockets:
            sock.close()
        _remove_lock_file(config.store.url)
    return 0


# Ingest allocates and frees a few objects per record by reference counting; what the cyclic
# collector finds is rare. With the default first threshold (700 allocations) it ran hundreds of
# times a second and every tenth pass walked the records in flight again: 7-15 % of the
# gateway's CPU per record in bench.mix (44-50 -> 41 us/record).
GC_THRESHOLDS = (50_000, 20, 50)
# How long a thread holding the GIL runs before one waiting for it gets a turn (Python's default
# is 5 ms). Under load four threads compute (decode workers, prepare, the period gauges) and the
# event loop waits its turn after every socket call: at 5 ms a /healthz answer took p99
# 234-313 ms under 2x overload, at 1 ms 52-97 ms (bench.mix --overload, same runs), with no
# loss of throughput.
SWITCH_INTERVAL_S = 0.001


# glibc gives threads that allocate at once malloc arenas of their own (up to 8 per core), and
# memory freed into one arena is not reused by another, so a process with many threads (the
# API's and AnyIO's pools, the writers, SQLite's readers) keeps more than it uses. Two arenas
# took 9-18 MB off the peak RSS of bench.mix's 2x overload with 10M ids (VmHWM 491 and 479 MB
# against 482 and 473, alternating runs; the budget is 500), with no loss of throughput. A
# MALLOC_ARENA_MAX set in the environment wins.
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt's parameter number (malloc.h)


def _limit_malloc_arenas() -> None:
    """Cap glibc's malloc arenas (before the threads start); nothing elsewhere."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(_M_ARENA_MAX, MALLOC_ARENAS)


def _tune_runtime() -> None:
    """Collect cycles less often, never walk what start-up built (modules, catalog, config:
    ``gc.freeze`` moves it out of the collector's generations), and hand the GIL over sooner."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _remove_lock_file(url: str) -> None:
    """Remove a SQLite store's ``<path>.lock`` once the store is closed.

    Only while holding the lock ourselves, and only if the path is still the file we locked:
    a gateway that started meanwhile keeps its lock file.
    """
    if not url.startswith("sqlite://"):
        return
    from meter_gateway.store.sqlite import path_from_url

    path = f"{path_from_url(url)}.lock"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            os.unlink(path)
    except OSError:
        pass  # another gateway holds it, or it is already gone: either way, leave it
    finally:
        os.close(fd)
