"""Structured JSON logs to stdout, for journald: the only module that configures structlog.

Modules call `structlog.get_logger()` at their top and log snake_case events with key/value data.
"""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def configure(level: str = "info") -> None:
    """Send one JSON object per line to stdout, with ISO time and level, at `level` and above."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
    # Libraries that use the standard logging module (paho through aiomqtt) go to stderr, quietly.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
