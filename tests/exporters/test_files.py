"""The NDJSON file exporter: finalized invoices and meter events as one JSON line each, filtered
by event type, appended once; a failing path keeps events pending until it works again."""

from __future__ import annotations

from pathlib import Path

import orjson

from exporters.files import FileSink
from exporters.outbox import DeliveryJob
from meter_gateway.clock import FixedClock
from meter_gateway.store.base import OutboxEvent
from tests.billing.appserver import serve
from tests.gatewayproc import BASE_CONFIG
from tests.helpers import open_store, ts


def lines(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


def test_invoices_and_meter_events_land_in_their_files(tmp_path: Path) -> None:
    all_events, invoices = tmp_path / "out" / "all.ndjson", tmp_path / "invoices.ndjson"
    config = {
        **BASE_CONFIG,
        "meters": [
            {"id": "m", "customer": "acme", "dimension": "data-processed", "reset": "monthly",
             "thresholds": [{"value": "5"}]},
        ],
        "exporters": {
            "files": [
                {"name": "all", "path": str(all_events)},
                # the name before SPEC 11's invoice.finalized still subscribes to it
                {"name": "invoices", "path": str(invoices), "events": ["invoice_finalized"]},
            ]
        },
    }  # fmt: skip
    clock = FixedClock(ts("2026-05-20T12:00:00"))
    with serve(tmp_path, config, clock) as (gw, client):
        r = client.post(
            "/v1/usage",
            json={"timestamp": "2026-05-20T11:00:00Z", "customerId": "acme",
                  "dimensionId": "data-processed", "recordValue": "6"},
        )  # fmt: skip
        assert r.status_code == 200
        inv = client.post("/v1/customers/acme/invoices", json={}).json()
        final = client.post(f"/v1/invoices/{inv['id']}/finalize").json()
        for _ in range(3):  # meter job, then the delivery jobs it woke
            gw.scheduler.run_due()
        metrics = client.get("/metrics").text
    assert [(e["type"], e["id"]) for e in lines(all_events)] == [
        ("invoice.finalized", f"invoice/{inv['id']}/finalized"),
        ("threshold_reached", "m/2026-05-01T00:00:00Z/threshold/value:5"),
    ]
    (only,) = lines(invoices)
    assert only["data"] == final
    assert 'meter_gateway_exporter_deliveries_total{exporter="all",outcome="ok"} 2.0' in metrics
    assert 'meter_gateway_exporter_outbox_events{exporter="invoices"} 0.0' in metrics


def test_a_failing_path_keeps_the_event_pending_until_it_works(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    clock = FixedClock(ts("2026-05-20T12:00:00"))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the exporter's directory should be")
    sink = FileSink("f", str(blocker / "events.ndjson"))
    job = DeliveryJob(store, sink, clock, 1.0, 1.0)
    store.job_commit({}, [OutboxEvent("f", "e1", "meter_reset", b'{"id":"e1"}', 0)], None, 0)
    assert job.run(clock.now_ns()) == 1.0
    (stats,) = store.outbox_stats()
    assert stats.pending == 1
    blocker.unlink()
    clock.advance(1)
    job.run(clock.now_ns())
    assert (blocker / "events.ndjson").read_bytes() == b'{"id":"e1"}\n'
    assert store.outbox_stats() == []  # nothing pending or given up
    job.close()
    store.close()
