"""The command line: `edge-agent run --config FILE`, `edge-agent check-config FILE`, the
operator's read-only views `edge-agent status` and `edge-agent queue` (agent/cli/status.py;
`edge-agent queue export`, a route's stored results as labels: agent/cli/export.py), and
`edge-agent model ...` (agent/models.py).

Exit codes: 0 done, 1 failed at run time, 2 usage, 78 (EX_CONFIG) bad configuration, which the
systemd unit tells systemd not to restart.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import structlog

from agent.base.errors import EXIT_CONFIG, AgentError, ConfigError, StoreUnreadable
from agent.cli import models, preflight
from agent.config.settings import load
from agent.service import logs

DEFAULT_CONFIG = Path("/etc/edge-agent/agent.toml")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the agent until SIGTERM")
    run.add_argument("--config", type=Path, required=True, help="the TOML configuration file")
    check = commands.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("config", type=Path)
    status = commands.add_parser("status", help="summary of a running agent (read-only)")
    status.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help=f"the agent's configuration (default {DEFAULT_CONFIG})")
    status.add_argument("--url", help="the agent's /metrics URL (default: from the config)")
    queue = commands.add_parser("queue", help="depths, oldest rows, dead letters (read-only)")
    queue.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                       help=f"the agent's configuration (default {DEFAULT_CONFIG})")
    queue.add_argument("--limit", type=int, default=10, help="rows shown per list")
    queue_commands = queue.add_subparsers(dest="queue_command")
    export = queue_commands.add_parser(
        "export", help="a route's stored readings and results as a labels file (JSONL) for "
        "`model specialize --labels`")
    # SUPPRESS: `queue --config X export` keeps X rather than the subcommand's default.
    export.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                        help=f"the agent's configuration (default {DEFAULT_CONFIG})")
    export.add_argument("--route", required=True, help="the route whose results to export")
    export.add_argument("--since", default=None, help="only results made since this ISO-8601 "
                        "time (UTC unless it says) or this long ago (90s, 30m, 24h, 7d)")
    export.add_argument("--out", default="-", help="the file to write (default -: stdout)")
    models.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "model":
        return models.run(args)
    try:
        settings = load(args.config)
        if args.command in ("run", "check-config"):
            # The same checks in both: check-config passes exactly what run starts with, and
            # run's own refusal is the main process's exit 78, which the unit does not restart.
            preflight.check(settings)
    except ConfigError as exc:
        print(f"edge-agent: bad configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        for line in preflight.advice(settings):
            print(f"edge-agent: warning: {line}", file=sys.stderr)
        routes, device = len(settings.routes), settings.agent.device_id
        print(f"{args.config}: ok ({routes} routes, device {device})")
        return 0
    if args.command in ("status", "queue"):
        from agent.cli.status import metrics_url, print_queue, print_status

        if args.command == "status":
            url = args.url or metrics_url(settings)
            return print_status(url, settings.store_path, sys.stdout)
        try:
            if getattr(args, "queue_command", None) == "export":
                from agent.cli import export

                return export.run(settings, args.config, args.route, args.since, args.out,
                                  sys.stderr)
            return print_queue(settings.store_path, args.limit, sys.stdout)
        except (ValueError, OSError) as exc:
            print(f"edge-agent: {exc}", file=sys.stderr)
            return 1
        except StoreUnreadable as exc:
            print(f"edge-agent: cannot read the store: {exc}", file=sys.stderr)
            return 1
    logs.configure(settings.agent.log_level)
    from agent import app  # imported late: the config check needs none of the runtime

    try:
        asyncio.run(app.run(settings, args.config.resolve()))
    except ConfigError as exc:  # found only at start-up, e.g. a TLS file that cannot be loaded
        print(f"edge-agent: bad configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except AgentError as exc:
        structlog.get_logger().error("agent_failed", error=str(exc),
                                     error_type=type(exc).__name__)
        return 1
    except Exception as exc:  # e.g. an ExceptionGroup out of the app's TaskGroup: a defect
        causes = _leaves(exc)
        structlog.get_logger().critical(
            "agent_failed", error="; ".join(f"{type(c).__name__}: {c}" for c in causes),
            error_type=type(exc).__name__, exc_info=exc)
        return 1
    return 0


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or the exception itself."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]
