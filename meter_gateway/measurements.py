"""Measurement templates (Paigo's): predefined dimension settings plus the Prometheus series
that measures them.

A dimension that names a template in ``measurement`` gets the template's unit, aggregation,
aggregation interval, usage increment and rounding for every key it does not set itself; a
``receivers.prometheus.series`` entry for that dimension gets the template's query, kind,
customer label and scale the same way. Explicit settings always win, except ``unit``: it names
what the template bills, so config refuses a different one.

``unit`` is the unit of the billed quantity (what an invoice line counts), not of the usage. The
time-based templates integrate a 0/1 gauge ("running") or read a seconds counter: usage is in
seconds, and an increment of 60 with ``ceil`` per hour bills started minutes, so their unit is
``minute``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class Measurement:
    id: str
    description: str
    # Dimension settings (config.Dimension keys). ``unit`` is what is billed: the usage divided
    # by ``usage_increment`` and rounded.
    unit: str
    aggregation: str
    aggregation_interval: str
    usage_increment: Decimal
    rounding: str
    # The Prometheus series (config.PrometheusSeries keys).
    query: str
    kind: Literal["counter", "gauge"]
    customer_label: str
    scale: Decimal

    def dimension_defaults(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "aggregation": self.aggregation,
            "aggregation_interval": self.aggregation_interval,
            "usage_increment": self.usage_increment,
            "rounding": self.rounding,
            "description": self.description,
        }

    def series_defaults(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "kind": self.kind,
            "customer_label": self.customer_label,
            "scale": self.scale,
        }


_GB = Decimal("1e-9")

TEMPLATES: Mapping[str, Measurement] = {
    m.id: m
    for m in (
        Measurement(
            "kubernetes-pod-compute-time",
            "Time pods run (kube-state-metrics kube_pod_status_phase, phase Running, 0 or 1 per "
            "pod), summed per namespace; billed in started minutes per hour.",
            "minute",
            "sum",
            "hour",
            Decimal(60),
            "ceil",
            'kube_pod_status_phase{phase="Running"}',
            "gauge",
            "namespace",
            Decimal(1),
        ),
        Measurement(
            "kubernetes-container-cpu-time",
            "CPU time containers used (cAdvisor container_cpu_usage_seconds_total), per "
            "namespace; billed in started CPU-minutes per hour.",
            "minute",
            "sum",
            "hour",
            Decimal(60),
            "ceil",
            'container_cpu_usage_seconds_total{container!=""}',
            "counter",
            "namespace",
            Decimal(1),
        ),
        Measurement(
            "ec2-instance-running-time",
            "Time instances run (a 0/1 gauge per instance, e.g. from a CloudWatch or EC2 "
            "exporter), per tenant tag; billed in started minutes per hour.",
            "minute",
            "sum",
            "hour",
            Decimal(60),
            "ceil",
            "ec2_instance_running",
            "gauge",
            "tenant",
            Decimal(1),
        ),
        Measurement(
            "network-egress-bytes",
            "Bytes sent out of the network (container_network_transmit_bytes_total), per "
            "namespace, in gigabytes.",
            "gigabyte",
            "sum",
            "none",
            Decimal(1),
            "none",
            "container_network_transmit_bytes_total",
            "counter",
            "namespace",
            _GB,
        ),
        Measurement(
            "volume-size-gb",
            "Provisioned volume size (kubelet_volume_stats_capacity_bytes) as a level, per "
            "namespace: the time-weighted average gigabytes over the period (GB-months).",
            "gigabyte",
            "time_weighted_avg",
            "none",
            Decimal(1),
            "none",
            "kubelet_volume_stats_capacity_bytes",
            "gauge",
            "namespace",
            _GB,
        ),
        Measurement(
            "snapshot-size-gb",
            "Stored snapshot size (a bytes gauge per snapshot, e.g. an EBS snapshot exporter) "
            "as a level, per tenant: time-weighted average gigabytes over the period.",
            "gigabyte",
            "time_weighted_avg",
            "none",
            Decimal(1),
            "none",
            "snapshot_size_bytes",
            "gauge",
            "tenant",
            _GB,
        ),
    )
}


def template(name: str) -> Measurement:
    """The named template; ``ValueError`` listing the known names otherwise."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(
            f"unknown measurement {name!r} (known: {', '.join(sorted(TEMPLATES))})"
        ) from None


def fill_dimension(raw: Any) -> Any:
    """A dimension's raw config with the template's settings for every key it leaves out."""
    if isinstance(raw, Mapping) and isinstance(raw.get("measurement"), str):
        m = template(raw["measurement"])
        return {**m.dimension_defaults(), **raw}
    return raw


def fill_series(raw: Any, measurement: str | None) -> Any:
    """A Prometheus series' raw config with its dimension's template filled in."""
    if isinstance(raw, Mapping) and measurement is not None and measurement in TEMPLATES:
        return {**TEMPLATES[measurement].series_defaults(), **raw}
    return raw
