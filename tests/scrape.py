"""Scrapes of a running gateway's /metrics that wait for its background work."""

from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

COMPUTED = "meter_gateway_period_computed_timestamp_seconds"


def metrics_computed_since(client: httpx.Client, since_s: float, timeout_s: float = 90) -> str:
    """/metrics once its ``meter_gateway_period_*`` gauges were computed at or after ``since_s``
    (Unix seconds): a background refresh rates every customer, soon after this replica commits
    and every ``billing.period_gauges_interval``."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = client.get("/metrics").text
        for fam in text_string_to_metric_families(text):
            if fam.name == COMPUTED and any(s.value >= since_s for s in fam.samples):
                return text
        assert time.monotonic() < deadline, "the period gauges were not refreshed in time"
        time.sleep(0.1)  # polling: the refresh runs on its own schedule
