"""Structured logs: structlog on top of the standard library's ``logging``.

- Every batch and row status change goes through :func:`status_change`, so app, op, batch and row are
  always present and named the same way.
- On stderr: JSON lines for machines, or a readable console format on a terminal
  (``ALYA_LOG_FORMAT=json|console|auto``; auto picks console when stderr is a terminal).
- Inside a Prefect flow or task run, alya's lines also reach that run's logs in the Prefect UI: the
  :class:`PrefectRunHandler` forwards them to Prefect's API log handler. Rows run on alya's own threads,
  which do not carry Prefect's run context, so the engine binds ``flow_run_id``/``task_run_id`` (see
  :func:`prefect_run_ids`) to the loggers it hands them.
- Credentials are never logged: alya logs host:port/database, never a URL.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import MutableMapping
from typing import Any

import structlog

LOGGER = "alya"
_configured = False
_lock = threading.Lock()


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
        stderr.setFormatter(structlog.stdlib.ProcessorFormatter(processors=[_drop_run_ids, _remove_meta, renderer]))
        prefect = PrefectRunHandler()
        prefect.setFormatter(structlog.stdlib.ProcessorFormatter(
            processors=[_drop_run_ids, _remove_meta, structlog.processors.KeyValueRenderer(
                key_order=["event", "app", "op", "batch", "line", "old", "new"], drop_missing=True)]))
        logger = logging.getLogger(LOGGER)
        for h in list(logger.handlers):
            logger.removeHandler(h)
        logger.addHandler(stderr)
        logger.addHandler(prefect)
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


class PrefectRunHandler(logging.Handler):
    """Forwards alya's records to the logs of the Prefect flow/task run they belong to: the run ids bound
    to the line, else the current run context; outside any run, the line is not sent."""

    def __init__(self) -> None:
        super().__init__()
        self._api: logging.Handler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if "prefect" not in sys.modules:  # no Prefect loaded: no run to send to
            return
        event = record.msg if isinstance(record.msg, dict) else {}
        flow_run_id = event.get("flow_run_id")
        task_run_id = event.get("task_run_id")
        if flow_run_id is None:
            flow_run_id, task_run_id = prefect_run_ids()
            if flow_run_id is None:
                return
        try:
            if self._api is None:
                from prefect.logging.handlers import APILogHandler

                self._api = APILogHandler()
            record.flow_run_id = flow_run_id
            record.task_run_id = task_run_id
            assert self._api is not None
            self._api.setFormatter(self.formatter)  # type: ignore[arg-type]
            self._api.emit(record)
        except Exception:  # a log line must never break the work
            pass


def prefect_run_ids() -> tuple[Any, Any]:
    """(flow_run_id, task_run_id) of the Prefect run this thread is in, or (None, None)."""
    if "prefect" not in sys.modules:
        return None, None
    try:
        from prefect.context import FlowRunContext, TaskRunContext

        task_ctx = TaskRunContext.get()
        if task_ctx is not None:
            return task_ctx.task_run.flow_run_id, task_ctx.task_run.id
        flow_ctx = FlowRunContext.get()
        if flow_ctx is not None and flow_ctx.flow_run is not None:
            return flow_ctx.flow_run.id, None
    except Exception:
        pass
    return None, None


def get_logger() -> Any:
    configure()
    return structlog.get_logger(LOGGER)


def run_logger(**fields: Any) -> Any:
    """A logger bound to ``fields`` and to the current Prefect run (if any), for work that continues on
    other threads: its lines reach this run's logs in the Prefect UI from wherever they are written."""
    flow_run_id, task_run_id = prefect_run_ids()
    if flow_run_id is not None:
        fields = {**fields, "flow_run_id": str(flow_run_id)}
        if task_run_id is not None:
            fields["task_run_id"] = str(task_run_id)
    return get_logger().bind(**fields)


def status_change(app: str, op: str, batch: str, new: str, old: str | None = None, log: Any = None,
                  **fields: Any) -> None:
    (log or get_logger()).info("status_change", app=app, op=op, batch=batch, old=old, new=new, **fields)
