"""Every dashboard query returns data from a real Prometheus scraping a real gateway.

A gateway subprocess with meters, a prepaid wallet, two exporters (a file that takes every
event, a webhook whose endpoint is down) and the Prometheus query receiver (one good series,
one Prometheus refuses) is scraped every second by a Prometheus subprocess that also loads the
alert rules. A thread drives usage through REST and OTLP/HTTP, with duplicates and rejects.
Then each panel target and each template variable query runs against that Prometheus the way
Grafana sends it — variables substituted ("All" and one concrete selection), ``$__rate_interval``
and ``$__range`` expanded — and must return at least one finite value.
"""

from __future__ import annotations

import copy
import math
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from meter_gateway.telemetry import BillingCollector, BillingGauges, PeriodUsageCollector, Telemetry
from tests.gatewayproc import BASE_CONFIG, INGEST_KEY, GatewayProcess, free_port
from tests.grafana.dashboard_queries import (
    RULES,
    PanelQuery,
    VariableQuery,
    expand,
    load_dashboards,
    macros,
    metric_names,
    panel_queries,
    variable_queries,
    variable_text,
)
from tests.helpers import now_iso
from tests.promserver import PrometheusServer

SCRAPE_S = 1
RANGE_S = 300
WAIT_S = 180.0  # how long the gateway, the receiver and the exporters get to produce data

# The concrete selection: values the driven usage guarantees data for (the only priced
# dimension, so margin % exists; the receiver that takes the REST traffic).
SELECTION = {
    "customer": "acme",
    "dimension": "data-processed",
    "currency": "USD",
    "receiver": "rest",
}


def gateway_config(prom_url: str, workdir: Path) -> dict[str, Any]:
    cfg = copy.deepcopy(BASE_CONFIG)
    cfg["dimensions"] += [
        {"id": "prom-samples", "name": "Samples", "unit": "sample", "aggregation": "sum"},
        {"id": "prom-refused", "name": "Refused", "unit": "sample", "aggregation": "sum"},
    ]
    # A plan with a recurring fee and a credit unit, for a customer the driver leaves alone:
    # its revenue (usage, credits, fee) is stable, so the gauges must add up to its draft.
    cfg["offerings"] += [
        {
            "id": "suite",
            "name": "Suite",
            "currency": "USD",
            "fee": {"amount": "20", "timing": "arrears"},
            "credit": {"unit": "credit", "unit_price": "0.5"},
            "charges": [
                {"dimension": "data-processed", "model": "per_unit"},
                {"dimension": "compute-time", "model": "per_unit", "credits_per_unit": "2"},
            ],
        }
    ]
    cfg["customers"] += [{"id": "suite-co", "name": "Suite Co", "offering": "suite"}]
    cfg["meters"] = [
        {
            "id": "acme-data",
            "customer": "acme",
            "dimension": "data-processed",
            "reset": "monthly",
            "capacity": "1000000",
            "thresholds": [{"value": "0.1", "name": "first-usage"}],
        },
        {
            "id": "dumm-ai-data",
            "customer": "dumm-ai",
            "dimension": "data-processed",
            "reset": "monthly",
            "capacity": "1",
            "thresholds": [{"percent": "100", "name": "full"}],
        },
    ]
    cfg["exporters"] = {
        "files": [{"name": "audit-log", "path": str(workdir / "events.ndjson")}],
        "webhooks": [
            {
                "name": "billing-hook",
                "url": f"http://127.0.0.1:{free_port()}/hook",  # nobody listens
                "secret": "0123456789abcdef0123456789abcdef",
                "timeout": "1s",
                "backoff_initial": "1s",
                "backoff_max": "2s",
            }
        ],
    }
    cfg["receivers"] = {
        "prometheus": {
            "url": prom_url,
            "interval": "2s",
            "delay": "2s",
            "series": [
                {
                    "dimension": "prom-samples",
                    "query": 'prometheus_tsdb_head_samples_appended_total{job="prometheus"}',
                    "customer_label": "tenant",
                    "kind": "counter",
                },
                # Prometheus refuses a selector that matches the empty label set.
                {
                    "dimension": "prom-refused",
                    "query": '{tenant=~".*"}',
                    "customer_label": "tenant",
                    "kind": "counter",
                },
            ],
        }
    }
    return cfg


@dataclass
class Stack:
    gateway: GatewayProcess
    prom: PrometheusServer


class Driver(threading.Thread):
    """Usage through the gateway until stopped: new records, a resent one, a rejected one, and
    an OTLP point without a value."""

    def __init__(self, gw: GatewayProcess) -> None:
        super().__init__(daemon=True)
        self.gw = gw
        self.stop = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        auth = {"Authorization": f"Bearer {INGEST_KEY}"}
        with httpx.Client(base_url=self.gw.url, headers=auth, timeout=30) as c:
            while not self.stop.is_set():
                now = now_iso()
                batch = [
                    usage("acme", "data-processed", "0.5", now),
                    usage("dumm-ai", "data-processed", "0.25", now),
                    usage("acme", "compute-time", "3", now),
                    usage("acme", "active-users", "1", now, user_id=f"u{int(time.time()) % 7}"),
                    {**usage("acme", "data-processed", "1", now), "id": "resent-every-time"},
                    usage("nobody", "data-processed", "1", now),  # unknown customer
                ]
                r = c.post("/v1/usage", json=batch)
                if r.status_code != 200:
                    self.errors.append(f"/v1/usage {r.status_code} {r.text}")
                r = c.post(f"{self.gw.otlp_http}/v1/metrics", json=otlp_no_value_point())
                if r.status_code != 200:
                    self.errors.append(f"/v1/metrics {r.status_code} {r.text}")
                self.stop.wait(0.25)


def usage(customer: str, dimension: str, value: str, ts: str, **meta: str) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "timestamp": ts,
        "customerId": customer,
        "dimensionId": dimension,
        "recordValue": value,
        "metadata": meta,
    }


def otlp_no_value_point() -> dict[str, Any]:
    now_ns = str(time.time_ns())
    point = {"timeUnixNano": now_ns, "asDouble": 0, "flags": 1}  # NO_RECORDED_VALUE
    gauge = {"name": "app.queue.depth", "gauge": {"dataPoints": [point]}}
    return {"resourceMetrics": [{"scopeMetrics": [{"metrics": [gauge]}]}]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = Path(tmp_path_factory.mktemp("dashboards-live"))
    prom = PrometheusServer(
        scrape_interval=f"{SCRAPE_S}s", rule_files=[RULES], workdir=workdir / "prom"
    )
    gw = GatewayProcess(workdir, gateway_config(prom.url, workdir))
    prom.config["scrape_configs"] = [
        {"job_name": "meter-gateway", "static_configs": [{"targets": [gw.url[7:]]}]},
        {
            "job_name": "prometheus",
            "static_configs": [{"targets": [prom.url[7:]], "labels": {"tenant": "acme"}}],
        },
    ]
    with prom:
        gw.start()
        driver = Driver(gw)
        try:
            with gw.client() as admin:
                r = admin.post(
                    "/v1/customers/acme/wallet/top-ups",
                    json={"id": "grafana-test", "amount": "250", "currency": "USD"},
                )
                assert r.status_code in (200, 201), r.text
            with gw.client(INGEST_KEY) as ingest:
                now = now_iso()
                r = ingest.post(
                    "/v1/usage",
                    json=[
                        usage("suite-co", "data-processed", "12.5", now),
                        usage("suite-co", "compute-time", "90", now),
                    ],
                )
                assert r.status_code == 200, r.text
                assert r.json()["accepted"] == 2, r.text
            driver.start()
            prom.wait_for_targets()
            yield Stack(gw, prom)
        finally:
            driver.stop.set()
            if driver.is_alive():
                driver.join()
            gw.stop()
        assert driver.errors == [], driver.errors[:5]


# --- running queries the way Grafana does -------------------------------------------------


def has_data(result: list[dict[str, Any]]) -> bool:
    values = [v for s in result for _, v in (s["values"] if "values" in s else [s["value"]])]
    return any(math.isfinite(float(v)) for v in values)


def run_panel_query(prom: PrometheusServer, expr: str, instant: bool) -> list[dict[str, Any]]:
    end = time.time()
    if instant:
        return prom.query(expr, end)
    step = macros(RANGE_S, SCRAPE_S)["__interval"]
    data = prom.api("query_range", query=expr, start=end - RANGE_S, end=end, step=step)
    result: list[dict[str, Any]] = data["result"]
    return result


def label_values(prom: PrometheusServer, match: str, label: str) -> list[str]:
    """``label_values(match, label)`` as Grafana's Prometheus data source asks for it."""
    end = time.time()
    values: list[str] = prom.api(
        f"label/{label}/values", **{"match[]": match, "start": end - RANGE_S, "end": end}
    )
    return sorted(values)


def selections(
    prom: PrometheusServer, name: str, dashboard: dict[str, Any]
) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Variable values for the "all" and the "one" selection, resolving each variable's query
    after the variables before it (as Grafana does); and the variable queries that came back
    empty."""
    out: dict[str, dict[str, str]] = {"all": {}, "one": {}}
    empty: list[str] = []
    for mode in out:
        values = out[mode] | {"datasource": "unused"}
        for var in variable_queries(name, dashboard):
            options = label_values(prom, expand(var.match, values), var.label)
            if not options:
                empty.append(f"{name} ${var.name} ({mode}): {var.match}")
                values[var.name] = "no-options"
                continue
            values[var.name] = pick(var, options, mode)
        out[mode] = values | macros(RANGE_S, SCRAPE_S)
    return out, empty


def pick(var: VariableQuery, options: list[str], mode: str) -> str:
    if mode == "all" and var.multi:
        return variable_text(None, True)
    wanted = SELECTION.get(var.name, options[0])
    return variable_text(wanted if wanted in options else f"missing:{wanted}", var.multi)


def empty_queries(prom: PrometheusServer) -> list[str]:
    empty: list[str] = []
    for name, dash in load_dashboards().items():
        values, empty_vars = selections(prom, name, dash)
        empty += empty_vars
        for q in panel_queries(name, dash):
            for mode, vals in values.items():
                expr = expand(q.expr, vals)
                if not has_data(run_panel_query(prom, expr, q.instant)):
                    empty.append(f"{describe(q)} ({mode}): {expr}")
    return empty


def describe(q: PanelQuery) -> str:
    return f"{q.dashboard} / {q.panel} / {q.ref}"


# --- the tests -------------------------------------------------------------------------------


def test_every_panel_and_variable_query_returns_data(stack: Stack) -> None:
    deadline = time.monotonic() + WAIT_S
    empty = empty_queries(stack.prom)
    while empty and time.monotonic() < deadline:
        time.sleep(1)
        empty = empty_queries(stack.prom)
    assert empty == [], "queries without data:\n" + "\n".join(empty)
    # Nothing counted twice: the concrete selection sees what one replica reports.
    [usage_now] = stack.prom.query(
        'max by (customer, dimension) (meter_gateway_period_usage{customer="acme", '
        'dimension="data-processed"})'
    )
    assert float(usage_now["value"][1]) > 0


def test_revenue_per_customer_holds_fee_and_credits_as_the_draft_does(stack: Stack) -> None:
    """What the margin dashboard's per-customer revenue adds up is the draft invoice's total:
    usage (12.5 GB × 0.08), credits (2 started hours × 2 credits × 0.5) and the month's fee."""
    query = (
        "sum by (customer) (max by (customer, dimension, currency) (meter_gateway_period_revenue{"
        'customer="suite-co", currency="USD"}))'
    )

    def summed() -> list[dict[str, Any]]:
        result = stack.prom.query(query)
        return result if result and float(result[0]["value"][1]) > 0 else []

    [revenue] = stack.prom.wait_for(summed, WAIT_S, "suite-co's revenue")
    with stack.gateway.client() as admin:
        r = admin.post("/v1/customers/suite-co/invoices", json={})
        assert r.status_code == 201, r.text
        draft = r.json()
    assert draft["total"] == "23.00"
    assert float(revenue["value"][1]) == float(draft["total"])
    by_dim = {
        s["metric"]["dimension"]: float(s["value"][1])
        for s in stack.prom.query('meter_gateway_period_revenue{customer="suite-co"}')
    }
    assert by_dim == {"data-processed": 1.0, "compute-time": 0.0, "credits/credit": 2.0,
                      "fee/suite": 20.0}  # fmt: skip


def exposed_names(metrics_text: str) -> set[str]:
    """Sample names a scrape can carry, from the exposition's ``# TYPE`` lines and from the
    families declared in meter_gateway.telemetry (which exist before their first sample)."""
    families: dict[str, str] = dict(
        re.findall(r"^# TYPE (\S+) (\S+)$", metrics_text, flags=re.MULTILINE)
    )
    declared = [
        *Telemetry().registry.collect(),
        *PeriodUsageCollector(list).describe(),
        *BillingCollector(lambda: BillingGauges([], [], [])).describe(),
    ]
    families |= {f.name: f.type for f in declared}
    names: set[str] = set()
    suffixes = {
        "counter": ("_total", "_created", ""),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "info": ("_info",),
        "gauge": ("",),
    }
    for name, kind in families.items():
        base = name.removesuffix("_total") if kind == "counter" else name
        names |= {base + s for s in suffixes.get(kind, ("",))}
    return names


def test_every_metric_used_is_one_the_gateway_exposes(stack: Stack) -> None:
    metrics_text = httpx.get(f"{stack.gateway.url}/metrics", timeout=10).text
    exposed = exposed_names(metrics_text)
    used: dict[str, set[str]] = {}
    for name, dash in load_dashboards().items():
        for q in panel_queries(name, dash):
            used.setdefault(name, set()).update(metric_names(q.expr))
        for v in variable_queries(name, dash):
            used[name] |= metric_names(v.match)
    rules = yaml.safe_load(RULES.read_text())
    used[RULES.name] = {
        m for g in rules["groups"] for r in g["rules"] for m in metric_names(r["expr"])
    }
    for where, names in used.items():
        assert names, where
        assert names <= exposed, f"{where}: not exposed by the gateway: {names - exposed}"
    # And each one rule uses has series in Prometheus, scraped from the gateway.
    for metric in sorted(used[RULES.name]):
        assert stack.prom.wait_for_series(f"count({metric})", timeout=WAIT_S), metric


def test_the_alert_rules_evaluate_on_real_data(stack: Stack) -> None:
    def evaluated() -> list[dict[str, Any]]:
        rules = [r for g in stack.prom.rules() for r in g["rules"]]
        return rules if rules and all(r["health"] != "unknown" for r in rules) else []

    rules = stack.prom.wait_for(evaluated, WAIT_S, "every rule evaluated")
    assert {r["name"] for r in rules} == {
        r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
    }
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    # The driven gateway is within every meter but one: dumm-ai's 1 GB meter is over capacity.
    firing = stack.prom.wait_for(
        lambda: [a for a in stack.prom.alerts() if a["labels"]["alertname"].endswith("Capacity")],
        WAIT_S,
        "a capacity alert",
    )
    assert {(a["labels"]["alertname"], a["labels"]["customer"]) for a in firing} == {
        ("MeterGatewayMeterOverCapacity", "dumm-ai")
    }
