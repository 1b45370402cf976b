"""Batch status changes as Prefect events (issue 20 item 5): ``alya.batch.<status>`` about the resource
``alya.batch.<batch_id>`` (labels ``alya.app``, ``alya.op``, ``alya.kind``, ``prefect.resource.name``), the
counts in the payload, so that a Prefect Automation ("notify when a batch of app bank fails") needs no code.

- *Exactly once per transition:* the change comes from ``alya.core.events`` (``status_change``, logged after
  the commit of the statement that won the transition), in whichever process won it.
- *Never blocking, never failing the business call:* :class:`EventSink` only puts the change on a bounded
  queue; a daemon thread imports Prefect (a second or more in a web service that never imported it) and
  posts the events to the Prefect API's ``POST /events`` in batches with Prefect's own synchronous client
  (its URL, auth and TLS settings). A full queue drops events; Prefect unreachable: the batch of events is
  dropped (both logged).
- *Not Prefect's ``emit_event``:* its background worker can only be started before the interpreter begins
  to exit (it registers an exit hook), so the events of a short-lived process (``alya abort``) were lost
  whenever Prefect's import had not finished by then. Plain HTTP from this thread needs no new thread: an
  exit hook registered with the first event waits for the queue (at most ``FLUSH_SEC``).
- *Only to a real server:* with no ``PREFECT_API_URL`` (or Cloud), Prefect's client would start a temporary
  server in this process just to hold the events; alya sends nothing then (logged once).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import queue
import sys
import threading
import time
from pathlib import Path
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
QUEUE_MAX = 10_000  # events waiting for the thread; beyond, dropped
POST_MAX = 200  # events per request
FLUSH_SEC = 10.0  # at exit, how long queued events may hold the process (Prefect's import included)


def event_of(change: BatchChange) -> dict[str, Any]:
    """The fields of a change's Prefect event (event, resource, payload, related): pure, what the tests check."""
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
    related = [] if change.flow_run is None else [
        {"prefect.resource.id": f"prefect.flow-run.{change.flow_run}", "prefect.resource.role": "flow-run"}]
    return {"event": batch_event_name(change.status), "resource": resource, "payload": payload,
            "related": related}


def emit_batch_event(status: str, batch_id: str, app: str, op: str, counts: dict[str, int] | None = None,
                     old: str | None = None, type: str = "B", error: str | None = None) -> None:
    """Publish one batch status change as an event (to the sink ``ALYA_EVENTS`` installed; nothing when it
    is off). Prefer ``alya.core.logs.status_change``, which also writes the change's log line: this is for
    code that stores a transition and logs it otherwise. Call it once, after the commit that won it."""
    events.publish(app, op, batch_id, status, old, {**(counts or {}), "type": type, "error": error})


def prefect_api_may_be_set() -> bool:
    """Cheaply, without importing Prefect (a second or more): whether a Prefect API URL may be configured.
    Prefect imported already: ask it. Else the places Prefect reads it from: the environment, the profiles
    file, ``prefect.toml`` and ``.env`` of the working directory. No: the sink is off from the start, so a
    process without Prefect (``alya submit`` with no server) never pays Prefect's import at exit."""
    if "prefect.settings" in sys.modules:
        return prefect_api_configured()
    if os.environ.get("PREFECT_API_URL"):
        return True
    home = os.environ.get("PREFECT_HOME", "~/.prefect")
    files = [os.environ.get("PREFECT_PROFILES_PATH", f"{home}/profiles.toml"), "prefect.toml", ".env"]
    for name in files:
        try:
            if "PREFECT_API_URL" in Path(name).expanduser().read_text(errors="replace"):
                return True
        except OSError:
            continue
    return False


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
        self._hooked = False
        self.emitted = 0
        self.failed = 0
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
                    _import_prefect_client()
                    self._thread = threading.Thread(target=self._context.copy().run, args=(self._run,),
                                                    name="alya-events", daemon=True)
                    self._thread.start()
                    if not self._hooked:  # at exit, hand over what is queued first (new threads: none needed)
                        hook = getattr(threading, "_register_atexit", None)
                        if hook is not None:
                            with contextlib.suppress(RuntimeError):  # the interpreter is already exiting
                                hook(self.flush)
                        self._hooked = True

    def _run(self) -> None:
        try:
            from prefect.client.orchestration import get_client
            from prefect.events import Event

            if not prefect_api_configured():
                self._stop("PREFECT_API_URL is unset: no Prefect server to send batch events to "
                           "(ALYA_EVENTS=off silences this)")
                return
            with get_client(sync_client=True) as client:
                while True:
                    batch = [self._queue.get()]
                    with contextlib.suppress(queue.Empty):
                        while len(batch) < POST_MAX:
                            batch.append(self._queue.get_nowait())
                    try:
                        body = [Event(**event_of(c)).model_dump(mode="json") for c in batch]
                        client.request("POST", "/events", json=body)
                        self.emitted += len(batch)
                    except Exception as exc:  # one failed request never stops the next
                        self.failed += len(batch)
                        get_logger().warning("prefect_events_failed", events=len(batch), error=str(exc)[:200],
                                             next="dropped")
                    finally:
                        for _ in batch:
                            self._queue.task_done()
        except Exception as exc:  # Prefect broken: events are best-effort
            self._stop(str(exc)[:200])

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


def _import_prefect_client() -> None:
    """Import what the sender thread uses here, in the thread of the first event, before the sender starts.
    Imported on the sender thread instead, it raced the main thread importing Prefect for a dispatch (``alya
    submit`` with ``ALYA_DISPATCH=prefect``): Python's import deadlock detection fired and Prefect printed
    "Failed to initialize plugins: deadlock detected by _ModuleLock(...)" on every submit and abort (the
    batch went through). The cost, once per process, is paid by a process that sends events anyway."""
    with contextlib.suppress(Exception):  # no Prefect to import: the sender stops itself and says why
        import prefect.client.orchestration  # noqa: F401
        import prefect.events  # noqa: F401


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
        _installed.off = not prefect_api_may_be_set()  # look again: it may have been set since
        if _installed.off:
            get_logger().debug("prefect_events_off", reason="no PREFECT_API_URL: no Prefect server to send "
                               "batch events to")
        return _installed


def installed() -> EventSink | None:
    """This process's sink, if one is installed."""
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
