"""Record usage from an application with the OpenTelemetry SDK, for meter-gateway to bill.

One monotonic counter per dimension (``usage.<dimension>``), the customer as an attribute,
exported over OTLP (gRPC or HTTP) with delta temporality by default. The gateway maps each
counter to its dimension with one rule per dimension (``gateway_rules`` writes them)::

    usage = UsageMeter("http://127.0.0.1:4317", api_key=os.environ["METER_INGEST_KEY"])
    usage.record("data-processed", 3, customer="acme")
    usage.shutdown()  # flushes what is left

Values are summed by the SDK in binary floating point: record integers (bytes, milliseconds,
tokens) and let the rule's ``scale`` turn them into billing units when exactness matters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal
from types import TracebackType
from typing import Any, Literal

from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    MeterProvider,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource

Transport = Literal["grpc", "http"]
Temporality = Literal["delta", "cumulative"]

DEFAULT_PREFIX = "usage."
DEFAULT_CUSTOMER_ATTRIBUTE = "tenant"


class UsageMeter:
    """Counts usage per customer and dimension and exports it to meter-gateway.

    ``endpoint``: ``http(s)://host:4317`` for gRPC, ``http(s)://host:4318`` for HTTP (the
    ``/v1/metrics`` path is added when missing). ``api_key`` is sent as a Bearer token and
    needs the ``ingest`` scope.

    Temporality: with ``delta`` (the default) the SDK forgets each customer's count after every
    export, so memory stays flat however many customers there are; an export that still fails
    after the exporter's retries is lost. With ``cumulative`` every export carries running totals,
    so the next export makes up for a failed one, and the gateway turns totals back into deltas
    exactly (also across app and gateway restarts); the SDK keeps one stream per customer for
    the life of the process, up to ``max_customers`` per dimension.
    """

    def __init__(
        self,
        endpoint: str = "http://127.0.0.1:4317",
        *,
        api_key: str | None = None,
        protocol: Transport = "grpc",
        temporality: Temporality = "delta",
        export_interval_s: float = 10.0,
        timeout_s: float = 10.0,
        service_name: str = "app",
        resource_attributes: Mapping[str, str] | None = None,
        metric_prefix: str = DEFAULT_PREFIX,
        customer_attribute: str = DEFAULT_CUSTOMER_ATTRIBUTE,
        max_customers: int = 2000,
        exporter: MetricExporter | None = None,
    ) -> None:
        self._prefix = metric_prefix
        self._customer_attribute = customer_attribute
        preferred = _temporalities(temporality)
        if exporter is None:
            exporter = _exporter(endpoint, api_key, protocol, preferred, timeout_s)
        self._exports = _Outcomes(exporter)
        reader = PeriodicExportingMetricReader(
            self._exports,
            export_interval_millis=export_interval_s * 1000,
            export_timeout_millis=timeout_s * 1000 * 3,
            cardinality_limits={Counter: max_customers},
        )
        resource = Resource.create({"service.name": service_name, **(resource_attributes or {})})
        # Its own provider, not the global one: the app's other metrics are not billed.
        self._provider = MeterProvider(metric_readers=[reader], resource=resource)
        self._meter = self._provider.get_meter("meter_gateway.exporters.usage")
        self._counters: dict[str, Any] = {}

    def record(
        self,
        dimension: str,
        value: int | float | Decimal | str,
        *,
        customer: str,
        attributes: Mapping[str, str] | None = None,
    ) -> None:
        """Add ``value`` (≥ 0) of ``dimension`` to ``customer``'s usage."""
        amount = _amount(value)
        counter = self._counters.get(dimension)
        if counter is None:
            counter = self._meter.create_counter(
                self._prefix + dimension, description=f"usage of {dimension}"
            )
            self._counters[dimension] = counter
        counter.add(amount, {**(attributes or {}), self._customer_attribute: customer})

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Export everything recorded so far now; True if the gateway accepted it (committed).

        False means an export failed after the exporter's own retries (the SDK logs why).
        """
        failures = self._exports.failures
        flushed = self._provider.force_flush(int(timeout_s * 1000))
        return bool(flushed) and self._exports.failures == failures

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Flush and stop the periodic export."""
        self._provider.force_flush(int(timeout_s * 1000))
        self._provider.shutdown(int(timeout_s * 1000))

    def __enter__(self) -> UsageMeter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()


class _Outcomes(MetricExporter):
    """Passes exports through and counts the failed ones: the SDK's force_flush does not say."""

    def __init__(self, inner: MetricExporter) -> None:
        super().__init__(inner._preferred_temporality, inner._preferred_aggregation)
        self._inner = inner
        self.failures = 0

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        result = self._inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        if result is not MetricExportResult.SUCCESS:
            self.failures += 1
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def gateway_rules(
    dimensions: list[str],
    metric_prefix: str = DEFAULT_PREFIX,
    customer_attribute: str = DEFAULT_CUSTOMER_ATTRIBUTE,
) -> list[dict[str, Any]]:
    """The gateway ``rules[]`` entries that bill what a ``UsageMeter`` records."""
    return [
        {
            "match": {"source": "otlp", "metric": metric_prefix + d},
            "dimension": d,
            "customer_attribute": customer_attribute,
        }
        for d in dimensions
    ]


def _amount(value: int | float | Decimal | str) -> int | float:
    if isinstance(value, bool):
        raise TypeError("usage must be a number, not a boolean")
    if isinstance(value, str):
        value = Decimal(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"usage must be finite, got {value}")
        value = int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"usage must be finite, got {value}")
    if value < 0:
        raise ValueError(f"usage must not be negative, got {value}")
    return value


def _temporalities(temporality: Temporality) -> dict[type, AggregationTemporality]:
    if temporality not in ("delta", "cumulative"):
        raise ValueError(f"temporality must be 'delta' or 'cumulative', got {temporality!r}")
    sums = (
        AggregationTemporality.DELTA
        if temporality == "delta"
        else AggregationTemporality.CUMULATIVE
    )
    return {
        Counter: sums,
        Histogram: sums,
        ObservableCounter: sums,
        UpDownCounter: AggregationTemporality.CUMULATIVE,
        ObservableUpDownCounter: AggregationTemporality.CUMULATIVE,
        ObservableGauge: AggregationTemporality.CUMULATIVE,
    }


def _exporter(
    endpoint: str,
    api_key: str | None,
    protocol: Transport,
    preferred: dict[type, AggregationTemporality],
    timeout_s: float,
) -> MetricExporter:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcExporter,
        )

        return GrpcExporter(
            endpoint=endpoint,
            insecure=endpoint.startswith("http://"),
            headers=headers,
            timeout=timeout_s,
            preferred_temporality=preferred,
        )
    if protocol == "http":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpExporter,
        )

        url = endpoint.rstrip("/")
        if not url.endswith("/v1/metrics"):
            url += "/v1/metrics"
        return HttpExporter(
            endpoint=url, headers=headers, timeout=timeout_s, preferred_temporality=preferred
        )
    raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
