"""Structured logging: one JSON object per line on stderr, one event per line.

A service that seems stuck tells where: ``kill -USR1 <pid>`` writes the stack of
each of its threads to stderr (its log), and it carries on.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
import time
from typing import Any

import orjson

from f2pipe.errors import ConfigError
from f2pipe.settings import LOG_LEVELS, get_settings

_RESERVED = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record as ``{"ts", "level", "service", "logger", "msg", **extra}``."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                event[key] = value
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(event, default=str).decode()


def add_log_level_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--log-level`` option every service takes (checked by :func:`setup_logging`)."""
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        help="debug, info, warning, error or critical (default: F2PIPE_LOG_LEVEL, else info)",
    )


def parse_log_level(value: str) -> str:
    """``value`` as a logging level name; ConfigError (one line) for anything else."""
    level = value.strip().upper()
    if level not in LOG_LEVELS:
        choices = ", ".join(name.lower() for name in LOG_LEVELS)
        raise ConfigError(f"--log-level {value!r} is invalid: expected one of {choices}")
    return level


def setup_logging(service: str, level: str | None = None) -> None:
    """Route the root logger to stderr as JSON lines tagged with ``service``.

    ``level`` is a ``--log-level`` value; None takes ``F2PIPE_LOG_LEVEL``.
    Raises ConfigError for a bad level, before anything is logged.
    """
    name = parse_log_level(level) if level is not None else get_settings().log_level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(name)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
