"""Scrapes of a running gateway's /metrics that wait for its background work."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import eventually

COMPUTED = "meter_gateway_period_computed_timestamp_seconds"


def metrics_computed_since(client: httpx.Client, since_s: float, timeout_s: float = 90) -> str:
    """/metrics once its ``meter_gateway_period_*`` gauges were computed at or after ``since_s``
    (Unix seconds): a background refresh rates every customer, soon after this replica commits
    and every ``billing.period_gauges_interval``."""

    def refreshed() -> str | None:
        text = client.get("/metrics").text
        for fam in text_string_to_metric_families(text):
            if fam.name == COMPUTED and any(s.value >= since_s for s in fam.samples):
                return text
        return None

    return eventually(refreshed, "the period gauges to be refreshed", timeout_s)
