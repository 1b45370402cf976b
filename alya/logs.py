"""Structured JSON-line logs. Every batch and row status change goes through :func:`status_change` so
that app, op, batch and row are always present and named the same way."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_configured = False


def configure(level: str | None = None) -> None:
    global _configured
    if _configured:
        return
    lvl = getattr(logging, (level or os.environ.get("ALYA_LOG_LEVEL", "INFO")).upper(), logging.INFO)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    _configured = True


class _CurrentStderr:
    """Writes to whatever sys.stderr is now (test runners and CLIs swap it), not the one at import."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def get_logger() -> Any:
    configure()
    return structlog.get_logger("alya")


def status_change(
    app: str, op: str, batch: str, new: str, old: str | None = None, **fields: Any
) -> None:
    get_logger().info("status_change", app=app, op=op, batch=batch, old=old, new=new, **fields)
