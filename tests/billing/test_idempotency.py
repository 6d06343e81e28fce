"""Idempotency-Key on creating POSTs (SPEC 11) over real HTTP against an in-process gateway on
the store of METER_TEST_STORE: the same key and body answer the first answer again (status and
body), another body answers 409, concurrent requests with one key create one thing, errors are
not recorded, a reservation whose request died is taken over without a duplicate, and answers
are kept at least 24 hours."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from meter_gateway.api.idempotency import HEADER
from meter_gateway.clock import FixedClock
from meter_gateway.service import Gateway
from tests.billing.appserver import serve
from tests.gatewayproc import BASE_CONFIG
from tests.helpers import ts

MAY = {"from": "2026-05-01T00:00:00Z", "to": "2026-06-01T00:00:00Z"}
CONFIG: dict[str, Any] = {
    "auth": BASE_CONFIG["auth"],
    "dimensions": [{"id": "data", "name": "Data", "unit": "gigabyte", "price": "0.1"}],
    "offerings": [
        {"id": "plan", "name": "Plan", "currency": "USD",
         "charges": [{"dimension": "data", "model": "per_unit"}]},
    ],
    "customers": [{"id": "acme", "name": "Acme", "offering": "plan"},
                  {"id": "zeta", "name": "Zeta", "offering": "plan"}],
}  # fmt: skip


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(ts("2026-05-20T12:00:00"))


@pytest.fixture
def gateway(tmp_path: Path, clock: FixedClock) -> Iterator[tuple[Gateway, httpx.Client]]:
    with serve(tmp_path, CONFIG, clock) as (gw, client):
        yield gw, client


def key(k: str) -> dict[str, str]:
    return {HEADER: k}


def test_the_same_key_and_body_answer_the_first_answer_again(
    gateway: tuple[Gateway, httpx.Client], clock: FixedClock
) -> None:
    gw, client = gateway
    first = client.post("/v1/customers/acme/invoices", json=MAY, headers=key("k-1"))
    assert first.status_code == 201, first.text
    clock.advance(30)  # a fresh draft would carry another createdAt and asOf
    # the same JSON value, written otherwise, is the same body
    again = client.post(
        "/v1/customers/acme/invoices",
        content=b'{ "to": "2026-06-01T00:00:00Z",  "from": "2026-05-01T00:00:00Z" }',
        headers={**key("k-1"), "Content-Type": "application/json"},
    )
    assert (again.status_code, again.content) == (201, first.content)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["content-type"] == first.headers["content-type"]
    assert [r.id for r in gw.store.invoice_list(None, None, 10)] == [first.json()["id"]]
    # another key, or no key, creates another draft
    other = client.post("/v1/customers/acme/invoices", json=MAY, headers=key("k-2"))
    assert other.status_code == 201
    assert other.json()["id"] != first.json()["id"]
    assert client.post("/v1/customers/acme/invoices", json=MAY).status_code == 201
    assert len(gw.store.invoice_list(None, None, 10)) == 3


def test_the_same_key_with_another_body_answers_409(
    gateway: tuple[Gateway, httpx.Client],
) -> None:
    gw, client = gateway
    assert client.post("/v1/customers/acme/invoices", json=MAY, headers=key("k")).status_code == 201
    june = {"from": "2026-06-01T00:00:00Z", "to": "2026-07-01T00:00:00Z"}
    r = client.post("/v1/customers/acme/invoices", json=june, headers=key("k"))
    assert r.status_code == 409
    assert (r.json()["parameter"], "another body" in r.json()["error"]) == (HEADER, True)
    assert len(gw.store.invoice_list(None, None, 10)) == 1
    # keys are scoped per path: the same key on another customer's path is another request
    assert (
        client.post("/v1/customers/zeta/invoices", json=june, headers=key("k")).status_code == 201
    )


def test_top_ups_with_a_key_are_applied_once(gateway: tuple[Gateway, httpx.Client]) -> None:
    _, client = gateway
    path = "/v1/customers/acme/wallet/top-ups"
    first = client.post(path, json={"amount": "10"}, headers=key("po-42"))
    again = client.post(path, json={"amount": "10"}, headers=key("po-42"))
    assert (first.status_code, again.status_code, again.content) == (201, 201, first.content)
    other = client.post(path, json={"amount": "11"}, headers=key("po-42"))
    assert other.status_code == 409
    wallet = client.get("/v1/customers/acme/wallet").json()
    assert wallet["balances"] == [{"currency": "USD", "balance": "10.00"}]
    assert len(wallet["entries"]) == 1


def test_errors_are_not_recorded_so_a_corrected_retry_may_reuse_the_key(
    gateway: tuple[Gateway, httpx.Client],
) -> None:
    _, client = gateway
    path = "/v1/customers/acme/wallet/top-ups"
    bad = client.post(path, json={"amount": "0.001"}, headers=key("k"))
    assert bad.status_code == 422
    assert client.post(path, json={"amount": "1"}, headers=key("k")).status_code == 201
    for k in (b"", b"x" * 256, "naïve".encode(), b"a b"):
        r = client.post(path, json={"amount": "1"}, headers={HEADER.encode(): k})
        assert (r.status_code, r.json()["parameter"]) == (400, HEADER), k


def test_concurrent_requests_with_one_key_create_one_draft(
    gateway: tuple[Gateway, httpx.Client],
) -> None:
    gw, client = gateway
    base = str(client.base_url)
    barrier = threading.Barrier(8)
    answers: list[httpx.Response] = []

    def send() -> None:
        with httpx.Client(base_url=base, headers=dict(client.headers)) as c:
            barrier.wait()
            answers.append(c.post("/v1/customers/acme/invoices", json=MAY, headers=key("race")))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (invoice,) = gw.store.invoice_list(None, None, 10)
    for r in answers:
        # the first answer, replayed; or "still in progress" while the first one ran
        assert r.status_code in (201, 409), r.text
        if r.status_code == 201:
            assert r.json()["id"] == invoice.id
        else:
            assert r.headers["Retry-After"] == "1"
    assert any(r.status_code == 201 for r in answers)


def test_a_reservation_whose_request_died_is_taken_over_without_a_duplicate(
    gateway: tuple[Gateway, httpx.Client], clock: FixedClock
) -> None:
    """A process that committed the draft but died before recording the answer leaves only the
    reservation: a retry answers 409 (in progress) until the reservation is abandoned, then
    finds the draft the key named instead of creating another."""
    gw, client = gateway
    path = "/v1/customers/acme/invoices"
    first = client.post(path, json=MAY, headers=key("crash"))
    assert first.status_code == 201
    # forget the answer, keep a reservation: what a crash between commit and record leaves
    gw.store.idempotency_purge(2**62)
    now = clock.now_ns()
    assert gw.store.idempotency_begin(path, "crash", "fp", now, now) is None
    r = client.post(path, json=MAY, headers=key("crash"))
    assert r.status_code == 409
    clock.advance(61)
    retry = client.post(path, json=MAY, headers=key("crash"))
    assert retry.status_code == 201
    assert retry.json()["id"] == first.json()["id"]
    assert len(gw.store.invoice_list(None, None, 10)) == 1


def test_answers_are_kept_a_day(gateway: tuple[Gateway, httpx.Client], clock: FixedClock) -> None:
    gw, client = gateway
    path = "/v1/customers/acme/wallet/top-ups"
    first = client.post(path, json={"amount": "1"}, headers=key("daily"))
    clock.advance(23 * 3600)
    assert client.post(path, json={"amount": "1"}, headers=key("daily")).content == first.content
    clock.advance(2 * 3600)
    gw.store.idempotency_purge(clock.now_ns() - 24 * 3600 * 10**9)
    # past the day the key is forgotten; the top-up it made is still that top-up (its id came
    # from the key), so nothing is added twice
    late = client.post(path, json={"amount": "1"}, headers=key("daily"))
    assert late.status_code == 200
    assert late.json()["id"] == first.json()["id"]
    assert client.get("/v1/customers/acme/wallet").json()["balances"][0]["balance"] == "1.00"


def test_catalog_entries_created_with_a_key_answer_the_first_answer_again(
    gateway: tuple[Gateway, httpx.Client],
) -> None:
    _, client = gateway
    body = {"id": "new-co", "name": "New Co", "offering": "plan"}
    first = client.post("/v1/customers", json=body, headers=key("c-1"))
    again = client.post("/v1/customers", json=body, headers=key("c-1"))
    assert (first.status_code, again.status_code, again.content) == (201, 201, first.content)
    # without the key the same body is a second creation of an existing id
    assert client.post("/v1/customers", json=body).status_code == 409
    other = client.post("/v1/customers", json={**body, "name": "Other"}, headers=key("c-1"))
    assert other.status_code == 409
    assert client.get("/v1/customers/new-co").json()["name"] == "New Co"
