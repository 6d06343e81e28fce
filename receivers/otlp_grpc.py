"""The OTLP/gRPC receiver: ``MetricsService/Export`` on grpcio, in its own thread pool.

Each call is authenticated from the ``authorization`` metadata (the API keys of the HTTP API,
scope ``ingest``), decoded here (so a malformed message is ``INVALID_ARGUMENT`` with a reason,
not an opaque deserializer failure) and handed to ``OtlpMetrics``; the answer is sent only once
the points are committed. A full ingest queue answers ``RESOURCE_EXHAUSTED`` with ``RetryInfo``
(in ``grpc-status-details-bin`` and in ``google.rpc.retryinfo-bin``, which the Python exporter
reads), a store that cannot commit ``UNAVAILABLE``; both are retried by OTLP exporters. The
mapping, and the ``code`` label (the HTTP status each gRPC code stands for), are
``pipeline.outcomes``'s, shared with the HTTP receivers.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

import grpc  # type: ignore[import-untyped]
from google.protobuf import any_pb2, duration_pb2  # type: ignore[import-untyped]
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceResponse,
)

from meter_gateway.keys import AuthError
from meter_gateway.model import Source
from meter_gateway.pipeline import outcomes
from meter_gateway.telemetry import Telemetry
from receivers.otlp import OtlpError, OtlpMetrics, decode_protobuf

log = logging.getLogger(__name__)

SERVICE = "opentelemetry.proto.collector.metrics.v1.MetricsService"
# Threads that run exports; each blocks until its batch is committed, and concurrent exports
# share one group commit, so more threads than cores is the point.
WORKERS = 32
OTLP = Source.OTLP.value


class Authorizer(Protocol):
    """Checks an ``Authorization`` value for a scope (``meter_gateway.keys.KeyRing``)."""

    def check(self, authorization: str | None, scope: str) -> str | None: ...


@dataclass(frozen=True, slots=True)
class GrpcSettings:
    listen: str  # host:port
    max_message_bytes: int
    retry_after_s: float
    cert_file: str | None = None
    key_file: str | None = None
    workers: int = WORKERS


class OtlpGrpcServer:
    def __init__(
        self, metrics: OtlpMetrics, keys: Authorizer, telemetry: Telemetry, settings: GrpcSettings
    ) -> None:
        self._metrics = metrics
        self._keys = keys
        self._telemetry = telemetry
        self._settings = settings
        self._server: Any = None
        self.port = 0

    def start(self) -> int:
        """Bind and start serving; returns the bound port."""
        s = self._settings
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {"Export": grpc.unary_unary_rpc_method_handler(self._export)},  # bytes in, bytes out
        )
        server = grpc.server(
            ThreadPoolExecutor(max_workers=s.workers, thread_name_prefix="otlp-grpc"),
            handlers=[handler],
            options=[
                ("grpc.max_receive_message_length", s.max_message_bytes),
                ("grpc.max_send_message_length", 4 * 1024 * 1024),
                ("grpc.so_reuseport", 0),  # a port in use is an error, not a shared port
            ],
        )
        creds = None
        if s.cert_file and s.key_file:
            creds = grpc.ssl_server_credentials(
                [(Path(s.key_file).read_bytes(), Path(s.cert_file).read_bytes())]
            )
        try:
            if s.cert_file and s.key_file:
                port = server.add_secure_port(s.listen, creds)
            else:
                port = server.add_insecure_port(s.listen)
        except RuntimeError:  # grpcio ≥ 1.60 raises where older ones returned 0
            port = 0
        if not port:
            raise OSError(
                f"OTLP/gRPC could not listen on {s.listen} (address in use or not available)"
            )
        server.start()
        self._server, self.port = server, int(port)
        return self.port

    def stop(self, grace_s: float) -> Any:
        """Refuse new calls, let running ones finish for ``grace_s``; returns an Event (None
        when the server never started, e.g. its port was taken)."""
        if self._server is None:
            return None
        return self._server.stop(grace_s)

    # --- the RPC -----------------------------------------------------------------------------

    def _export(self, body: bytes, context: Any) -> bytes:
        started = time.perf_counter()
        metadata = dict(context.invocation_metadata())
        try:
            self._keys.check(metadata.get("authorization"), "ingest")
        except AuthError as exc:
            code = grpc.StatusCode.UNAUTHENTICATED
            if exc.status == 403:
                code = grpc.StatusCode.PERMISSION_DENIED
            self._abort(context, code, exc.message)
        try:
            outcome = self._metrics.export(decode_protobuf(body))
        except OtlpError as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        except outcomes.REFUSALS as exc:
            a = outcomes.answer(exc, self._settings.retry_after_s)
            retry = a.retry_after_s if a.retry_info else None
            self._abort(context, grpc.StatusCode[a.grpc], a.message, retry_after_s=retry)
        except Exception:
            log.exception("OTLP/gRPC export failed")
            self._abort(context, grpc.StatusCode.INTERNAL, "internal error; see the gateway log")
        response = ExportMetricsServiceResponse()
        if outcome.rejected:
            response.partial_success.rejected_data_points = outcome.rejected
            response.partial_success.error_message = outcome.error_message
        t = self._telemetry
        t.requests.labels(OTLP, outcomes.grpc_code_label("OK")).inc()
        t.batch_seconds.labels(OTLP).observe(time.perf_counter() - started)
        return bytes(response.SerializeToString())

    def _abort(
        self, context: Any, code: Any, message: str, retry_after_s: float | None = None
    ) -> NoReturn:
        self._telemetry.requests.labels(OTLP, outcomes.grpc_code_label(code.name)).inc()
        if retry_after_s is not None:
            retry = error_details_pb2.RetryInfo(
                retry_delay=duration_pb2.Duration(
                    seconds=int(retry_after_s), nanos=int(retry_after_s % 1 * 1e9)
                )
            )
            detail = any_pb2.Any()
            detail.Pack(retry)
            status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
            context.set_trailing_metadata(
                (
                    ("grpc-status-details-bin", status.SerializeToString()),
                    ("google.rpc.retryinfo-bin", retry.SerializeToString()),
                )
            )
        context.abort(code, message)
        raise AssertionError("unreachable: context.abort raises")
