"""structlog setup: console lines on a terminal, JSON lines with log_format = "json"."""

from __future__ import annotations

import io
import logging
import os
import sys
from typing import TextIO, cast

import structlog

from minibatch.streams import to_devnull

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _CurrentStderr(io.TextIOBase):
    """Writes to whatever sys.stderr is now, so a live progress bar can route log lines above it."""

    def write(self, text: str) -> int:
        try:
            return sys.stderr.write(text)
        except BrokenPipeError:  # `run-now j 2>&1 | head`: the reader is gone, the run goes on
            to_devnull(2)
            return len(text)

    def flush(self) -> None:
        try:
            sys.stderr.flush()
        except BrokenPipeError:
            to_devnull(2)


class _ToStructlog(logging.Handler):
    """Libraries' stdlib log records (APScheduler's "maximum number of running instances
    reached", say) as structlog lines, JSON with log_format = "json", not plain text."""

    def emit(self, record: logging.LogRecord) -> None:
        why = {"exc_info": record.exc_info} if record.exc_info else {}  # ("Job ... raised an exception")
        get_logger().log(record.levelno, record.getMessage(), logger=record.name, **why)


def configure_logging(fmt: str = "console", level: str = "info", stream: TextIO | None = None) -> None:
    plain = bool(os.environ.get("NO_COLOR")) or os.environ.get("TERM") == "dumb"  # no-color.org
    colors = (stream or sys.stderr).isatty() and not plain
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=colors)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(stream or cast(TextIO, _CurrentStderr())),
        cache_logger_on_first_use=False,
    )
    logging.root.handlers = [_ToStructlog(level=logging.WARNING)]


def get_logger(**bound: object) -> structlog.typing.FilteringBoundLogger:
    """A logger; without `bound` values it stays lazy, following later configure_logging calls."""
    logger = cast(structlog.typing.FilteringBoundLogger, structlog.get_logger("minibatch"))
    return logger.bind(**bound) if bound else logger
