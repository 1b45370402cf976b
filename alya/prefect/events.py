"""Batch status changes as Prefect events (issue 20 item 5): ``alya.batch.<status>`` about the resource
``alya.batch.<batch_id>`` (labels ``alya.app``, ``alya.op``, ``alya.kind``, ``prefect.resource.name``), the
counts in the payload, so that a Prefect Automation ("notify when a batch of app bank fails") needs no code.

- *Exactly once per transition:* the change comes from ``alya.core.events`` (``status_change``, logged after
  the commit of the statement that won the transition), in whichever process won it.
- *Never blocking, never failing the business call:* :class:`EventSink` only puts the change on a bounded
  queue; a daemon thread imports Prefect (a second or more in a web service that never imported it) and
  hands each event to Prefect's own background ``EventsWorker`` (``emit_event`` queues it too). A full
  queue drops events (logged once per process). Prefect unreachable: the worker logs it and drops them.
- *Only to a real server:* with no ``PREFECT_API_URL`` (or Cloud), Prefect's ``emit_event`` would start a
  temporary server in this process just to hold the events; alya emits nothing then (logged once).
- *At exit,* queued events are handed over (at most ``FLUSH_SEC``) before Prefect drains its worker, so a
  short-lived process (``alya abort``) still emits its event.
"""

from __future__ import annotations

import contextlib
import contextvars
import queue
import threading
import time
from typing import Any

from alya.core import events
from alya.core.events import BatchChange
from alya.core.logs import get_logger
from alya.core.names import (
    EVENT_LABEL_APP,
    EVENT_LABEL_KIND,
    EVENT_LABEL_OP,
    batch_event_name,
    batch_resource_id,
    run_name,
)
from alya.core.settings import JobManagerConfig

SINK = "prefect"
QUEUE_MAX = 10_000  # events waiting for the thread; beyond, dropped (Prefect has its own queue behind)
FLUSH_SEC = 5.0  # at exit, how long queued events may hold the process


def event_of(change: BatchChange) -> dict[str, Any]:
    """The ``emit_event`` arguments of a change (pure: what the tests and the README show)."""
    resource = {
        "prefect.resource.id": batch_resource_id(change.batch_id),
        "prefect.resource.name": run_name(change.app, change.op, change.batch_id),
        EVENT_LABEL_APP: change.app,
        EVENT_LABEL_OP: change.op,
        EVENT_LABEL_KIND: "slowquery" if change.type == "Q" else "batch",
    }
    payload: dict[str, Any] = {"batch_id": change.batch_id, "app": change.app, "op": change.op,
                               "status": change.status, "previous": change.old, **change.counts}
    if change.error is not None:
        payload["error"] = change.error
    return {"event": batch_event_name(change.status), "resource": resource, "payload": payload}


def emit_batch_event(status: str, batch_id: str, app: str, op: str, counts: dict[str, int] | None = None,
                     old: str | None = None, type: str = "B", error: str | None = None) -> None:
    """Emit one batch event now, from this thread, through Prefect's background events worker. Prefer
    ``alya.core.logs.status_change`` (which logs the change and publishes it to the installed sink): this is
    for code that stores a transition without logging it. Needs a Prefect API URL (else Prefect would start
    a temporary server: see :func:`prefect_api_configured`)."""
    from prefect.events import emit_event

    emit_event(**event_of(BatchChange(app, op, batch_id, status, old, type, dict(counts or {}), error)))


def prefect_api_configured() -> bool:
    """A Prefect server or Cloud to send events to (PREFECT_API_URL, from the environment or profile)."""
    from prefect.settings import PREFECT_API_URL

    return isinstance(PREFECT_API_URL.value(), str)


class EventSink:
    """The ``alya.core.events`` sink of a process: a bounded queue and one daemon thread that emits."""

    def __init__(self, slow_queries: bool = False) -> None:
        self.slow_queries = slow_queries
        self._queue: queue.Queue[BatchChange] = queue.Queue(QUEUE_MAX)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.off = False  # no Prefect API: nothing is queued any more
        self._dropped = 0
        self.emitted = 0
        # Prefect resolves its settings (PREFECT_API_URL) per context: the thread sends with those of the code
        # that installed the sink (a JobManager's construction), not with whatever a new thread would see.
        self._context = contextvars.copy_context()

    def __call__(self, change: BatchChange) -> None:
        if self.off or (change.type == "Q" and not self.slow_queries):
            return
        try:
            self._queue.put_nowait(change)
        except queue.Full:
            self._dropped += 1
            if self._dropped == 1:
                get_logger().warning("prefect_events_dropped", reason=f"more than {QUEUE_MAX} events waiting")
            return
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._context.copy().run, args=(self._run,),
                                                    name="alya-events", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        log = get_logger()
        try:
            from prefect.events import emit_event

            if not prefect_api_configured():
                self._stop("PREFECT_API_URL is unset: no Prefect server to send batch events to "
                           "(ALYA_EVENTS=off silences this)")
                return
        except Exception as exc:  # Prefect broken: events are best-effort
            self._stop(str(exc)[:200])
            return
        registered = False
        while True:
            change = self._queue.get()
            try:
                emit_event(**event_of(change))
                self.emitted += 1
            except Exception as exc:  # one bad event never stops the others
                log.warning("prefect_event_failed", batch=change.batch_id, status=change.status, error=str(exc)[:200])
            finally:
                self._queue.task_done()
            if not registered:
                # Prefect's events worker (started by the first emit_event) drains at exit through the same
                # hook list, run newest first: registered after it, this hands over what is queued first.
                hook = getattr(threading, "_register_atexit", None)
                if hook is not None:
                    with contextlib.suppress(RuntimeError):  # the interpreter is already exiting
                        hook(self.flush)
                registered = True

    @property
    def pending(self) -> int:
        """Changes queued and not yet handed to Prefect."""
        return self._queue.unfinished_tasks

    def _stop(self, reason: str) -> None:
        """No Prefect to send to: stop queueing, and drop what is queued."""
        self.off = True
        get_logger().info("prefect_events_off", reason=reason)
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
                self._queue.task_done()

    def flush(self, timeout: float = FLUSH_SEC) -> bool:
        """Wait (at most ``timeout``) until every queued change was handed to Prefect."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and not self.off and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks


_installed: EventSink | None = None
_install_lock = threading.Lock()


def install(slow_queries: bool = False) -> EventSink:
    """Make this process publish batch status changes as Prefect events (idempotent: one sink per process;
    the slow-query choice of the last call wins)."""
    global _installed
    with _install_lock:
        if _installed is None:
            _installed = EventSink(slow_queries)
            events.install(SINK, _installed)
        _installed.slow_queries = slow_queries
        _installed.off = False  # look for a Prefect API again (it may have been set since)
        return _installed


def install_for(config: JobManagerConfig) -> None:
    """What a JobManager does at construction: install the sink when ``ALYA_EVENTS`` is on (the default)."""
    if config.events:
        install(config.events_slow_queries)


def uninstall() -> None:
    global _installed
    with _install_lock:
        events.uninstall(SINK)
        _installed = None
