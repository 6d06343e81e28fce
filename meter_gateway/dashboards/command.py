"""``meter-gateway dashboards push|export``: the CLI side of the dashboards package."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

TOKEN_ENV = "GRAFANA_TOKEN"


def add_subcommand(sub: Any) -> None:
    """Register ``dashboards`` on the top-level parser's subparsers."""
    p = sub.add_parser("dashboards", help="push the Grafana dashboards, or export their JSON")
    actions = p.add_subparsers(dest="dashboards_command", required=True)
    push = actions.add_parser(
        "push", help="create or update the dashboards in a running Grafana (HTTP API)"
    )
    push.add_argument("--url", required=True, help="Grafana base URL, e.g. https://grafana:3000")
    push.add_argument(
        "--token-env",
        default=TOKEN_ENV,
        help=f"environment variable holding a service-account token (default {TOKEN_ENV}); "
        "without it, user:password in --url is used",
    )
    push.add_argument("--folder-uid", default="meter-gateway")
    push.add_argument("--folder-title", default="Meter gateway")
    push.add_argument(
        "--datasource-url",
        help="also create or update the Prometheus data source with this URL and open the "
        "dashboards on it",
    )
    push.add_argument(
        "--scrape-interval", default="15s", help="Prometheus scrape interval of the gateway"
    )
    export = actions.add_parser("export", help="write the dashboard JSON files into a directory")
    export.add_argument("--out", required=True, type=Path)


def run(args: argparse.Namespace) -> int:
    if args.dashboards_command == "export":
        from meter_gateway.dashboards import export

        for path in export(args.out):
            print(path)
        return 0

    from grafana_client.client import GrafanaException

    from meter_gateway.dashboards.push import push

    token = os.environ.get(args.token_env) or None
    try:
        pushed = push(
            args.url,
            token,
            folder_uid=args.folder_uid,
            folder_title=args.folder_title,
            datasource_url=args.datasource_url,
            scrape_interval=args.scrape_interval,
        )
    except GrafanaException as exc:
        print(f"{args.url}: Grafana answered {exc.status_code}: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:  # connection refused, DNS, TLS
        print(f"{args.url}: {exc}", file=sys.stderr)
        return 1
    for d in pushed:
        print(f"{d.uid}\tversion {d.version}\t{d.title}\t{d.url}")
    return 0
