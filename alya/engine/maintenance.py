"""Maintenance: recovery of dead workers' rows, missed summaries and pending ``mark_done`` calls.

:func:`cleanup` is one idempotent pass: run it as often as you like, from as many places as you like (the
scheduled sweeper flow, ``jm.cleanup()``); each step changes only what is still wrong.

:class:`Maintenance` runs it in every ``jm.run`` worker, on a thread of its own (so that a long flow run
never delays recovery), but each *duty* is done by one worker at a time: the worker holding the duty's
lease (table ``maintenance_leases``: holder and expiry). The duties are ``recovery`` (requeue rows of silent
workers, forget them, summarise batches whose summary was missed: work for the whole cluster),
``retention`` (purge final batches older than ALYA_RETENTION_DAYS, a few seconds per tick), ``partitions``
(create the partitions of ``batchrows`` ahead of time: ``alya.db.partitions``) and one
``mark_done:<app>/<op>`` per batch type (only a worker that has that type's processor can call its
``mark_done``). When the holder dies or is cut off, its leases run out and another worker takes the duties
at its next tick; a holder that stops gives them up at once.

Re-dispatching queued batches that have no live flow run is Prefect's business, one layer up: the facade
(``JobManager.cleanup(redispatch=True)``) and the sweeper add it after this.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from alya.batch.retention import purge, retention_cutoff
from alya.batch.services import Services
from alya.core.errors import AlyaError, describe
from alya.core.logs import get_logger
from alya.core.models import ErrorMessage
from alya.db.partitions import ensure_partitions
from alya.db.store import Store, json_text
from alya.engine.identity import Identity

RECOVERY = "recovery"
RETENTION = "retention"  # ALYA_RETENTION_DAYS: purge final batches older than that
RETENTION_PASS_SEC = 5.0  # a pass purges this long at most; a backlog of history goes over several passes
PARTITIONS = "partitions"  # batchrows' partitions of this week and the next ones (alya.db.partitions)
SCHEDULE = "schedule"  # batch control: fire due deadlines, wake workers when a batch's not_before comes
SCHEDULE_EVERY_SEC = 1.0  # how often its holder looks: a deadline fires at most about this late
# Counter shards (alya.db.counters): an open batch with more than this many shard rows has them folded into
# one, up to COMPACT_BATCHES batches per recovery pass. A read sums them, so this bounds its cost (each
# backend that touched a batch adds a row per status, and pools reconnect over a long batch's life).
COMPACT_OVER = 32
COMPACT_BATCHES = 100


def mark_done_duty(app: str, op: str) -> str:
    return f"mark_done:{app}/{op}"


class Finishes(Protocol):
    """What cleanup needs of the engine: its services and the finishing steps."""

    svc: Services

    def summarise(self, batch_id: str) -> bool: ...
    def notify(self, batch_id: str) -> bool: ...
    def stop_if_too_many_failures(self, batch_id: str) -> bool: ...
    def deadline_passed(self, batch_id: str) -> bool: ...


@dataclass
class CleanupReport:
    requeued: int = 0
    failed: int = 0
    summarised: list[str] = field(default_factory=list)
    notified: list[str] = field(default_factory=list)
    dispatched: list[str] = field(default_factory=list)
    purged: int = 0  # batches deleted by retention
    purged_rows: int = 0
    deadlines: list[str] = field(default_factory=list)  # batches ended because their deadline passed
    compacted: int = 0  # counter rows folded
    partitions: list[str] = field(default_factory=list)  # partitions of batchrows created


def cleanup(engine: Finishes, types: list[tuple[str, str]] | None = None, recover: bool = True,
            retain: bool | None = None, partition: bool | None = None) -> CleanupReport:
    """1. rows of workers silent for ALYA_RECOVERY_SEC go back to the queue (or fail, out of attempts);
    2. open batches whose rows are all final are summarised (their summary was missed);
    3. mark_done is called for finished batches of ``types`` that were never notified;
    4. final batches older than ALYA_RETENTION_DAYS are purged (for RETENTION_PASS_SEC at most).
    5. the partitions of ``batchrows`` of this week and the next ones exist (before step 4 drops any).
    Steps 1 and 2 only with ``recover``; steps 4 and 5 with ``retain`` and ``partition`` (default: as
    ``recover``)."""
    report = CleanupReport()
    if recover if partition is None else partition:
        _partition(engine.svc, report)
    if recover:
        schedule(engine, report)
        _recover(engine, report)
    if recover if retain is None else retain:
        _retain(engine.svc, report)
    for app, op in types or []:
        with engine.svc.store.tx() as tx:
            pending = tx.unnotified_batches(app=app, op=op)
        for batch in pending:
            if engine.notify(batch):
                report.notified.append(batch)
    return report


def schedule(engine: Finishes, report: CleanupReport) -> None:
    """Batch control's clock: batches whose deadline has passed are ended (aborted, "deadline passed",
    their finished rows' files written, mark_done called), and the workers of batches whose not_before came
    are woken: an idle worker does not poll for it (it sleeps on LISTEN and its poll fallback)."""
    log = get_logger()
    with engine.svc.store.tx() as tx:
        due = tx.due_deadlines()
        for app, op in tx.started_types(sec=3 * SCHEDULE_EVERY_SEC):
            tx.notify_work(app, op)
    for batch in due:
        try:
            if engine.deadline_passed(batch):
                report.deadlines.append(batch)
        except AlyaError as exc:  # a failed upload: the next pass tries again
            log.error("deadline_stop_failed", batch=batch, error=describe(exc))


def _partition(svc: Services, report: CleanupReport) -> None:
    try:
        report.partitions = ensure_partitions(svc.store)
    except AlyaError as exc:  # a lock not had soon (workers were busy on batchrows): the next pass
        get_logger().warning("partitions_deferred", error=describe(exc))
        return
    for name in report.partitions:
        get_logger().info("partition_created", partition=name)


def _retain(svc: Services, report: CleanupReport) -> None:
    before = retention_cutoff(svc.config.retention_days)
    if before is None:
        return
    try:
        done = purge(svc, before, files=svc.config.retention_files, max_sec=RETENTION_PASS_SEC)
    except AlyaError as exc:  # an outage: the next pass goes on where this one stopped
        get_logger().error("retention_failed", error=describe(exc))
        return
    report.purged += done.nbatches
    report.purged_rows += done.nrows


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
    with svc.store.tx() as tx:  # its own transaction: it never waits for a worker (SKIP LOCKED)
        crowded = tx.crowded_counts(over=COMPACT_OVER, n=COMPACT_BATCHES)
        report.compacted = tx.fold_counts(ids=crowded) if crowded else 0
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
    for batch in {b for (b, _), by_status in lost.items() if "failed" in by_status}:
        try:  # rows failed here (they kept killing workers) count against a failure threshold too
            engine.stop_if_too_many_failures(batch)
        except AlyaError as exc:
            log.error("failure_limit_check_failed", batch=batch, error=str(exc))
    with svc.store.tx() as tx:
        missed = tx.unsummarised_batches()
    for batch in missed:
        try:
            if engine.summarise(batch):
                report.summarised.append(batch)
        except AlyaError as exc:
            log.error("summary_failed", batch=batch, error=str(exc))


class Maintenance:
    """The duties this worker holds, and the thread that does them. One lock guards the set of duties held.

    A duty is held by lease (table ``maintenance_leases``): the holder renews its leases at every tick for
    ``lease_sec`` (half of ALYA_RECOVERY_SEC, at least 3 s, always more than a tick), and any worker takes a
    lease that ran out. A holder that dies, hangs or is cut off from the database stops renewing; its duties
    move within ``lease_sec`` plus a tick, before the rows it held are due for recovery. A lease is a row
    in the database, so it works through a connection pooler or proxy (a session-level advisory lock does
    not: its holder keeps it while a proxy keeps the connection open, which the multi-host test showed)."""

    def __init__(self, store: Store, identity: Identity, recovery_sec: float) -> None:
        self._store = store
        self._holder = identity.worker_id  # stable for the process: a retired identity keeps its leases
        self._log = identity.log
        self.every = max(1.0, recovery_sec / 4)
        self.lease_sec = max(3.0, recovery_sec / 2, 2 * self.every)
        self._lock = threading.Lock()
        self._held: set[str] = set()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def holder(self) -> str:
        return self._holder

    # ------------------------------------------------------------------ leases
    def hold(self, duties: list[str]) -> set[str]:
        """Renew or take each duty's lease; returns the duties held now (none if the database fails)."""
        try:
            with self._store.tx() as tx:
                held = tx.take_leases(holder=self._holder, duties=duties, sec=self.lease_sec)
        except AlyaError as exc:
            held = set()
            if self._held:
                self._log.warning("maintenance_duties_lost", duties=sorted(self._held), error=describe(exc))
        with self._lock:
            for duty in sorted(held - self._held):
                self._log.info("maintenance_duty_taken", duty=duty, holder=self._holder)
            self._held = held | (self._held & {SCHEDULE})  # that one is renewed by tick_schedule
        return set(held)

    def held(self) -> set[str]:
        with self._lock:
            return set(self._held)

    def tick(self, engine: Finishes, types: list[tuple[str, str]]) -> CleanupReport | None:
        """One pass over the duties this worker holds (None when it holds none)."""
        retention = [RETENTION] if engine.svc.config.retention_days > 0 else []
        held = self.hold([RECOVERY, PARTITIONS] + retention + [mark_done_duty(a, o) for a, o in types])
        if not held:
            return None
        mine = [(a, o) for a, o in types if mark_done_duty(a, o) in held]
        return cleanup(engine, types=mine, recover=RECOVERY in held, retain=RETENTION in held,
                       partition=PARTITIONS in held)

    def tick_schedule(self, engine: Finishes) -> CleanupReport | None:
        """The ``schedule`` duty, every SCHEDULE_EVERY_SEC (deadlines must fire within seconds, the other
        duties tick every ALYA_RECOVERY_SEC / 4): one lease upsert per worker and second, and for its holder
        two index probes (``batches_deadline``, ``batches_notbefore``). None when another worker holds it."""
        with self._store.tx() as tx:
            held = bool(tx.take_leases(holder=self._holder, duties=[SCHEDULE], sec=self.lease_sec))
        with self._lock:
            if held and SCHEDULE not in self._held:
                self._log.info("maintenance_duty_taken", duty=SCHEDULE, holder=self._holder)
            self._held = self._held | {SCHEDULE} if held else self._held - {SCHEDULE}
        if not held:
            return None
        report = CleanupReport()
        schedule(engine, report)
        return report

    # ------------------------------------------------------------------ the thread
    def start(self, engine: Finishes, types_of: Callable[[], list[tuple[str, str]]],
              on_ended: Callable[[list[str]], None] | None = None) -> None:
        """Tick every ``every`` seconds on a thread until :meth:`close`. ``on_ended`` is told the batches a
        tick ended (a missed summary, a deadline): no flow run ended them, so a run of their type must
        still show them (``jm.run`` hands them to one)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()

        def loop() -> None:
            next_tick = 0.0
            while True:
                reports = []
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self.every
                    try:
                        reports.append(self.tick(engine, types_of()))
                    except Exception as exc:  # an outage: the next tick tries again
                        self._log.error("maintenance_failed", error=describe(exc))
                try:
                    reports.append(self.tick_schedule(engine))
                except Exception as exc:
                    self._log.error("maintenance_failed", duty=SCHEDULE, error=describe(exc))
                ended = [b for r in reports if r is not None for b in r.summarised + r.deadlines]
                if ended and on_ended is not None:
                    try:
                        on_ended(ended)
                    except Exception as exc:  # only the Prefect view of those batches is at stake
                        self._log.warning("ended_batches_not_handed_over", error=describe(exc))
                if self._stop.wait(min(self.every, SCHEDULE_EVERY_SEC)):
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
            had, self._held = self._held, set()
        if had:
            try:
                with self._store.tx() as tx:
                    tx.drop_leases(holder=self._holder)
            except AlyaError as exc:  # they run out by themselves
                self._log.warning("maintenance_leases_kept", error=describe(exc))
