"""Structured logs: structlog on top of the standard library's ``logging``.

- Every batch and row status change goes through :func:`status_change`, so app, op, batch and row are
  always present and named the same way.
- On stderr: JSON lines for machines, or a readable console format on a terminal
  (``ALYA_LOG_FORMAT=json|console|auto``; auto picks console when stderr is a terminal).
- Inside a flow or task run, alya's lines also reach that run's logs in the Prefect UI. This module knows
  no Prefect: the Prefect layer (``alya.prefect.logging``) installs a *run log* with :func:`install_run_log`,
  a handler that forwards lines to the run they belong to and a function that tells which run this thread
  is in. Rows run on alya's own threads, which do not carry Prefect's run context, so the engine binds the
  run ids to the loggers it hands them (:func:`run_logger`).
- Credentials are never logged: URLs only as ``alya.core.redact`` shows them, Redis as host:port/db, and a
  last processor (:func:`redact_urls`) redacts every URL in every value of every line.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog

from alya.core.events import publish
from alya.core.redact import redact_value

LOGGER = "alya"
_configured = False
_lock = threading.Lock()
RunIds = Callable[[], tuple[Any, Any]]


def _no_run() -> tuple[Any, Any]:
    return None, None


_run_handler: logging.Handler | None = None  # forwards lines to a flow/task run's logs (installed)
_run_ids: RunIds = _no_run  # (flow_run_id, task_run_id) of the run this thread is in


def install_run_log(handler: logging.Handler, run_ids: RunIds) -> None:
    """Send alya's lines to the logs of the run they belong to as well: ``handler`` receives each line
    (formatted as key=value pairs, with ``flow_run_id``/``task_run_id`` in the event when bound) and
    ``run_ids()`` tells :func:`run_logger` which run this thread is in. Installed once, by the Prefect layer
    when it is imported; installing again replaces the handler."""
    global _run_handler, _run_ids
    with _lock:
        handler.setFormatter(_run_formatter())
        logger = logging.getLogger(LOGGER)
        if _run_handler is not None:
            logger.removeHandler(_run_handler)
        _run_handler, _run_ids = handler, run_ids
        if _configured:
            logger.addHandler(handler)


def _run_formatter() -> logging.Formatter:
    """key=value pairs without ``level`` and ``timestamp``: the Prefect UI shows its own for each line."""
    return structlog.stdlib.ProcessorFormatter(
        processors=[_drop_run_ids, _remove_meta, _drop_level_and_time, redact_urls,
                    structlog.processors.KeyValueRenderer(
                        key_order=["event", "app", "op", "batch", "line", "old", "new"], drop_missing=True)])


def configure(level: str | None = None, fmt: str | None = None, *, force: bool = False) -> None:
    """Set up alya's logging once per process (later calls change nothing unless ``force``)."""
    global _configured
    with _lock:
        if _configured and not force:
            return
        from alya.core.settings import LogSettings  # settings read lazily: logging works before a JobManager

        settings = LogSettings()
        name = (level or settings.log_level).upper()
        lvl = logging.getLevelNamesMapping().get(name, logging.INFO)
        fmt = fmt or settings.log_format
        if fmt == "auto":
            fmt = "console" if _stderr_is_terminal() else "json"
        shared: list[Any] = [
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ]
        structlog.configure(
            processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
            wrapper_class=structlog.make_filtering_bound_logger(lvl),
            logger_factory=structlog.stdlib.LoggerFactory(),
            cache_logger_on_first_use=True,
        )
        renderer: Any = (structlog.dev.ConsoleRenderer(colors=_stderr_is_terminal()) if fmt == "console"
                         else structlog.processors.JSONRenderer())
        stderr = logging.StreamHandler(_CurrentStderr())  # type: ignore[arg-type]
        stderr.setFormatter(structlog.stdlib.ProcessorFormatter(
            processors=[_drop_run_ids, _remove_meta, redact_urls, renderer]))
        logger = logging.getLogger(LOGGER)
        for h in list(logger.handlers):
            logger.removeHandler(h)
        logger.addHandler(stderr)
        if _run_handler is not None:
            logger.addHandler(_run_handler)
        logger.setLevel(lvl)
        logger.propagate = False  # Prefect's root console handler would print every line twice
        _configured = True


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _remove_meta(logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event_dict.pop("_record", None)
    event_dict.pop("_from_structlog", None)
    return event_dict


def redact_urls(logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The last step before a line is written, wherever it goes: every URL in every value loses its
    credentials and secret query values (``alya.core.redact``), whoever logged it and however (an error
    message quoting a URL, a processor's own line): a secret cannot reach stderr or the Prefect UI."""
    for key, value in event_dict.items():
        if isinstance(value, (str, list, tuple, dict)):
            event_dict[key] = redact_value(value)
    return event_dict


def _drop_level_and_time(logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Prefect's log view shows each line's level and time itself: repeated in the text they are noise."""
    event_dict.pop("level", None)
    event_dict.pop("timestamp", None)
    return event_dict


def _drop_run_ids(logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Run ids route a line to its Prefect run; on stderr and in the UI they are noise."""
    event_dict.pop("flow_run_id", None)
    event_dict.pop("task_run_id", None)
    return event_dict


class _CurrentStderr:
    """Writes to whatever sys.stderr is now (test runners and CLIs swap it), not the one at import."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def get_logger() -> Any:
    configure()
    return structlog.get_logger(LOGGER)


def run_logger(**fields: Any) -> Any:
    """A logger bound to ``fields`` and to the current flow/task run (if any, and if a run log is installed),
    for work that continues on other threads: its lines reach this run's logs in the Prefect UI from wherever
    they are written."""
    flow_run_id, task_run_id = _run_ids()
    if flow_run_id is not None:
        fields = {**fields, "flow_run_id": str(flow_run_id)}
        if task_run_id is not None:
            fields["task_run_id"] = str(task_run_id)
    return get_logger().bind(**fields)


def status_change(app: str, op: str, batch: str, new: str, old: str | None = None, log: Any = None,
                  **fields: Any) -> None:
    """Log a batch status change, once, after the commit that won it, and publish it as an event
    (``alya.core.events``: the Prefect event ``alya.batch.<new>``). Counts go in ``nrows``, ``nsuccess``...;
    a slow query says ``type="Q"``."""
    (log or get_logger()).info("status_change", app=app, op=op, batch=batch, old=old, new=new, **fields)
    publish(app, op, batch, new, old, fields, flow_run=_run_ids()[0])
