"""alya's log lines in the logs of the Prefect flow or task run they belong to (the run's page in the UI).

:func:`install` gives ``alya.core.logs`` its run log: :class:`PrefectRunHandler`, which forwards each line
to Prefect's API log handler, and :func:`prefect_run_ids`, which tells the engine which run a thread is in
(rows run on alya's own threads, which do not carry Prefect's run context, so the engine binds the run ids
to the loggers it hands them). ``alya.prefect`` installs it when it is imported: every process that runs
flows, dispatches or serves them has it. Prefect itself is imported only once a line is to be sent.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from alya.core.logs import install_run_log


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


class OwnOutcomeFilter(logging.Filter):
    """Drops Prefect's "Engine execution exited with unexpected exception" and its traceback when the
    exception is only the Failed or Cancelled state an alya flow chose to end in (``alya.prefect.states``):
    Prefect's engine raises such a state's message where a worker asks for the run's result, and logs it to
    the run as an error, as if the run had crashed. Any other exception is logged as Prefect logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or type(exc).__name__ not in ("FailedRun", "CancelledRun"):
            return True
        from alya.prefect.states import chosen_messages

        return str(exc) not in chosen_messages


def install() -> None:
    """Send alya's lines to the Prefect run they belong to (idempotent: a second call changes nothing)."""
    global _installed
    if not _installed:
        install_run_log(PrefectRunHandler(), prefect_run_ids)
        logging.getLogger("prefect.flow_runs").addFilter(OwnOutcomeFilter())
        _installed = True


_installed = False
