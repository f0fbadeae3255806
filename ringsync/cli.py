"""The `ringsync` command: run a node, run the demo, show cluster status."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from ringsync import __version__
from ringsync.daemons.base import DaemonType
from ringsync.errors import ConfigError, RestartBudgetExhausted
from ringsync.profiles import load_profile, parse_daemon_types, profile_for_host, profile_names
from ringsync.settings import Settings, load_client_settings, load_settings

log = logging.getLogger("ringsync")

EXIT_CONFIG = 2
EXIT_RESTARTS_EXHAUSTED = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringsync", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ringsync {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run this node's daemons (configured by RINGRIFT_* variables)")
    add_run_options(run)
    demo = sub.add_parser("demo", help="a local cluster on loopback with a simulated selfplay node")
    demo.add_argument("--duration", type=float, default=None, help="stop after SECONDS (default: Ctrl-C)")
    demo.add_argument("--rate", type=float, default=50.0, help="games per second the generator writes")
    demo.add_argument("--dir", default=None, help="keep the cluster's files here (default: a temp dir)")
    status = sub.add_parser(
        "status", help="a readable view of the cluster, from any machine with the inventory",
        description="Ask every host of RINGRIFT_CLUSTER_CONFIG for its /v1/status (this machine "
        "need not be one of them); without an inventory, ask the node running here.")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--local", action="store_true", help="ask only the node running here")
    status.add_argument("--all", action="store_true",
                        help="ask every host in the inventory (the default with an inventory)")
    status.add_argument("--token-file", metavar="PATH",
                        help="read the cluster token from PATH (default: RINGRIFT_CLUSTER_AUTH_TOKEN"
                        "(_FILE))")
    return parser


def add_run_options(run: argparse.ArgumentParser) -> None:
    run.add_argument("--profile", choices=profile_names(), help="node profile (default: from role)")
    run.add_argument("--daemon", action="append", default=[], metavar="TYPE",
                     help=f"run this daemon type (repeatable): {', '.join(t.value for t in DaemonType)}")
    run.add_argument("--sync-only", action="store_true", help="run only the sync daemons")


def configure_logging(level: str) -> None:
    under_journal = "JOURNAL_STREAM" in os.environ
    fmt = "%(levelname)s %(name)s: %(message)s" if under_journal else (
        "%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)


def _run_loop(settings: Settings, coro: Coroutine[Any, Any, None]) -> None:
    if settings.use_uvloop:
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


def resolve_daemons(args: argparse.Namespace, settings: Settings) -> tuple[DaemonType, ...]:
    """--daemon beats --sync-only beats --profile beats the role in the inventory."""
    if args.daemon:
        return parse_daemon_types(args.daemon)
    if args.sync_only:
        return load_profile("sync-only").daemons
    name = args.profile
    if name is None:
        host = settings.inventory.hosts.get(settings.node_id)
        coordinator = settings.coordinator_node == settings.node_id or bool(host and host.is_coordinator)
        name = profile_for_host(host, is_coordinator=coordinator)
    log.info("profile %s", name)
    return load_profile(name).daemons


def cmd_run(args: argparse.Namespace) -> int:
    from ringsync.runner import run_node

    settings = load_settings()
    configure_logging(settings.log_level)
    types = resolve_daemons(args, settings)
    try:
        _run_loop(settings, run_node(settings, types))
    except RestartBudgetExhausted as exc:
        log.critical("%s", exc)
        return EXIT_RESTARTS_EXHAUSTED
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ringsync.demo import run_demo

    configure_logging("WARNING")
    return run_demo(duration=args.duration, rate=args.rate, keep_dir=args.dir)


def cmd_status(args: argparse.Namespace) -> int:
    from ringsync.status_view import show_status

    configure_logging("WARNING")
    settings = load_client_settings(token_file=args.token_file)
    everyone = args.all or (settings.inventory.source is not None and not args.local)
    return asyncio.run(show_status(settings, as_json=args.json, everyone=everyone))


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "demo": cmd_demo,
    "status": cmd_status,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"ringsync: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
