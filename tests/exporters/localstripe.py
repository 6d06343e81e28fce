"""A real localstripe server (PyPI ``localstripe``, a stateful fake Stripe) on a free loopback
port, for the Stripe exporter's tests.

localstripe 1.15.10 knows invoices only as the next invoice of a subscription. Run as
``python -m tests.exporters.localstripe --port N``, this module starts localstripe's own server
with the few pieces of Stripe's API that one-off invoices need and it lacks, written against
Stripe's API reference:

- ``POST /v1/invoices`` for a customer without a subscription creates an empty draft (Stripe's
  ``pending_invoice_items_behavior=exclude``), taking ``auto_advance``, ``collection_method``,
  ``days_until_due`` and ``currency``;
- ``POST /v1/invoiceitems`` with ``invoice=in_...`` adds a line to that draft (refused unless it
  is a draft);
- ``POST /v1/invoices/{id}/finalize`` turns a draft ``open`` (``paid`` when nothing is due);
- ``POST /v1/invoices/{id}/void`` works on an invoice without a payment attempt (localstripe
  cancelled a PaymentIntent that one-off invoices do not have).

Everything else is localstripe's: its objects, validation, errors and lists. It does NOT honour
``Idempotency-Key`` (nor is it made to here), so the exporter's own look-ups are what keep a
retried sync from creating anything twice. The store is not pickled to ``/tmp`` (localstripe
does so after every write, one file for every instance on the machine).

Test controls, under ``/_config/`` (no API key): ``GET /_config/test/requests`` counts answered
requests by ``"METHOD /path"``; ``POST /_config/test/hold`` ``{"path", "after"}`` holds the
answer of every POST to ``path`` once ``after`` of them were processed (the change is made, the
client never hears of it) until ``POST /_config/test/release``.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from tests.gatewayproc import free_port

REPO = Path(__file__).resolve().parents[2]


class LocalStripe:
    """``start()`` runs the server and returns once it answers; ``url`` is its API base."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "localstripe.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> LocalStripe:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.exporters.localstripe", "--port", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"localstripe exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/_config/test/requests", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"localstripe did not answer:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def requests(self) -> Counter[str]:
        return Counter(httpx.get(f"{self.url}/_config/test/requests", timeout=10).json())

    def hold(self, path: str, after: int) -> None:
        r = httpx.post(
            f"{self.url}/_config/test/hold", json={"path": path, "after": after}, timeout=10
        )
        r.raise_for_status()

    def held(self) -> int:
        """Answers being held back right now."""
        return int(httpx.get(f"{self.url}/_config/test/held", timeout=10).json())

    def release(self) -> None:
        httpx.post(f"{self.url}/_config/test/release", timeout=10).raise_for_status()


# --- the server process ---------------------------------------------------------------------


def _serve() -> None:  # pragma: no cover - runs in the child process
    from aiohttp import web
    from localstripe import resources, server  # type: ignore[import-untyped]
    from localstripe.errors import UserError  # type: ignore[import-untyped]

    resources.Store.dump_to_disk = lambda self: None
    invoice_cls, item_cls = resources.Invoice, resources.InvoiceItem
    original_create = invoice_cls._api_create.__func__

    def create_invoice(cls: Any, /, **data: Any) -> Any:
        if data.get("subscription") is not None:
            return original_create(cls, **data)
        extra = {
            k: data.pop(k)
            for k in ("auto_advance", "collection_method", "days_until_due", "currency")
            if k in data
        }
        data.pop("pending_invoice_items_behavior", None)
        # The draft starts empty: park the customer's pending items while it is built.
        try:
            pending = item_cls._api_list_all(None, customer=data.get("customer"), limit=99)._list
        except UserError:
            pending = []  # a bad customer: the invoice itself says so
        for ii in pending:
            ii.invoice = "in_parked"
        try:
            inv = invoice_cls(**data)
        finally:
            for ii in pending:
                ii.invoice = None
        if "currency" in extra:
            inv.currency = str(extra["currency"]).lower()
        inv.collection_method = extra.get("collection_method", "charge_automatically")
        inv.auto_advance = str(extra.get("auto_advance", "true")).lower() == "true"
        return inv

    original_item = item_cls._api_create.__func__

    def create_item(cls: Any, /, **data: Any) -> Any:
        target = data.get("invoice")
        inv = invoice_cls._api_retrieve(target) if isinstance(target, str) else None
        if inv is not None and inv.status != "draft":
            raise UserError(400, f"Invoice {target} is not a draft: items cannot be added")
        item = original_item(cls, **data)
        if inv is not None:
            inv.lines._list.append(resources.InvoiceLineItem(item))
        return item

    def finalize(id: str, auto_advance: Any = None, **_: Any) -> Any:
        inv = invoice_cls._api_retrieve(id)
        if inv.status != "draft":
            raise UserError(400, f"Invoice {id} is already finalized")
        inv._finalize()
        if auto_advance is not None:
            inv.auto_advance = str(auto_advance).lower() == "true"
        return inv

    original_cancel = resources.PaymentIntent._api_cancel.__func__

    def cancel_payment(cls: Any, /, id: str | None, **data: Any) -> Any:
        # void_invoice cancels the invoice's payment; a one-off invoice may have none yet.
        return None if id is None else original_cancel(cls, id, **data)

    invoice_cls._api_create = classmethod(create_invoice)
    item_cls._api_create = classmethod(create_item)
    resources.PaymentIntent._api_cancel = classmethod(cancel_payment)

    counts: Counter[str] = Counter()
    holds: dict[str, int] = {}
    released = asyncio.Event()
    held = [0]

    @web.middleware
    async def count_and_hold(request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        if request.path.startswith("/_config/"):
            return response
        key = f"{request.method} {request.path}"
        counts[key] += 1
        after = holds.get(request.path)
        if request.method == "POST" and after is not None and counts[key] >= after:
            held[0] += 1
            try:
                await released.wait()
            finally:
                held[0] -= 1
        return response

    async def get_counts(_: web.Request) -> web.Response:
        return web.json_response(dict(counts))

    async def get_held(_: web.Request) -> web.Response:
        return web.json_response(held[0])

    async def hold(request: web.Request) -> web.Response:
        body = await request.json()
        released.clear()
        holds[str(body["path"])] = int(body["after"])
        return web.json_response({})

    async def release(_: web.Request) -> web.Response:
        holds.clear()
        released.set()
        return web.json_response({})

    app = server.app
    app.middlewares.append(count_and_hold)
    app.router.add_post("/v1/invoices/{id}/finalize", server.api_extra(finalize, ""))
    app.router.add_get("/_config/test/requests", get_counts)
    app.router.add_get("/_config/test/held", get_held)
    app.router.add_post("/_config/test/hold", hold)
    app.router.add_post("/_config/test/release", release)

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    _serve()
