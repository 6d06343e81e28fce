"""The ``meter-gateway`` command: serve, check-config, dashboards, invoice."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from meter_gateway import __version__
from meter_gateway.billing import command as invoice_command
from meter_gateway.config import ConfigError, load_config
from meter_gateway.dashboards import command as dashboards_command


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meter-gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=f"meter-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the gateway")
    p_serve.add_argument("--config", help="YAML config file (defaults apply without one)")
    p_serve.add_argument("--log-level", default="info")
    p_check = sub.add_parser("check-config", help="validate a config file and print every error")
    p_check.add_argument("--config", required=True)
    dashboards_command.add_subcommand(sub)
    invoice_command.add_subcommand(sub)
    args = parser.parse_args(argv)
    if args.command == "dashboards":
        return dashboards_command.run(args)
    if args.command == "invoice":
        return invoice_command.run(args)

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"{args.config}: {line}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(
            f"{args.config}: OK ({len(config.dimensions)} dimensions, "
            f"{len(config.offerings)} offerings, {len(config.customers)} customers)"
        )
        return 0
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from meter_gateway.server import serve

    try:
        return serve(config)
    except OSError as exc:  # a listener could not bind, the store could not open
        logging.getLogger("meter_gateway").error("cannot start: %s", exc)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
