"""The processing engine: claim rows, run them, write their outcomes back, finish batches. No Prefect
here: the batch-type flows (``alya.prefect.flows``) call :meth:`Engine.work` inside their tasks.

The engine is split by role, each part with at most one lock of its own:

- :class:`~alya.engine.identity.Identity`: the worker id and its heartbeat;
- :class:`~alya.engine.producer.Producer`: the claim gate and the claims (what to run next);
- :class:`~alya.engine.executor.Executor`: the row pool and the processor calls;
- :class:`~alya.engine.completer.Completer`: write-backs and give-backs;
- :class:`~alya.engine.maintenance.Maintenance`: recovery, missed summaries, ``mark_done`` calls (one worker);
- :class:`~alya.engine.waker.Waker`: LISTEN/NOTIFY wake-ups; :class:`~alya.engine.notices.Notices`: what an
  abort or pause notice does to the claims held here.

This module wires them and runs the claim loop that drives them (:meth:`Engine.work`). The chunk is the unit
of database work, never of concurrency or of visibility: rows of many claims share the pool's slots; a claim
is written back at its end and at least every ``ALYA_FLUSH_SEC``; after a claim's last write-back commits,
one indexed look-up tells whether its batch has open rows left, and if not the batch is finished
(:mod:`alya.batch.finish`).
"""

from __future__ import annotations

import gc
import math
import threading
import time
from typing import Any

from alya.batch.control import DEADLINE_ERROR
from alya.batch.finish import Finisher
from alya.batch.services import Services
from alya.core.errors import AlyaError, ProcessorNotFound
from alya.core.logs import run_logger
from alya.core.names import work_payload
from alya.engine.claim import ChunkReport, Claimed
from alya.engine.completer import Completer
from alya.engine.executor import Executor
from alya.engine.identity import Identity
from alya.engine.maintenance import Maintenance
from alya.engine.notices import Notices
from alya.engine.producer import Producer
from alya.engine.waker import Waker

WAIT_SLICE_SEC = 0.02  # the claim loop looks at its claims at least this often
SHUTDOWN_MARGIN_SEC = 10.0  # beyond the row timeout: the last write-backs of a stopping claim loop
GC_FIRST_GENERATION = 10_000  # container allocations between young collections (Python's default: 700)


class Engine:
    """One per JobManager and process. Its own lock-free state is the ``stopping`` event and the condition
    claim loops wait on (``_wake``), signalled when a claim's last row finishes or an abort arrives."""

    def __init__(self, services: Services) -> None:
        self.svc = services
        self.stopping = threading.Event()
        self.identity = Identity(services.store, services.config.recovery_sec)
        self.finisher = Finisher(services)
        self.executor = Executor(services.config)
        self.producer = Producer(services, self.identity, self.executor)
        self.completer = Completer(services, self.identity, self.finisher)
        self.maintenance = Maintenance(services.store, self.identity, services.config.recovery_sec)
        self.waker = Waker(services.store)
        self._wake = threading.Condition()
        self.notices = Notices(services.store, self.producer, self._wake, self.identity)
        self.waker.on_abort = self.notices.abort_notified
        self.waker.on_pause = self.notices.pause_notified
        self._start_lock = threading.Lock()
        self._loops = 0  # claim loops running (Engine.work), under _loops_done's lock
        self._loops_done = threading.Condition()
        self._in_loop = threading.local()  # set on a thread while it runs a claim loop

    @property
    def worker_id(self) -> str:
        return self.identity.worker_id

    @property
    def log(self) -> Any:
        return self.identity.log

    @property
    def pool(self) -> Any:
        return self.executor.pool

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        """Register this worker (so its rows are not recovered from under it) and keep it alive."""
        with self._start_lock:
            if self.identity.start():
                _settle_gc()
                self.waker.start()

    def shutdown(self) -> None:
        """Stop: a claim loop on another thread finishes its running rows, gives back the unstarted ones
        and returns; then this worker leaves the ``workers`` table and closes its init blocks."""
        self.stopping.set()
        with self._wake:
            self._wake.notify_all()
        if not getattr(self._in_loop, "active", False):
            # Leave the workers table only once the claim loops have written back their running rows:
            # rows inprog under a worker that is gone are a dead worker's to recovery, and would run twice.
            # Bounded: a row past ALYA_ROW_TIMEOUT_SEC is finished as a timeout by its loop.
            with self._loops_done:
                if not self._loops_done.wait_for(lambda: self._loops == 0,
                                                 timeout=self.svc.config.row_timeout_sec + SHUTDOWN_MARGIN_SEC):
                    self.log.warning("shutdown_with_claim_loops_running", loops=self._loops)
        self.identity.stop()
        self.maintenance.close()
        self.executor.close()
        self.waker.close()
        self.svc.initblocks.close_all()

    # ------------------------------------------------------------------ what there is to do
    def _kinds(self, types: list[tuple[str, str]]) -> dict[tuple[str, str, str], tuple[str, str]]:
        """(app, op, kind) of each served type: B for batch processors, Q for slow-query processors."""
        out = {}
        for app, op in types:
            try:
                out[(app, op, self.svc.registry.processor(app, op).type)] = (app, op)
            except ProcessorNotFound:
                continue
        return out

    def types_with_work(self, types: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Types with a row to claim now, less those of apps whose init() is waiting to be retried."""
        waiting = self.producer.waiting_apps()
        kinds = self._kinds([t for t in types if t[0] not in waiting])
        with self.svc.store.tx() as tx:
            open_types = {(k.app, k.op, k.type) for k in tx.claimable_batch_types()}
        return [t for k, t in kinds.items() if k in open_types]

    def open_work(self, types: list[tuple[str, str]]) -> bool:
        keys = ["/".join(k) for k in self._kinds(types)]
        with self.svc.store.tx() as tx:
            return tx.open_work_exists(types=keys)

    def next_claimable_in(self, batch_id: str) -> float | None:
        """Seconds until a queued row of the batch may be claimed (0: now); None when none is queued."""
        with self.svc.store.tx() as tx:
            wait = tx.next_claimable_in(id=batch_id)
        return None if wait is None else max(0.0, wait)

    def init_retry_in(self, app: str) -> float:
        return self.producer.init_retry_in(app)

    # ------------------------------------------------------------------ the claim loop
    def process_chunk(self, app: str, op: str, only: str | None = None) -> ChunkReport:
        """One claim of ALYA_BATCHCHUNK_NROWS rows of one open batch of (app, op) (of batch ``only`` if
        given), run to the end: its rows, write-backs and, if it was the batch's last, the summary."""
        return self.work(app, op, only, seconds=math.inf, max_claims=1,
                         claim_size=self.svc.config.batchchunk_nrows)

    def work(self, app: str, op: str, only: str | None = None, *, seconds: float | None = None,
             max_claims: int | None = None, claim_size: int | None = None, linger: float = 0.0,
             stop: threading.Event | None = None) -> ChunkReport:
        """Claim and run rows of (app, op) (of batch ``only`` if given) for up to ``seconds`` (default
        ``ALYA_TASK_SECONDS``) or until ``stop`` is set: new claims stop then, claimed rows run to the end.
        With ``linger``, an idle loop waits up to that long (within ``seconds``) for work to be queued
        before it returns."""
        cfg = self.svc.config
        reg = self.svc.registry.processor(app, op)
        self.start()
        report = ChunkReport()
        log = run_logger(worker=self.worker_id, app=app, op=op)  # lines reach the Prefect run, from any thread
        start = time.monotonic()
        deadline = start + (cfg.task_seconds if seconds is None else seconds)
        linger_until = min(deadline, start + linger)
        wake_key = work_payload(app, op)
        with self._loops_done:
            self._loops += 1
        nested = getattr(self._in_loop, "active", False)
        self._in_loop.active = True
        try:
            return self._work(reg, app, op, only, report, log, start, deadline, linger_until, max_claims,
                              claim_size, stop, wake_key)
        finally:
            self._in_loop.active = nested
            with self._loops_done:
                self._loops -= 1
                self._loops_done.notify_all()

    def _work(self, reg: Any, app: str, op: str, only: str | None, report: ChunkReport, log: Any, start: float,
              deadline: float, linger_until: float, max_claims: int | None, claim_size: int | None,
              stop: threading.Event | None, wake_key: str) -> ChunkReport:
        """The claim loop of :meth:`work`."""
        cfg = self.svc.config
        active: list[Claimed] = []
        nclaims = 0
        idle = False  # the last claim found nothing: do not ask again before something changes
        next_flush = start + cfg.flush_sec
        turn = False  # a wake-up turn taken and not yet used by a claim (given back if never used)
        try:  # a claim loop that fails (an outage) must not leave its claims held here
            while True:
                now = time.monotonic()
                may_claim = (not self.stopping.is_set() and now < deadline
                             and (max_claims is None or nclaims < max_claims)
                             and (stop is None or not stop.is_set()))
                if may_claim and not idle and self.producer.wants_rows(app, op):
                    turn = False
                    claimed = self.producer.claim(reg, only, claim_size, log)
                    report.busy = claimed is not None and claimed.full
                    if claimed is not None:
                        claimed.wake = self._wake
                        claimed.limited = claimed.type == "B" and self.completer.has_failure_limit(claimed.batch)
                        self.executor.submit(claimed, reg)
                        if claimed.moved:
                            self.producer.announce(app, op, claimed.type, claimed.moved)
                        active.append(claimed)
                        nclaims += 1
                        report.batch = report.batch or claimed.batch
                        continue
                    idle = True
                if not active:
                    if idle and may_claim and now < linger_until:
                        if self.waker.wait_turn(wake_key, min(linger_until - now, next_flush - now)):
                            idle, turn = False, True
                        elif time.monotonic() >= next_flush:
                            next_flush = time.monotonic() + cfg.flush_sec
                            idle = False  # the polling fallback
                        continue
                    if may_claim and not idle:  # the type's backlog is full of other loops' rows: busy, not idle
                        self._wait(active, next_flush, eager=True)
                        continue
                    break
                if self.stopping.is_set():
                    for c in active:
                        c.cancelled = True  # unstarted rows are given back; running ones finish
                self._wait(active, next_flush, eager=may_claim and not idle)
                self.executor.expire()
                now = time.monotonic()
                flush_all = now >= next_flush
                if flush_all:
                    next_flush = now + cfg.flush_sec
                    idle = False
                done = [c for c in active if c.done]
                if done:
                    idle = False  # rows came free (an app limit) or went back to the queue (faults): look again
                due = done + [c for c in active if not c.done and (flush_all or c.flush_due(now, cfg.flush_sec))]
                if due:
                    self.completer.flush(due, report, log)
                elif flush_all:
                    self.completer.check_aborts(active, log)
                for c in done:
                    active.remove(c)
                    self.producer.forget(c)
                    self._claim_ended(c, report, log)
        except BaseException:
            self._abandon(active, log)
            raise
        finally:
            if turn:
                self.waker.give_back(wake_key)
        return report

    def _wait(self, active: list[Claimed], next_flush: float, eager: bool) -> None:
        """Until a claim is done, the next flush, or a short slice (to top up the slots and check
        timeouts); no wait at all when a claim already finished."""
        timeout = min(next_flush - time.monotonic(), WAIT_SLICE_SEC)
        if eager:
            timeout = min(timeout, 0.005)
        with self._wake:
            if not any(c.done for c in active) and not self.stopping.is_set():
                self._wake.wait(max(0.0, timeout))

    def _abandon(self, claims: list[Claimed], log: Any) -> None:
        """The claim loop failed with these claims in flight (a database outage, mostly). They are no longer
        held here, or this process would wait for them for ever (a suspect row is only claimed while nothing
        is held; a stop_when_idle worker then never got idle). Their unstarted rows are not run. Rows of theirs
        not written back are inprog under their worker identity: it is retired, so that recovery requeues them
        after ALYA_RECOVERY_SEC (rows must never stay inprog under a live heartbeat)."""
        if not claims:
            return
        for c in claims:
            c.cancelled = c.lost = True
            self.producer.forget(c)
        log.error("claims_abandoned", claims=len(claims), rows_unwritten=sum(c.unwritten for c in claims),
                  note="left to recovery")
        for worker in {c.worker for c in claims if not c.aborted}:
            self.identity.retire(worker)

    def _claim_ended(self, c: Claimed, report: ChunkReport, log: Any) -> None:
        """Every row of the claim has an outcome written (or was skipped): give back the skipped ones, and
        finish the batch if this was its last open row."""
        if c.skipped and not c.aborted:
            self.completer.release(c, c.skipped)
        if c.lost:  # its write-back failed for good (its finished rows were given back already)
            return
        if c.aborted:
            log.info("claim_stopped_batch_aborted", batch=c.batch, unstarted=len(c.skipped))
            return
        # Checked after our own commit, never inside it: two workers committing the last rows of a batch
        # at once would each see the other's rows still inprog in their own transaction, and neither
        # would summarise. After the commit, whoever commits last is sure to see every row final.
        # A slow query's one row: the summary's own check (under the batch's lock) is the only one needed,
        # one transaction less on the path a web call waits on.
        if c.ended:  # summarised by its write-back (a slow query): only mark_done is left
            report.summarised.append(c.batch)
            self.notify(c.batch)
            return
        if len(c.skipped) < len(c.rows) and (c.type == "Q" or self.all_final(c.batch, after=c.rows[-1].line)):
            try:
                if self.summarise(c.batch):
                    report.summarised.append(c.batch)
            except AlyaError as exc:  # a failed upload: the batch stays open; cleanup() tries again
                log.error("summary_failed", batch=c.batch, error=str(exc))

    # ------------------------------------------------------------------ finishing
    def all_final(self, batch: str, after: int | None = None) -> bool:
        """Whether every row of the batch is final. Queued rows past this claim answer "no" cheaply, which
        is the usual case; only near the end of a batch is the full check (both partial indexes from the
        start, past the index entries of rows already done) worth its cost."""
        with self.svc.store.tx() as tx:
            if after is not None and tx.queued_after(id=batch, after=after):
                return False
            return not tx.has_open_rows(id=batch)

    def summarise(self, batch_id: str) -> bool:
        """Finish the batch if all its rows are final (exactly once), then call its mark_done."""
        if not self.finisher.summarise(batch_id):
            return False
        self.notify(batch_id)
        return True

    def notify(self, batch_id: str) -> bool:
        return self.finisher.notify(batch_id)

    def stop_if_too_many_failures(self, batch_id: str) -> bool:
        return self.finisher.stop_if_too_many_failures(batch_id)

    def deadline_passed(self, batch_id: str) -> bool:
        """End the batch, its deadline passed (``Finisher.stop``), then call its mark_done (here if this
        process has its processor, else by the holder of its type's mark_done duty)."""
        if not self.finisher.stop(batch_id, DEADLINE_ERROR):
            return False
        self.notify(batch_id)
        return True


_gc_settled = False


def _settle_gc() -> None:
    """Once per worker process: what is alive when the engine starts (Prefect, pydantic, SQLAlchemy, the
    app: about a million objects) lives as long as the process, yet every full collection walked it again,
    and the row path makes full collections frequent (a few short-lived containers per row). Freezing it
    takes it out of the collector's sight, and a larger first generation collects the short-lived ones
    in fewer passes. Measured on ``bench noop``: the worker's CPU per row fell and rows/s rose (see
    bench/README.md). Cyclic garbage made before this point is collected first, never frozen."""
    global _gc_settled
    if _gc_settled:
        return
    _gc_settled = True
    gc.collect()
    gc.freeze()
    first, second, third = gc.get_threshold()
    gc.set_threshold(max(first, GC_FIRST_GENERATION), second, third)
