"""``meter-gateway invoice create|finalize|show|list``: invoices from the command line.

It talks to a running gateway's API rather than opening the store itself: the embedded SQLite
store is locked by the serving process, and on PostgreSQL the API is where finalization draws
the wallet and queues the outbox event in one transaction. So the CLI behaves exactly like any
other client, with its key's scopes (admin to create and finalize, read to show and list).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import httpx

from meter_gateway.config import ConfigError, load_config

KEY_ENV = "METER_GATEWAY_API_KEY"


def add_subcommand(sub: Any) -> None:
    p = sub.add_parser("invoice", help="create, finalize, show and list invoices (via the API)")
    p.add_argument(
        "--url", help="gateway API base URL (default: the config's server.http.listen, else "
        "http://127.0.0.1:8080)",
    )  # fmt: skip
    p.add_argument("--config", help="YAML config file to take the API address from")
    p.add_argument("--api-key-env", default=KEY_ENV, help=f"variable holding the key ({KEY_ENV})")
    action = p.add_subparsers(dest="invoice_command", required=True)
    create = action.add_parser("create", help="create a draft invoice for a period")
    create.add_argument("customer")
    create.add_argument("--from", dest="from_", help="RFC 3339 start (default: this period)")
    create.add_argument("--to", help="RFC 3339 end, exclusive (may be in the future)")
    finalize = action.add_parser("finalize", help="finalize a draft (immutable from then on)")
    finalize.add_argument("invoice_id")
    show = action.add_parser("show", help="print an invoice")
    show.add_argument("invoice_id")
    show.add_argument("--format", choices=("json", "csv", "html"), default="json")
    show.add_argument("--output", "-o", help="write to this file instead of stdout")
    listing = action.add_parser("list", help="list a customer's invoices")
    listing.add_argument("customer")


def base_url(url: str | None, config: str | None) -> str:
    """The gateway a CLI client talks to: ``--url``, else ``--config``'s HTTP listener
    (a wildcard host as loopback), else the default."""
    if url:
        return str(url).rstrip("/")
    if config:
        listen = load_config(config).server.http.listen
        host, _, port = listen.rpartition(":")
        if host in ("0.0.0.0", "::", "[::]"):
            host = "127.0.0.1"
        return f"http://{host}:{port}"
    return "http://127.0.0.1:8080"


def run(args: argparse.Namespace) -> int:
    try:
        base = base_url(args.url, args.config)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"{args.config}: {line}", file=sys.stderr)
        return 2
    key = os.environ.get(args.api_key_env)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    cmd = args.invoice_command
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
            if cmd == "create":
                body = {k: v for k, v in (("from", args.from_), ("to", args.to)) if v}
                r = client.post(f"/v1/customers/{args.customer}/invoices", json=body)
            elif cmd == "finalize":
                r = client.post(f"/v1/invoices/{args.invoice_id}/finalize")
            elif cmd == "show":
                r = client.get(f"/v1/invoices/{args.invoice_id}", params={"format": args.format})
            else:
                r = client.get(f"/v1/customers/{args.customer}/invoices")
    except httpx.HTTPError as exc:
        print(f"meter-gateway invoice: cannot reach {base}: {exc}", file=sys.stderr)
        return 1
    if r.status_code >= 400:
        print(f"meter-gateway invoice: HTTP {r.status_code}: {r.text}", file=sys.stderr)
        return 1
    if cmd == "show" and args.output:
        with open(args.output, "wb") as f:
            f.write(r.content)
    else:
        sys.stdout.buffer.write(r.content if r.content.endswith(b"\n") else r.content + b"\n")
        sys.stdout.flush()
    return 0
