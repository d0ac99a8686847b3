"""structlog set-up shared by every role: JSON lines on stderr, one event per line."""

from __future__ import annotations

import logging
import sys
import threading

import structlog


def configure(level: str = "info", json: bool = True) -> None:
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=_StderrLogger,
        cache_logger_on_first_use=False,
    )


_WRITE = threading.Lock()  # one line per event even when threads log at once (print() writes text and "\n" apart)


class _StderrLogger:
    """Writes each event to whatever sys.stderr is *now* (tests and daemons swap it; a bound file may close)."""

    def __init__(self, *args):
        pass

    def msg(self, message: str) -> None:
        try:
            with _WRITE:
                sys.stderr.write(message + "\n")
                sys.stderr.flush()
        except ValueError:  # stderr was closed under us: drop the line rather than fail the caller
            pass

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def get_logger(name: str):
    return structlog.get_logger(name)
