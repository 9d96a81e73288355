"""structlog set-up: JSON lines for machines, readable console output on a terminal."""

from __future__ import annotations

import logging
import sys

import structlog

from .config import LoggingSettings


def configure(settings: LoggingSettings, **context: object) -> None:
    fmt = settings.format
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer = (
        structlog.dev.ConsoleRenderer()
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    level = getattr(logging, settings.level)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    static = dict(context)

    def add_static(_logger: object, _name: str, event: dict) -> dict:
        for k, v in static.items():
            event.setdefault(k, v)
        return event

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_static,  # process role and pid, in every thread of the process
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if fmt == "json" else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # sys.stderr looked up at each call, not bound once: it may be replaced (tests, daemons).
        logger_factory=lambda *_: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
