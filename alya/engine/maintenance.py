"""Maintenance: recovery of dead workers' rows, missed summaries and pending ``mark_done`` calls.

:func:`cleanup` is one idempotent pass: run it as often as you like, from as many places as you like (the
scheduled sweeper flow, ``jm.cleanup()``); each step changes only what is still wrong.

:class:`Maintenance` runs it in every ``jm.run`` worker, on a thread of its own (so that a long flow run
never delays recovery), but each *duty* is done by one worker at a time: the worker that holds the duty's
PostgreSQL advisory lock, on a connection of its own. The duties are ``recovery`` (requeue rows of silent
workers, forget them, summarise batches whose summary was missed: work for the whole cluster) and one
``mark_done:<app>/<op>`` per batch type (only a worker that has that type's processor can call its
``mark_done``). When the holder dies, PostgreSQL ends its session and releases the locks; another worker
takes the duty at its next tick. ``application_name`` of the holding session is ``alya-maintenance
<worker id>``, so ``pg_stat_activity`` shows who holds what.

Re-dispatching queued batches that have no live flow run is Prefect's business, one layer up: the facade
(``JobManager.cleanup(redispatch=True)``) and the sweeper add it after this.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg2

from alya.batch.services import Services
from alya.core.errors import AlyaError, describe
from alya.core.logs import get_logger
from alya.core.models import ErrorMessage
from alya.core.names import MAINTENANCE_LOCK_CLASS, maintenance_app_name
from alya.db.store import Store, json_text
from alya.engine.identity import Identity

RECOVERY = "recovery"


def mark_done_duty(app: str, op: str) -> str:
    return f"mark_done:{app}/{op}"


class Finishes(Protocol):
    """What cleanup needs of the engine: its services and the finishing steps."""

    svc: Services

    def summarise(self, batch_id: str) -> bool: ...
    def notify(self, batch_id: str) -> bool: ...


@dataclass
class CleanupReport:
    requeued: int = 0
    failed: int = 0
    summarised: list[str] = field(default_factory=list)
    notified: list[str] = field(default_factory=list)
    dispatched: list[str] = field(default_factory=list)


def cleanup(engine: Finishes, types: list[tuple[str, str]] | None = None, recover: bool = True) -> CleanupReport:
    """1. rows of workers silent for ALYA_RECOVERY_SEC go back to the queue (or fail, out of attempts);
    2. open batches whose rows are all final are summarised (their summary was missed);
    3. mark_done is called for finished batches of ``types`` that were never notified.
    Steps 1 and 2 only with ``recover``."""
    report = CleanupReport()
    if recover:
        _recover(engine, report)
    for app, op in types or []:
        with engine.svc.store.tx() as tx:
            pending = tx.unnotified_batches(app=app, op=op)
        for batch in pending:
            if engine.notify(batch):
                report.notified.append(batch)
    return report


def _recover(engine: Finishes, report: CleanupReport) -> None:
    log = get_logger()
    svc = engine.svc
    cfg = svc.config
    fail_messages = json_text([ErrorMessage(msgid=0, errcode="processing_error",
                                            vals=["worker lost while processing the row"]).to_dict()])
    with svc.store.tx() as tx:
        recovered = tx.recover_rows(sec=cfg.recovery_sec, max_attempts=cfg.max_attempts,
                                    fail_messages=fail_messages)
        tx.forget_dead_workers(sec=cfg.recovery_sec)
        if any(r.status == "queued" for r in recovered):
            tx.notify_any_work()
    # one log line per batch and worker, not per row (a lost chunk can be 100,000 rows)
    lost: dict[tuple[str, str | None], dict[str, list[int]]] = {}
    for r in recovered:
        if r.status == "failed":
            report.failed += 1
        else:
            report.requeued += 1
        lost.setdefault((r.batch, r.worker), {}).setdefault(r.status, []).append(r.line)
    for (batch, worker), by_status in lost.items():
        for status, lines in by_status.items():
            log.warning("rows_recovered", batch=batch, dead_worker=worker, new=status, rows=len(lines),
                        first_line=min(lines), last_line=max(lines))
    with svc.store.tx() as tx:
        missed = tx.unsummarised_batches()
    for batch in missed:
        try:
            if engine.summarise(batch):
                report.summarised.append(batch)
        except AlyaError as exc:
            log.error("summary_failed", batch=batch, error=str(exc))


class Maintenance:
    """The duties this worker holds, and the thread that does them. One lock guards the connection and the
    set of duties held."""

    def __init__(self, store: Store, identity: Identity, recovery_sec: float) -> None:
        self._store = store
        self._identity = identity
        # A holder cut off from the network (not dead) keeps its session, and so its duties, until the server
        # sees the peer is gone: TCP keepalives on both ends make that take about a quarter of
        # ALYA_RECOVERY_SEC plus a few probes, so its duties move before its rows are due for recovery.
        self._keepalive_idle = max(1, int(recovery_sec / 4))
        self._lock = threading.Lock()
        self._conn: Any = None
        self._held: set[str] = set()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------ leadership
    def hold(self, duties: list[str]) -> set[str]:
        """Try to hold each duty; returns the ones held now. A duty held stays held while this session
        lives; if the session is gone (a restart, a network cut), every duty is lost and tried again."""
        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._held = set()
                    idle = self._keepalive_idle
                    self._conn = psycopg2.connect(
                        self._store.database_url, application_name=maintenance_app_name(self._identity.worker_id),
                        connect_timeout=10, keepalives=1, keepalives_idle=idle, keepalives_interval=1,
                        keepalives_count=3)
                    self._conn.autocommit = True
                    with self._conn.cursor() as cur:  # the server's end of the same rule
                        cur.execute("SET tcp_keepalives_idle = %s; SET tcp_keepalives_interval = 1; "
                                    "SET tcp_keepalives_count = 3; SET tcp_user_timeout = %s",
                                    (idle, 3000 + 1000 * idle))
                with self._conn.cursor() as cur:
                    cur.execute("SELECT 1")  # the session is alive: what it holds is still held
                    for duty in duties:
                        if duty in self._held:
                            continue
                        cur.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", (MAINTENANCE_LOCK_CLASS, duty))
                        row = cur.fetchone()
                        if row is not None and row[0]:
                            self._held.add(duty)
                            self._identity.log.info("maintenance_duty_taken", duty=duty)
            except (psycopg2.Error, OSError) as exc:
                if self._held:
                    self._identity.log.warning("maintenance_duties_lost", duties=sorted(self._held),
                                               error=describe(exc))
                self._close_locked()
            return set(self._held)

    def held(self) -> set[str]:
        with self._lock:
            return set(self._held)

    def tick(self, engine: Finishes, types: list[tuple[str, str]]) -> CleanupReport | None:
        """One pass over the duties this worker holds (None when it holds none)."""
        held = self.hold([RECOVERY] + [mark_done_duty(a, o) for a, o in types])
        if not held:
            return None
        mine = [(a, o) for a, o in types if mark_done_duty(a, o) in held]
        return cleanup(engine, types=mine, recover=RECOVERY in held)

    # ------------------------------------------------------------------ the thread
    def start(self, engine: Finishes, types_of: Callable[[], list[tuple[str, str]]], every: float) -> None:
        """Tick every ``every`` seconds on a thread until :meth:`close`."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()

        def loop() -> None:
            while True:
                try:
                    self.tick(engine, types_of())
                except Exception as exc:  # an outage: the next tick tries again
                    self._identity.log.error("maintenance_failed", error=describe(exc))
                if self._stop.wait(every):
                    return

        self._thread = threading.Thread(target=loop, name="alya-maintenance", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread and give up every duty (another worker takes them at its next tick)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._thread = None
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._conn is not None:
            # released at once, not when the server notices the closed socket
            with suppress(Exception), self._conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock_all()")
            with suppress(Exception):
                self._conn.close()
        self._conn = None
        self._held = set()
