"""The command line: `edge-agent run --config FILE`, `edge-agent check-config FILE`, and
`edge-agent model ...` (agent/modelcli.py).

Exit codes: 0 done, 1 failed at run time, 2 usage, 78 (EX_CONFIG) bad configuration, which the
systemd unit tells systemd not to restart.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import structlog

from agent import config, logs, modelcli
from agent.errors import EXIT_CONFIG, AgentError, ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the agent until SIGTERM")
    run.add_argument("--config", type=Path, required=True, help="the TOML configuration file")
    check = commands.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("config", type=Path)
    modelcli.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "model":
        return modelcli.run(args)
    try:
        settings = config.load(args.config)
    except ConfigError as exc:
        print(f"edge-agent: bad configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        routes, device = len(settings.routes), settings.agent.device_id
        print(f"{args.config}: ok ({routes} routes, device {device})")
        return 0
    logs.configure(settings.agent.log_level)
    from agent import app  # imported late: the config check needs none of the runtime

    try:
        asyncio.run(app.run(settings))
    except AgentError as exc:
        structlog.get_logger().error("agent_failed", error=str(exc),
                                     error_type=type(exc).__name__)
        return 1
    return 0
