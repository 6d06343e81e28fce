"""The meter-gateway command: serve, check-config, dashboards, invoice, import.

Exit codes: 0 done, 1 the gateway could not start (one line on stderr says why), 2 the config is
invalid (one line per error, each with its path).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from meter_gateway import __version__, importer
from meter_gateway.billing import command as invoice_command
from meter_gateway.config import OVERRIDES, Config, ConfigError, load_config
from meter_gateway.dashboards import command as dashboards_command

EXIT_STARTUP = 1
EXIT_CONFIG = 2

_DESCRIPTION = "Usage-metering gateway: ingest, deduplicate, price and invoice usage."


def _precedence_help() -> str:
    width = max(len(o.option) for o in OVERRIDES)
    rows = "\n".join(f"  {o.option:<{width}}  {o.env:<31}  {o.path} ({o.help})" for o in OVERRIDES)
    return (
        "settings a container can give without a config file, highest first: the argument,\n"
        "then the environment variable, then the config file, then the default.\n\n"
        f"{rows}\n\n"
        "exit codes: 0 stopped cleanly, 1 could not start (one line on stderr says why),\n"
        "2 invalid config (one line per error, with its path)."
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meter-gateway", description=_DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"meter-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway until SIGTERM or SIGINT, then drain and commit.",
        epilog=_precedence_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p_serve.add_argument(
        "--config", metavar="FILE", help="YAML config file (defaults apply without one)"
    )
    for o in OVERRIDES:
        p_serve.add_argument(
            o.option, metavar=o.metavar, help=f"{o.help} (over {o.env} and {o.path})"
        )
    p_serve.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error", "critical"],
        help="default: info",
    )
    p_check = sub.add_parser(
        "check-config",
        help="validate a config file and print every error",
        description="Validate a config file as serve would read it (environment variables "
        "included) and print every error, one line each with its path.",
    )
    p_check.add_argument("--config", metavar="FILE", required=True)
    dashboards_command.add_subcommand(sub)
    invoice_command.add_subcommand(sub)
    importer.add_subcommand(sub)
    return parser


def _dest(option: str) -> str:
    return option.removeprefix("--").replace("-", "_")


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    args = _parser().parse_args(argv)
    if args.command == "dashboards":
        return dashboards_command.run(args)
    if args.command == "invoice":
        return invoice_command.run(args)
    if args.command == "import":
        return importer.run(args)

    arguments = {}
    if args.command == "serve":
        arguments = {o.path: getattr(args, _dest(o.option)) for o in OVERRIDES}
    source = args.config or "<defaults>"
    try:
        config = load_config(args.config, env, arguments)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"{source}: {line}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        print(
            f"{source}: OK ({len(config.dimensions)} dimensions, "
            f"{len(config.offerings)} offerings, {len(config.customers)} customers)"
        )
        return 0
    return _serve(config, args.log_level)


def _serve(config: Config, log_level: str) -> int:
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from meter_gateway.server import StartupError, serve

    try:
        return serve(config)
    except StartupError as exc:
        print(f"meter-gateway: cannot start: {exc}", file=sys.stderr)
        return EXIT_STARTUP


if __name__ == "__main__":
    raise SystemExit(main())
