"""The Stripe exporter against a real localstripe (tests/exporters/localstripe.py): a finalized
invoice becomes exactly one Stripe invoice with our lines, whatever call a crash interrupts;
a void voids it; customers without a Stripe id are skipped; refusals stay visible. End to end
through a gateway process killed in the middle of a sync."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import stripe
from prometheus_client.parser import text_string_to_metric_families

from exporters.outbox import DeliveryJob
from exporters.stripe import (
    AmountError,
    HttpxTransport,
    PlannedItem,
    StripeSink,
    minor_amount,
    planned_items,
    stripe_link,
)
from meter_gateway.billing.events import EventType, envelope
from meter_gateway.clock import FixedClock
from meter_gateway.config import ConfigError, parse_config
from meter_gateway.store.base import OutboxEvent, Store
from tests.exporters.localstripe import LocalStripe
from tests.gatewayproc import BASE_CONFIG, INGEST_KEY, GatewayProcess
from tests.helpers import open_store

NS = 1_000_000_000
T0 = int(datetime(2031, 3, 10, 12, 0, tzinfo=UTC).timestamp()) * NS
API_KEY = "sk_test_meter_gateway"
TESTDATA = Path(__file__).parents[1] / "testdata" / "invoices"
DELIVERIES = "meter_gateway_exporter_deliveries_total"


def wait_for(what: str, check: Callable[[], object], timeout: float = 60.0) -> None:
    """Poll until ``check()`` is true; the deadline only guards against hanging forever."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def metric(gw: GatewayProcess, name: str, **labels: str) -> float | None:
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


@pytest.fixture(scope="module")
def localstripe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStripe]:
    server = LocalStripe(tmp_path_factory.mktemp("localstripe")).start()
    yield server
    server.stop()


@pytest.fixture
def api(localstripe: LocalStripe) -> Iterator[stripe.StripeClient]:
    """The test's own view of localstripe (what a person would see in Stripe)."""
    http = HttpxTransport()
    yield stripe.StripeClient(
        API_KEY, base_addresses={"api": localstripe.url}, max_network_retries=0, http_client=http
    )
    http.close()


def finalized_doc(invoice_id: str, customer: str = "acme") -> dict[str, Any]:
    """A finalized invoice document as the gateway stores it: four lines, 10.50 of credits."""
    doc = orjson.loads((TESTDATA / "numbered.json").read_bytes())
    return {**copy.deepcopy(doc), "id": invoice_id, "customerId": customer}


def queue(store: Store, type: EventType, doc: dict[str, Any], at: int = T0) -> None:
    suffix = "finalized" if type == "invoice.finalized" else "voided"
    event_id = f"invoice/{doc['id']}/{suffix}"
    payload = envelope(type, event_id, doc, at)
    store.job_commit({}, [OutboxEvent("stripe", event_id, type, payload, at)], None, at)


def stripe_invoices(api: stripe.StripeClient, customer: str) -> list[stripe.Invoice]:
    return list(api.v1.invoices.list(params={"customer": customer}).auto_paging_iter())


def metadata(obj: stripe.Invoice) -> dict[str, str]:
    return {} if obj.metadata is None else obj.metadata.to_dict()


def stripe_lines(api: stripe.StripeClient, invoice: str) -> list[tuple[str, int, str, str]]:
    """(our line key, amount, currency, description) of a Stripe invoice's lines."""
    lines = api.v1.invoices.line_items.list(invoice, params={"limit": 100}).auto_paging_iter()
    return sorted(
        (ln.metadata["meter_gateway_line"], ln.amount, ln.currency, ln.description or "")
        for ln in lines
    )


NUMBERED_LINES = [
    ("0", 1, "usd", 'Data <Processed> & "more": 1 gigabyte'),
    ("1", 226, "usd", "Compute Time: 3 minute"),
    ("2", 5000, "usd", "Active Users: 6 user"),
    ("3", 205, "usd", "=cmd|' /C calc'!A0: 101 call"),
    ("credits", -1050, "usd", "Prepaid credits applied"),
]


class FaultyHttp(HttpxTransport):
    """The real transport with faults put in: ``down`` refuses every request before it is
    sent; ``lose_answer_of`` lets the Nth POST reach Stripe and do its work, then loses the
    answer (a crash, a cut connection: the caller cannot know it succeeded)."""

    def __init__(self, lose_answer_of: int | None = None) -> None:
        super().__init__(timeout_s=10)
        self.down = False
        self.lose_answer_of = lose_answer_of
        self.posts = 0

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[str, int, Mapping[str, str]]:
        if self.down:
            raise stripe.APIConnectionError(f"{method.upper()} {url}: connection refused")  # type: ignore[no-untyped-call]
        answer = super().request(method, url, headers, post_data)
        if method == "post":
            self.posts += 1
            if self.posts == self.lose_answer_of:
                lost = "the answer was lost (the gateway crashed)"
                raise stripe.APIConnectionError(lost)  # type: ignore[no-untyped-call]
        return answer


def sink(
    store: Store,
    localstripe: LocalStripe,
    customers: dict[str, str],
    http: HttpxTransport | None = None,
    **options: Any,
) -> StripeSink:
    return StripeSink(
        API_KEY,
        store,
        customers.get,
        FixedClock(T0),
        api_base=localstripe.url,
        http_client=http,
        **options,
    )


def new_customer(api: stripe.StripeClient, name: str = "Acme") -> str:
    return api.v1.customers.create(params={"name": name}).id


# --- pure: amounts and items ------------------------------------------------------------------


def test_amounts_become_whole_minor_units_of_stripe_exactly() -> None:
    assert minor_amount(Decimal("12.34"), "USD") == 1234
    assert minor_amount(Decimal("0.10"), "EUR") == 10
    assert minor_amount(Decimal("500"), "JPY") == 500
    assert minor_amount(Decimal("1.234"), "KWD") == 1234
    assert minor_amount(Decimal("-10.50"), "USD") == -1050
    assert minor_amount(Decimal("123456789012345678.91"), "USD") == 12345678901234567891
    # where Stripe's unit is not ISO 4217's: ISK is two-decimal there, MGA whole ariary
    assert minor_amount(Decimal("1000"), "ISK") == 100000
    assert minor_amount(Decimal("5"), "MGA") == 5
    with pytest.raises(AmountError, match=r"0\.005 USD is not a whole number"):
        minor_amount(Decimal("0.005"), "USD")
    with pytest.raises(AmountError):
        minor_amount(Decimal("5.50"), "MGA")


def test_each_line_is_one_item_and_the_credits_one_negative_item() -> None:
    items = planned_items(finalized_doc("inv_x"))
    assert items == [
        PlannedItem(line, amount, description) for line, amount, _, description in NUMBERED_LINES
    ]
    # the Stripe invoice owes what ours does
    assert sum(i.amount for i in items) == minor_amount(Decimal("43.82"), "USD")
    no_credits = {**finalized_doc("inv_y"), "creditsApplied": "0.00"}
    assert [i.line for i in planned_items(no_credits)] == ["0", "1", "2", "3"]


def test_config_errors_name_their_path() -> None:
    def errors(text: str, environ: dict[str, str]) -> str:
        with pytest.raises(ConfigError) as exc:
            parse_config(text, environ=environ)
        return "\n".join(exc.value.errors)

    got = errors("exporters: {stripe: {api_key_env: STRIPE_KEY, events: [meter_reset]}}", {})
    assert "exporters.stripe.api_key_env: environment variable STRIPE_KEY is not set" in got
    assert "exporters.stripe.events.0: Input should be 'invoice.finalized' or" in got
    got = errors(
        "exporters: {stripe: {api_key_env: K, collection_method: send_invoice}}", {"K": "k"}
    )
    assert "exporters.stripe: " in got
    assert "days_until_due is set exactly when collection_method is send_invoice" in got
    got = errors(
        "exporters: {stripe: {api_key_env: K}, files: [{name: stripe, path: x}]}", {"K": "k"}
    )
    assert "exporter names must be unique, repeated: ['stripe']" in got
    config = parse_config("exporters: {stripe: {api_key_env: K}}", environ={"K": API_KEY})
    assert config.exporters.stripe is not None
    assert config.exporters.stripe.events == ("invoice.finalized", "invoice.voided")
    assert config.exporters.stripe.resolve_api_key({"K": API_KEY}) == API_KEY


# --- against localstripe, in process ----------------------------------------------------------


def test_a_finalized_invoice_becomes_one_finalized_stripe_invoice_with_our_lines(
    tmp_path: Path, localstripe: LocalStripe, api: stripe.StripeClient
) -> None:
    store = open_store(tmp_path)
    cus = new_customer(api)
    exporter = sink(store, localstripe, {"acme": cus})
    job = DeliveryJob(store, exporter, FixedClock(T0))
    queue(store, "invoice.finalized", finalized_doc("inv_one"))
    (event,) = store.outbox_claim("stripe", T0, 10)
    job.run(T0)

    (inv,) = stripe_invoices(api, cus)
    assert inv.status == "open"
    assert inv.currency == "usd"
    assert metadata(inv) == {
        "meter_gateway_invoice_id": "inv_one",
        "number": "INV-000001",
    }
    assert inv.total == 4382
    assert stripe_lines(api, inv.id) == sorted(NUMBERED_LINES)
    link = stripe_link(store, "inv_one")
    assert link is not None
    assert (link.stripe_invoice_id, link.stripe_customer_id, link.status) == (inv.id, cus, "open")
    assert store.outbox_claim("stripe", T0 + 3600 * NS, 10) == []

    # delivered again (at-least-once: a crash before the outbox mark): nothing new in Stripe
    exporter.deliver(event)
    assert [i.id for i in stripe_invoices(api, cus)] == [inv.id]
    assert stripe_lines(api, inv.id) == sorted(NUMBERED_LINES)
    job.close()
    store.close()


# invoice, 5 items, finalize: a crash after each call did its work in Stripe
@pytest.mark.parametrize("lost", range(1, 8))
def test_a_crash_after_any_stripe_call_repeats_nothing(
    tmp_path: Path, localstripe: LocalStripe, api: stripe.StripeClient, lost: int
) -> None:
    store = open_store(tmp_path)
    cus = new_customer(api)
    clock = FixedClock(T0)
    first = DeliveryJob(
        store, sink(store, localstripe, {"acme": cus}, FaultyHttp(lose_answer_of=lost)), clock
    )
    queue(store, "invoice.finalized", finalized_doc("inv_crash"))
    assert first.run(clock.now_ns()) == 1.0  # failed: retried after the first backoff
    (item,) = store.outbox_claim("stripe", T0 + 10 * NS, 10)
    assert "the answer was lost" in (item.last_error or "")
    first.close()

    # the gateway comes back: a new sink, the same store, the event still pending
    clock.advance(1)
    again = DeliveryJob(store, sink(store, localstripe, {"acme": cus}), clock)
    again.run(clock.now_ns())
    assert store.outbox_claim("stripe", T0 + 10 * NS, 10) == []
    (inv,) = stripe_invoices(api, cus)
    assert inv.status == "open"
    assert stripe_lines(api, inv.id) == sorted(NUMBERED_LINES)
    again.close()
    store.close()


def test_void_voids_the_stripe_invoice_and_deletes_a_draft(
    tmp_path: Path, localstripe: LocalStripe, api: stripe.StripeClient
) -> None:
    store = open_store(tmp_path)
    cus = new_customer(api)
    job = DeliveryJob(store, sink(store, localstripe, {"acme": cus}), FixedClock(T0))
    doc = finalized_doc("inv_void")
    queue(store, "invoice.finalized", doc)
    job.run(T0)
    queue(store, "invoice.voided", {**doc, "status": "void"}, at=T0 + 1)
    job.run(T0 + 1)
    (inv,) = stripe_invoices(api, cus)
    assert inv.status == "void"
    link = stripe_link(store, "inv_void")
    assert link is not None
    assert link.status == "void"
    job.close()

    # finalize: false leaves drafts; Stripe voids only finalized invoices, so a draft goes
    drafts = DeliveryJob(
        store, sink(store, localstripe, {"acme": cus}, finalize=False), FixedClock(T0)
    )
    doc = finalized_doc("inv_draft")
    queue(store, "invoice.finalized", doc)
    drafts.run(T0 + 2)
    draft = next(i for i in stripe_invoices(api, cus) if i.id != inv.id)
    assert draft.status == "draft"
    assert len(stripe_lines(api, draft.id)) == 5
    queue(store, "invoice.voided", {**doc, "status": "void"}, at=T0 + 3)
    drafts.run(T0 + 3)
    assert [i.id for i in stripe_invoices(api, cus)] == [inv.id]
    link = stripe_link(store, "inv_draft")
    assert link is not None
    assert link.status == "deleted"
    drafts.close()
    store.close()


def test_a_customer_without_a_stripe_id_is_skipped_and_counted(
    tmp_path: Path, localstripe: LocalStripe
) -> None:
    store = open_store(tmp_path)
    skipped: list[str] = []
    job = DeliveryJob(store, sink(store, localstripe, {}), FixedClock(T0), on_skip=skipped.append)
    before = localstripe.requests()
    queue(store, "invoice.finalized", finalized_doc("inv_nostripe"))
    assert job.run(T0) == 5.0  # nothing failed: back to polling
    assert skipped == ["stripe"]
    assert store.outbox_claim("stripe", T0 + 3600 * NS, 10) == []
    assert localstripe.requests() == before  # Stripe was never asked
    assert stripe_link(store, "inv_nostripe") is None
    job.close()
    store.close()


def test_a_refused_invoice_keeps_failing_visibly_without_holding_up_the_others(
    tmp_path: Path, localstripe: LocalStripe, api: stripe.StripeClient
) -> None:
    store = open_store(tmp_path)
    good = new_customer(api)
    outcomes: list[bool] = []
    clock = FixedClock(T0)
    job = DeliveryJob(
        store,
        sink(store, localstripe, {"acme": "cus_doesnotexist", "dumm-ai": good}),
        clock,
        1.0,
        8.0,
        on_delivery=lambda _, ok: outcomes.append(ok),
    )
    queue(store, "invoice.finalized", finalized_doc("inv_refused", "acme"))
    queue(store, "invoice.finalized", finalized_doc("inv_fine", "dumm-ai"))
    job.run(clock.now_ns())
    assert outcomes == [False, True]  # the refusal did not stop the round
    assert len(stripe_invoices(api, good)) == 1
    for _ in range(2):
        clock.advance(8)
        job.run(clock.now_ns())
    (item,) = store.outbox_claim("stripe", clock.now_ns() + 3600 * NS, 10)
    assert item.event_id == "invoice/inv_refused/finalized"
    assert item.attempts == 3
    assert "InvalidRequestError HTTP 404" in (item.last_error or "")
    job.close()
    store.close()


def test_stripe_unreachable_stops_the_round_and_is_retried_with_backoff(
    tmp_path: Path, localstripe: LocalStripe, api: stripe.StripeClient
) -> None:
    store = open_store(tmp_path)
    cus = new_customer(api)
    http = FaultyHttp()
    http.down = True
    clock = FixedClock(T0)
    job = DeliveryJob(store, sink(store, localstripe, {"acme": cus}, http), clock, 1.0, 4.0)
    queue(store, "invoice.finalized", finalized_doc("inv_down1"))
    queue(store, "invoice.finalized", finalized_doc("inv_down2"))
    delays = []
    for _ in range(4):
        delays.append(job.run(clock.now_ns()))
        clock.advance(delays[-1])
    assert delays == [1.0, 2.0, 4.0, 4.0]
    first, second = store.outbox_claim("stripe", clock.now_ns() + 3600 * NS, 10)
    assert (first.attempts, second.attempts) == (4, 0)  # the round stopped at the first
    assert "APIConnectionError" in (first.last_error or "")
    http.down = False
    job.run(clock.now_ns())
    assert store.outbox_claim("stripe", clock.now_ns() + 3600 * NS, 10) == []
    assert len(stripe_invoices(api, cus)) == 2
    job.close()
    store.close()


# --- end to end: a gateway process killed in the middle of a sync -----------------------------


def month_start(now: datetime) -> str:
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


def test_the_gateway_syncs_an_invoice_once_across_a_kill_mid_sync_and_voids_it(
    tmp_path: Path, localstripe: LocalStripe, api: stripe.StripeClient
) -> None:
    cus = new_customer(api, "Dumm AI Corp")
    config = copy.deepcopy(BASE_CONFIG)
    config["offerings"].append(
        {
            "id": "metered",
            "name": "Metered",
            "currency": "EUR",
            "charges": [
                {"dimension": "data-processed", "model": "per_unit"},
                {"dimension": "compute-time", "model": "per_unit"},
            ],
        }
    )
    for c in config["customers"]:
        c["offering"] = "metered"
    config["customers"][0]["stripe_account_id"] = cus  # dumm-ai; acme has none
    config["exporters"] = {
        "stripe": {
            "api_key_env": "STRIPE_TEST_KEY",
            "api_base": localstripe.url,
            "timeout": "5s",
            "backoff_initial": "50ms",
            "backoff_max": "200ms",
        }
    }
    gw = GatewayProcess(tmp_path, config, env={"STRIPE_TEST_KEY": API_KEY})
    now = datetime.now(UTC)
    period = {"from": month_start(now), "to": month_start(now + timedelta(days=32))}

    def pending() -> float | None:
        return metric(gw, "meter_gateway_exporter_outbox_events", exporter="stripe")

    gw.start()
    try:
        with gw.client(INGEST_KEY) as c:
            ts = (now - timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            records = [
                {"id": f"s{i}", "timestamp": ts, "customerId": cid, "dimensionId": dim,
                 "recordValue": value}
                for i, (cid, dim, value) in enumerate([
                    ("dumm-ai", "data-processed", "12.5"),
                    ("dumm-ai", "compute-time", "47"),
                    ("acme", "data-processed", "3"),
                ])
            ]  # fmt: skip
            r = c.post("/v1/usage", json=records)
            assert r.json()["accepted"] == 3, r.text
        with gw.client() as c:
            top = c.post("/v1/customers/dumm-ai/wallet/top-ups", json={"amount": "0.50"})
            assert top.status_code == 201, top.text
            ours = c.post("/v1/customers/dumm-ai/invoices", json=period).json()
            # Stripe takes the invoice and the first item, then the gateway dies.
            localstripe.hold("/v1/invoiceitems", after=1)
            r = c.post(f"/v1/invoices/{ours['id']}/finalize")
            assert r.status_code == 200, r.text
            ours = r.json()
        wait_for("the first item made in Stripe", lambda: localstripe.held() >= 1)
        gw.kill()
        (half,) = stripe_invoices(api, cus)
        assert (half.status, len(stripe_lines(api, half.id))) == ("draft", 1)
        localstripe.release()

        gw.start()
        wait_for("the sync to finish", lambda: pending() == 0)
        (inv,) = stripe_invoices(api, cus)
        assert inv.id == half.id
        assert inv.status == "open"
        assert metadata(inv) == {
            "meter_gateway_invoice_id": ours["id"],
            "number": ours["number"],
        }
        lines = ours["lines"]
        assert [ln["amount"] for ln in lines] == ["1.00", "0.10"]  # 12.5 × 0.08, 1 h × 0.096
        assert ours["creditsApplied"] == "0.50"
        assert stripe_lines(api, inv.id) == [
            ("0", 100, "eur", "Data Processed: 12.5 gigabyte"),
            ("1", 10, "eur", "Compute Time: 1 minute"),
            ("credits", -50, "eur", "Prepaid credits applied"),
        ]
        assert inv.total == 60  # amountDue 0.60

        # acme has no Stripe customer: skipped, counted, not retried
        with gw.client() as c:
            other = c.post("/v1/customers/acme/invoices", json=period).json()
            assert c.post(f"/v1/invoices/{other['id']}/finalize").status_code == 200
        skipped = {"exporter": "stripe", "outcome": "skipped"}
        wait_for("acme's invoice skipped", lambda: metric(gw, DELIVERIES, **skipped) == 1)
        assert pending() == 0

        with gw.client() as c:
            assert c.post(f"/v1/invoices/{ours['id']}/void").status_code == 200
        wait_for(
            "the Stripe invoice voided",
            lambda: api.v1.invoices.retrieve(inv.id).status == "void",
        )
        wait_for("the outbox drained", lambda: pending() == 0)
        assert len(stripe_invoices(api, cus)) == 1
    finally:
        localstripe.release()
        code = gw.stop()
    assert code == 0, gw.log()
