"""The processing engine: claim rows, run them, write their outcomes back, finish batches. No Prefect
here: the batch-type flows (``alya.prefect.flows``) call :meth:`Engine.work` inside their tasks.

The chunk is the unit of database work, never of concurrency or of visibility:

- **Claims** are one statement each (FOR UPDATE SKIP LOCKED over the partial index of queued rows), sized
  to about ``CLAIM_TARGET_SEC`` of work at the measured row rate (capped by ``ALYA_BATCHCHUNK_NROWS``), and
  taken while earlier claims still run, so the slots never starve and no worker hoards rows.
- **Rows** run in the process's :class:`~alya.engine.rowpool.RowPool`: up to ``ALYA_CONCURRENCY`` at once, across
  claims and batches. A call past ``ALYA_ROW_TIMEOUT_SEC`` is a fault and frees its slot.
- **Write-backs** are one statement per batch, at the end of a claim and at least every
  ``ALYA_FLUSH_SEC`` for rows already done: a crash replays at most about one flush of work per slot, and
  every flush is an abort check (an aborted batch's unstarted rows are dropped; rows that finished before
  the abort keep their results).
- After a claim's last write-back commits, one indexed look-up tells whether its batch has open rows left;
  if not, the batch is finished (``alya.batch.finish``).

Lock order everywhere: the batch row before its rows (claim of a queued batch, write-back, release,
abort, summary), so that no two of them can deadlock.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import math
import os
import socket
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from alya.batch.finish import Finisher
from alya.batch.outcomes import Outcome, accepted, fault, stored_size
from alya.batch.services import Services
from alya.core import names
from alya.core.errors import AlyaError, ProcessorNotFound
from alya.core.logs import get_logger, run_logger, status_change
from alya.core.models import BatchStatus
from alya.core.records import AppLoad, BatchKind, BatchState, ClaimedRow, OpenBatch, WriteResult
from alya.core.registry import Registration
from alya.engine.rowpool import Job, RowPool
from alya.engine.waker import Waker

CLAIM_TARGET_SEC = 0.5  # work per claim at the measured rate: short enough that no worker hoards rows
WRITE_TRIES = 4
WRITE_PART_BYTES = 128 * 2**20  # a write-back statement carries at most this much result text
WAIT_SLICE_SEC = 0.02  # the claim loop looks at its claims at least this often
FLUSH_ROWS = 100  # this many finished rows are written back once they are FLUSH_ROWS_AGE_SEC old...
FLUSH_ROWS_AGE_SEC = 0.05  # ...so that a crash replays little even for fast rows (ALYA_FLUSH_SEC bounds all)
INIT_RETRY_SEC = 1.0  # first delay after an app's init() failed; doubles per failure
INIT_RETRY_MAX_SEC = 30.0
GC_FIRST_GENERATION = 10_000  # container allocations between young collections (Python's default: 700)


@dataclass
class ChunkReport:
    """What one call of :meth:`Engine.work` did; small and JSON-friendly, because it crosses the Prefect
    task boundary."""

    batch: str | None = None
    nrows: int = 0
    nsuccess: int = 0
    nfailed: int = 0
    nretry: int = 0
    summarised: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "nrows": self.nrows, "nsuccess": self.nsuccess, "nfailed": self.nfailed,
                "nretry": self.nretry, "summarised": self.summarised}


@dataclass(eq=False)
class Claimed:
    """Rows this worker claimed in one statement, and what became of them so far. It owns the rows' jobs
    in the row pool: ``finish`` is called once per row, from whichever slot or timeout got there first."""

    batch: str
    app: str
    op: str
    type: str
    context: dict[str, Any]
    rows: list[ClaimedRow]  # ordered by line
    worker: str  # the identity the rows were claimed under (and are written back as)
    ver: int = 0  # the batch's status version when claimed (for cache invalidation)
    cancelled: bool = False  # unstarted rows are not run (stopping worker, aborted batch)
    suspect: bool = False  # one row held by a worker that died: this process holds nothing else meanwhile
    aborted: bool = False  # the batch was aborted: nothing is given back, no summary
    lost: bool = False  # its write-back failed for good: its rows were given back (or are recovered)
    processor: Any = None
    initblock: Any = None
    log: Any = None
    wake: threading.Condition | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.pending = len(self.rows)
        self.outcomes: list[Outcome] = []
        self.first_outcome_at = 0.0  # monotonic time of the oldest outcome not yet written
        self.skipped: list[int] = []  # lines never started

    def finish(self, job: Job, outcome: Outcome | None) -> bool:
        with self._lock:
            if job.done:
                return False
            job.done = True
            if outcome is None:
                self.skipped.append(job.row.line)
            else:
                if not self.outcomes:
                    self.first_outcome_at = time.monotonic()
                self.outcomes.append(outcome)
            self.pending -= 1
            last = self.pending == 0
        if last and self.wake is not None:
            with self.wake:
                self.wake.notify_all()
        return True

    def take(self) -> list[Outcome]:
        with self._lock:
            out, self.outcomes = self.outcomes, []
        return out

    def flush_due(self, now: float, flush_sec: float) -> bool:
        """Whether its finished rows should be written now, before the claim ends: at least every
        ``flush_sec``, and sooner when many have piled up (a crash replays only what is not written)."""
        if not self.outcomes:
            return False
        age = now - self.first_outcome_at
        return age >= flush_sec or (len(self.outcomes) >= FLUSH_ROWS and age >= FLUSH_ROWS_AGE_SEC)

    @property
    def done(self) -> bool:
        return self.pending == 0


class Engine:
    """One per JobManager and process: the worker identity and its heartbeat, the claim loop, the row
    pool, the write-back. The init blocks are the registry's (``InitBlocks``); finishing a batch is the
    :class:`~alya.batch.finish.Finisher`'s."""

    def __init__(self, services: Services) -> None:
        self.svc = services
        cfg = services.config
        self.worker_id = _new_worker_id()
        self.stopping = threading.Event()
        self.finisher = Finisher(services)
        self.pool = RowPool(_Runner(self), cfg.concurrency, cfg.row_timeout_sec)
        self.waker = Waker(services.store)
        self.waker.on_abort = self._abort_notified
        self._claims: dict[str, set[Claimed]] = {}  # batch -> claims in flight here (abort notices, suspects)
        self._claiming = 0  # claim statements under way in this process
        self._alone_claiming = False  # one of them may take a suspect: the others wait
        self._suspect_active = False
        self._wake = threading.Condition()
        self._init_failures: dict[str, tuple[int, float]] = {}  # app -> (failures in a row, retry at)
        self._claim_hint: dict[str, int] = {}  # batch -> last line claimed here: where the next scan starts
        self._hb_thread: threading.Thread | None = None
        self._hb_stop = threading.Event()
        self._server_started: Any = None  # PostgreSQL's start time at the last heartbeat
        self._lock = threading.RLock()  # _beat may retire the identity while start() holds it
        self._claim_turn = threading.Condition(self._lock)
        self.log = get_logger().bind(worker=self.worker_id)

    # ------------------------------------------------------------------ worker identity
    def start(self) -> None:
        """Register this worker (so its rows are not recovered from under it) and keep it alive."""
        with self._lock:
            if self._hb_thread is not None and self._hb_thread.is_alive():
                return
            self._beat()
            _settle_gc()
            self.waker.start()
            self._hb_stop.clear()
            self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="alya-heartbeat", daemon=True)
            self._hb_thread.start()

    def shutdown(self) -> None:
        """Stop: a claim loop on another thread finishes its running rows, gives back the unstarted ones
        and returns; then this worker leaves the ``workers`` table and closes its init blocks."""
        self.stopping.set()
        with self._wake:
            self._wake.notify_all()
        self._hb_stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join(timeout=5)
            self._hb_thread = None
        try:
            with self.svc.store.tx() as tx:
                tx.run("forget_worker", id=self.worker_id)
        except AlyaError as exc:
            self.log.warning("forget_worker_failed", error=str(exc))
        self.pool.close()
        self.waker.close()
        self.svc.initblocks.close_all()

    def _beat(self) -> None:
        """Say this worker is alive. A PostgreSQL restart since the last beat may have lost write-backs that
        were acknowledged (they commit with synchronous_commit off): their rows would stay inprog under
        this live worker for ever. So the worker stops vouching for what it held before the restart (a new
        identity): recovery requeues those rows after ALYA_RECOVERY_SEC, as for a dead worker, and rows
        whose results did land stay as they are."""
        with self.svc.store.tx() as tx:
            started = tx.value("server_started")
            tx.run("heartbeat", id=self.worker_id, host=socket.gethostname(), pid=os.getpid())
        previous, self._server_started = self._server_started, started
        if previous is not None and started != previous:
            self.log.warning("postgres_restarted", previous=str(previous), now=str(started),
                             note="rows held before the restart are left to recovery")
            self._retire_identity(self.worker_id)

    def _heartbeat_loop(self) -> None:
        interval = max(0.5, self.svc.config.recovery_sec / 4)
        while not self._hb_stop.wait(interval):
            try:
                self._beat()
            except Exception as exc:  # keep beating through outages
                self.log.warning("heartbeat_failed", error=str(exc))

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
        now = time.monotonic()
        waiting = {app for app, (n, at) in list(self._init_failures.items()) if n and now < at}
        kinds = self._kinds([t for t in types if t[0] not in waiting])
        with self.svc.store.tx() as tx:
            open_types = {(k.app, k.op, k.type) for k in tx.records(BatchKind, "claimable_batch_types")}
        return [t for k, t in kinds.items() if k in open_types]

    def open_work(self, types: list[tuple[str, str]]) -> bool:
        keys = ["/".join(k) for k in self._kinds(types)]
        with self.svc.store.tx() as tx:
            return bool(tx.value("open_work_exists", types=keys))

    def next_claimable_in(self, batch_id: str) -> float | None:
        """Seconds until a queued row of the batch may be claimed (0: now); None when none is queued."""
        with self.svc.store.tx() as tx:
            wait = tx.value("next_claimable_in", id=batch_id)
        return None if wait is None else max(0.0, float(wait))

    def wait_for_work(self, timeout: float) -> bool:
        """Sleep until work is notified (True), ``timeout`` passes or the worker stops (False)."""
        if self.stopping.is_set():
            return False
        return self.waker.wait(timeout) and not self.stopping.is_set()

    # ------------------------------------------------------------------ the claim loop
    def process_chunk(self, app: str, op: str, only: str | None = None) -> ChunkReport:
        """One claim of ALYA_BATCHCHUNK_NROWS rows of one open batch of (app, op) (of batch ``only`` if
        given), run to the end: its rows, write-backs and, if it was the batch's last, the summary."""
        return self.work(app, op, only, seconds=math.inf, max_claims=1,
                         claim_size=self.svc.config.batchchunk_nrows)

    def work(self, app: str, op: str, only: str | None = None, *, seconds: float | None = None,
             max_claims: int | None = None, claim_size: int | None = None, linger: float = 0.0) -> ChunkReport:
        """Claim and run rows of (app, op) (of batch ``only`` if given) for up to ``seconds`` (default
        ``ALYA_TASK_SECONDS``): new claims stop then, claimed rows run to the end. With ``linger``, an idle
        loop waits up to that long (within ``seconds``) for work to be queued before it returns."""
        cfg = self.svc.config
        reg = self.svc.registry.processor(app, op)
        self.start()
        report = ChunkReport()
        log = run_logger(worker=self.worker_id, app=app, op=op)  # lines reach the Prefect run, from any thread
        start = time.monotonic()
        deadline = start + (cfg.task_seconds if seconds is None else seconds)
        linger_until = min(deadline, start + linger)
        active: list[Claimed] = []
        nclaims = 0
        idle = False  # the last claim found nothing: do not ask again before something changes
        next_flush = start + cfg.flush_sec
        since = self.waker.generation() if linger else 0
        try:  # a claim loop that fails (an outage) must not leave its claims held here
            while True:
                now = time.monotonic()
                may_claim = (not self.stopping.is_set() and now < deadline
                             and (max_claims is None or nclaims < max_claims))
                if may_claim and not idle and self._wants_rows(app, op, active):
                    claimed = self._claim_ready(reg, only, claim_size, log)
                    if claimed is not None:
                        active.append(claimed)
                        nclaims += 1
                        report.batch = report.batch or claimed.batch
                        continue
                    idle = True
                if not active:
                    if idle and may_claim and now < linger_until:
                        if self.waker.wait(min(linger_until - now, next_flush - now), since=since):
                            since = self.waker.generation()
                            idle = False
                        elif time.monotonic() >= next_flush:
                            next_flush = time.monotonic() + cfg.flush_sec
                            idle = False  # the polling fallback
                        continue
                    break
                if self.stopping.is_set():
                    for c in active:
                        c.cancelled = True  # unstarted rows are given back; running ones finish
                self._wait(active, next_flush, eager=may_claim and not idle)
                self.pool.expire()
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
                    self._flush(due, report, log)
                elif flush_all:
                    self._check_aborts(active, log)
                for c in done:
                    active.remove(c)
                    self._forget(c)
                    self._claim_ended(c, report, log)
        except BaseException:
            self._abandon(active, log)
            raise
        return report

    def _abort_notified(self, batch: str) -> None:
        """An abort was committed (NOTIFY): stop starting the batch's rows now. The next write-back of its
        claims sees the abort and keeps the results of rows that finished before it."""
        with self._lock:
            claims = list(self._claims.get(batch, ()))
        for c in claims:
            c.cancelled = True
        if claims:
            self.log.info("abort_notified", batch=batch, claims=len(claims))
            with self._wake:
                self._wake.notify_all()

    def _forget(self, c: Claimed) -> None:
        with self._lock:
            claims = self._claims.get(c.batch)
            if claims is not None:
                claims.discard(c)
                if not claims:
                    del self._claims[c.batch]
            if c.suspect:
                self._suspect_active = False

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
            self._forget(c)
        unwritten = sum(c.pending + len(c.outcomes) for c in claims)
        log.error("claims_abandoned", claims=len(claims), rows_unwritten=unwritten, note="left to recovery")
        for worker in {c.worker for c in claims if not c.aborted}:
            self._retire_identity(worker)

    def _wants_rows(self, app: str, op: str, active: list[Claimed]) -> bool:
        """Whether to claim more now: when fewer rows wait unstarted than the slots will run through
        before the next claim could be ready (so they never starve)."""
        unstarted = self.pool.backlog()
        return unstarted < max(2 * self.pool.concurrency, self._claim_size(app, op) // 2)

    def _claim_size(self, app: str, op: str) -> int:
        """About CLAIM_TARGET_SEC of work for this process's slots at the measured row rate, shared by the
        claim loops running at once (``ALYA_WORKER_THREADS``)."""
        cfg = self.svc.config
        stats = self.pool.stats.get((app, op))
        if stats is None or stats.row_sec <= 0:
            return min(cfg.batchchunk_nrows, 2 * cfg.concurrency)
        rate = cfg.concurrency / stats.row_sec
        n = math.ceil(CLAIM_TARGET_SEC * rate / max(1, cfg.worker_threads))
        return max(1, min(cfg.batchchunk_nrows, max(cfg.concurrency, n)))

    def _wait(self, active: list[Claimed], next_flush: float, eager: bool) -> None:
        """Until a claim is done, the next flush, or a short slice (to top up the slots and check
        timeouts); no wait at all when a claim already finished."""
        timeout = min(next_flush - time.monotonic(), WAIT_SLICE_SEC)
        if eager:
            timeout = min(timeout, 0.005)
        with self._wake:
            if not any(c.done for c in active) and not self.stopping.is_set():
                self._wake.wait(max(0.0, timeout))

    def _claim_ready(self, reg: Registration, only: str | None, size: int | None, log: Any) -> Claimed | None:
        """A claim with its init block, its rows submitted to the pool; None when there is nothing to
        claim (or the app's init() is failing: its rows then stay queued, untouched)."""
        ok, initblock = self._initblock(reg.app)
        if not ok:
            return None
        claimed = self._claim(reg.app, reg.op, reg.type, only, size or self._claim_size(reg.app, reg.op))
        if claimed is None:
            return None
        claimed.processor, claimed.initblock, claimed.log, claimed.wake = reg.processor, initblock, log, self._wake
        if claimed.suspect:
            log.warning("suspect_row_alone", batch=claimed.batch, line=claimed.rows[0].line,
                        attempt=claimed.rows[0].attempts, note="its worker died holding it; run with nothing else")
        method = reg.processor.do_slow_query if reg.type == "Q" else reg.processor.do_batch_job
        is_async = inspect.iscoroutinefunction(method)
        self.pool.submit([Job(claimed, row, is_async) for row in claimed.rows], stats_key=(reg.app, reg.op))
        return claimed

    def _claim_ended(self, c: Claimed, report: ChunkReport, log: Any) -> None:
        """Every row of the claim has an outcome written (or was skipped): give back the skipped ones, and
        finish the batch if this was its last open row."""
        if c.skipped and not c.aborted:
            self._release(c, c.skipped)
        if c.lost:  # its write-back failed for good (its finished rows were given back already)
            return
        if c.aborted:
            log.info("claim_stopped_batch_aborted", batch=c.batch, unstarted=len(c.skipped))
            return
        # Checked after our own commit, never inside it: two workers committing the last rows of a batch
        # at once would each see the other's rows still inprog in their own transaction, and neither
        # would summarise. After the commit, whoever commits last is sure to see every row final.
        if len(c.skipped) < len(c.rows) and self._all_final(c.batch, after=c.rows[-1].line):
            try:
                if self.summarise(c.batch):
                    report.summarised.append(c.batch)
            except AlyaError as exc:  # a failed upload: the batch stays open; cleanup() tries again
                log.error("summary_failed", batch=c.batch, error=str(exc))

    # ------------------------------------------------------------------ write-back
    def _flush(self, claims: list[Claimed], report: ChunkReport, log: Any) -> None:
        """One write-back statement per batch for the outcomes of these claims (an abort check too)."""
        by_batch: dict[str, list[Claimed]] = {}
        for c in claims:
            by_batch.setdefault(c.batch, []).append(c)
        for batch, group in by_batch.items():
            taken = [(c, c.take()) for c in group]
            outcomes = [o for _, os_ in taken for o in os_]
            if not outcomes:
                if not any(c.aborted for c in group):
                    self._check_aborts(group, log)
                continue
            try:
                res = self._write(group[0], outcomes, log)
            except AlyaError:
                for c in group:  # _write gave the rows back (or retired this identity): drop the claims
                    c.cancelled = c.lost = True
                continue
            statuses = [o.status for o in outcomes]
            report.nrows += len(outcomes)
            report.nsuccess += statuses.count("success")
            report.nfailed += statuses.count("failed")
            report.nretry += statuses.count("queued")
            if res.written < len(outcomes):  # recovered from under us, or aborted: those answers are dropped
                log.warning("results_discarded", batch=batch, rows=len(outcomes) - res.written, written=res.written)
            if res.status == BatchStatus.ABORTED.value:
                self._aborted_seen(group, log)
                if res.late:
                    log.info("results_kept_after_abort", batch=batch, rows=res.late)
            else:
                lines = [o.line for o in outcomes]
                log.info("rows_written", batch=batch, rows=len(outcomes), success=statuses.count("success"),
                         failed=statuses.count("failed"), retry=statuses.count("queued"),
                         first_line=min(lines), last_line=max(lines))
                # Progress reaches pollers by itself: an open batch's cached summary expires within
                # summary.OPEN_TTL_SEC. Invalidating it here made every worker cause a recount of the
                # whole batch (O(rows)) every few seconds; now a polled batch is counted once per TTL.

    def _write(self, claimed: Claimed, outcomes: list[Outcome], log: Any) -> WriteResult:
        """The write-back statement. Idempotent (only rows still held at the claimed attempt change), so it
        is simply repeated through a short outage. If it cannot be written, the rows are given back; if
        even that fails, this worker drops its identity, and recovery requeues the rows as it does for a
        dead worker (they must never stay inprog under a live heartbeat)."""
        parts = [_columns(p) for p in _by_size(outcomes, WRITE_PART_BYTES)]
        delay = 0.2
        for attempt in range(1, WRITE_TRIES + 1):
            try:
                with self.svc.store.tx() as tx:
                    # One statement, unless the results are too large for one message (PostgreSQL refuses a
                    # statement of about 1 GB): then one per part, in the same transaction.
                    results = [self._write_part(tx, claimed, p) for p in parts]
                    res = WriteResult(results[-1].status, sum(r.written for r in results),
                                      sum(r.late for r in results),
                                      next((r.ver for r in reversed(results) if r.ver is not None), None))
                    if any(o.status == "queued" for o in outcomes):  # retries become claimable later
                        tx.one("notify_work", channel=names.WORK_CHANNEL,
                               payload=names.work_payload(claimed.app, claimed.op))
                if res.late:  # results kept past an abort changed the final counts: re-cache them
                    self.finisher.refresh_summary(claimed.batch)
                return res
            except AlyaError as exc:
                log.warning("write_failed", batch=claimed.batch, attempt=attempt, error=str(exc))
                if attempt == WRITE_TRIES:
                    self._release(claimed, [o.line for o in outcomes])
                    raise
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    @staticmethod
    def _write_part(tx: Any, claimed: Claimed, params: dict[str, list[Any]]) -> WriteResult:
        """The usual write-back; after an abort, a second statement keeps the results of rows whose call
        returned before the abort committed (the hot path never pays for that case)."""
        res: WriteResult = tx.record(WriteResult, "write_results", batch=claimed.batch, worker=claimed.worker,
                                     **params)
        if res.status != BatchStatus.ABORTED.value or res.written == len(params["lines"]):
            return res
        late, ver = tx.one("write_results_late", batch=claimed.batch, worker=claimed.worker, **params)
        return WriteResult(res.status, res.written + int(late), int(late), ver)

    def _check_aborts(self, claims: list[Claimed], log: Any) -> None:
        """An abort check for claims with nothing to write yet (rows still running)."""
        open_claims = [c for c in claims if not c.aborted]
        if not open_claims:
            return
        try:
            with self.svc.store.tx() as tx:
                states: list[BatchState] = tx.records(BatchState, "batch_statuses",
                                                      ids=list({c.batch for c in open_claims}))
            statuses = {s.id: s.status for s in states}
        except AlyaError as exc:
            log.warning("abort_check_failed", error=str(exc))
            return
        for c in open_claims:
            if statuses.get(c.batch) in (None, BatchStatus.ABORTED.value):
                self._aborted_seen([c], log)

    def _aborted_seen(self, claims: list[Claimed], log: Any) -> None:
        for c in claims:
            if not c.aborted:
                c.aborted = c.cancelled = True
                log.info("batch_aborted_seen", batch=c.batch, rows_unfinished=c.pending)

    # ------------------------------------------------------------------ claim, release
    def _claim(self, app: str, op: str, type_: str, only: str | None, n: int | None = None) -> Claimed | None:
        """One claim statement (per batch tried). A suspect row (held by a worker that died) is only taken
        by a claim that starts while this process holds and claims nothing else, and nothing else is claimed
        while it runs: a death while holding it is then its own."""
        with self._claim_turn:
            # another claim that may take a suspect is under way: wait for it (a few ms), then look again
            self._claim_turn.wait_for(lambda: not self._alone_claiming, timeout=5.0)
            if self._suspect_active or self._alone_claiming:
                return None  # a suspect runs alone in this process
            alone = not self._claims and self._claiming == 0
            self._alone_claiming = alone  # other claim loops wait for this one claim (rare: an idle process)
            self._claiming += 1
        claimed = None
        try:
            claimed = self._claim_locked(app, op, type_, only, n, alone=alone)
        finally:
            with self._claim_turn:
                self._claiming -= 1
                if alone:
                    self._alone_claiming = False
                if claimed is not None:
                    self._claims.setdefault(claimed.batch, set()).add(claimed)
                    self._suspect_active = claimed.suspect
                self._claim_turn.notify_all()
        return claimed

    def _claim_locked(self, app: str, op: str, type_: str, only: str | None, n: int | None,
                      alone: bool) -> Claimed | None:
        n = n or self.svc.config.batchchunk_nrows
        worker = self.worker_id
        moved: list[tuple[str, int]] = []
        claimed = None
        limit = self.svc.config.app_limits.get(app)
        with self.svc.store.tx() as tx:
            if limit is not None:  # ALYA_APP_LIMITS: never more of the app's rows in progress, all workers together
                total, mine, live = tx.record(AppLoad, "app_rows_in_progress", app=app, worker=worker,
                                              sec=self.svc.config.recovery_sec).as_tuple()
                fair = -(-limit // max(1, live))  # a fair share each, so that every live worker gets some
                n = min(n, limit - total, fair - mine)
                if n <= 0:
                    return None
            for ob in tx.records(OpenBatch, "open_batches", app=app, op=op, type=type_, only=only):
                batch, ver = ob.id, ob.ver
                if ob.status is BatchStatus.QUEUED and (bumped := tx.value("batch_to_inprog", batch=batch)) is not None:
                    # The batch row is locked before its rows, the order abort takes them in: rows first
                    # would deadlock with an abort arriving during the claim (and fail one of the two).
                    ver = int(bumped)
                    moved.append((batch, ver))
                if alone:
                    suspect: list[ClaimedRow] = tx.records(ClaimedRow, "claim_suspect", batch=batch, worker=worker)
                    if suspect:
                        claimed = Claimed(batch, app, op, type_, ob.context, suspect, worker, ver, suspect=True)
                        break
                after = self._claim_hint.get(batch, 0)
                rows: list[ClaimedRow] = tx.records(ClaimedRow, "claim_rows", batch=batch, n=n, worker=worker,
                                                    after=after)
                if len(rows) < n and after > 0:  # rows requeued behind the hint (faults, recovery)
                    rows += tx.records(ClaimedRow, "claim_rows", batch=batch, n=n - len(rows), worker=worker,
                                       after=0)
                if rows:
                    if len(self._claim_hint) > 1000:
                        self._claim_hint.clear()
                    self._claim_hint[batch] = max(r.line for r in rows)
                    claimed = Claimed(batch, app, op, type_, ob.context, sorted(rows, key=lambda r: r.line),
                                      worker, ver)
                    break
        for batch, ver in moved:
            status_change(app, op, batch, "inprog", old="queued")
            self.svc.summaries.invalidate(batch, ver)
        return claimed

    def _release(self, claimed: Claimed, lines: list[int]) -> bool:
        """Give claimed rows back to the queue, their attempt restored (they were not tried). If even that
        fails, this worker stops vouching for them (a new identity): rows must never stay inprog under a
        live heartbeat, and recovery requeues them after ALYA_RECOVERY_SEC as for a dead worker."""
        try:
            with self.svc.store.tx() as tx:
                attempts = {r.line: r.attempts for r in claimed.rows}
                tx.run("release_rows", batch=claimed.batch, lines=lines, attempts=[attempts[x] for x in lines],
                       worker=claimed.worker)
                tx.one("notify_work", channel=names.WORK_CHANNEL,
                       payload=names.work_payload(claimed.app, claimed.op))
            return True
        except Exception as exc:
            self.log.error("release_failed", batch=claimed.batch, rows=len(lines), error=_describe(exc))
            self._retire_identity(claimed.worker)
            return False

    def _retire_identity(self, worker: str) -> None:
        """Stop vouching for rows held as ``worker``: a new identity is used from now on and the old one
        ages out of ``workers``, so recovery requeues whatever it still holds after ALYA_RECOVERY_SEC."""
        with self._lock:
            if self.worker_id != worker:
                return
            self.worker_id = _new_worker_id()
            self.log = get_logger().bind(worker=self.worker_id)
        self.log.error("worker_identity_retired", old=worker)
        with contextlib.suppress(Exception):  # the heartbeat thread keeps trying
            self._beat()

    # ------------------------------------------------------------------ helpers
    def init_retry_in(self, app: str) -> float:
        """Seconds until the app's failed init() is tried again (0: not waiting)."""
        failures, retry_at = self._init_failures.get(app, (0, 0.0))
        return max(0.0, retry_at - time.monotonic()) if failures else 0.0

    def _initblock(self, app: str) -> tuple[bool, Any]:
        """The app's init block, or (False, None) while init() fails (and during its retry delay)."""
        failures, retry_at = self._init_failures.get(app, (0, 0.0))
        if failures and time.monotonic() < retry_at:
            return False, None
        try:
            block = self.svc.initblocks.get(app)
        except Exception as exc:
            failures += 1
            delay = min(INIT_RETRY_MAX_SEC, INIT_RETRY_SEC * 2 ** (failures - 1))
            self._init_failures[app] = (failures, time.monotonic() + delay)
            self.log.error("init_failed", app=app, error=_describe(exc), failures=failures, retry_in=delay)
            return False, None
        self._init_failures.pop(app, None)
        return True, block

    def _all_final(self, batch: str, after: int | None = None) -> bool:
        """Whether every row of the batch is final. Queued rows past this claim answer "no" cheaply, which
        is the usual case; only near the end of a batch is the full check (both partial indexes from the
        start, past the index entries of rows already done) worth its cost."""
        with self.svc.store.tx() as tx:
            if after is not None and tx.one("queued_after", id=batch, after=after) is not None:
                return False
            return not tx.value("has_open_rows", id=batch)

    def summarise(self, batch_id: str) -> bool:
        """Finish the batch if all its rows are final (exactly once), then call its mark_done."""
        if not self.finisher.summarise(batch_id):
            return False
        self.notify(batch_id)
        return True

    def notify(self, batch_id: str) -> bool:
        return self.finisher.notify(batch_id)


class _Runner:
    """The processor call of one row, as the row pool runs it: never raises, always an Outcome."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.cfg = engine.svc.config

    def run(self, job: Job) -> Outcome:
        c: Claimed = job.owner  # type: ignore[assignment]
        row = job.row
        try:
            value = orjson.loads(row.input)
            if c.type == "Q":
                result = c.processor.do_slow_query(c.initblock, c.context, value)
            else:
                result = c.processor.do_batch_job(c.initblock, c.context, row.line, value)
            outcome = accepted(row.line, row.attempts, result, c.type == "Q")
        except (Exception, SystemExit) as exc:  # SystemExit: a processor calling sys.exit() is a fault too
            return self._fault(c, row, _describe(exc), traceback.format_exc(limit=3))
        self._logged(c, outcome)
        return outcome

    async def run_async(self, job: Job) -> Outcome:
        c: Claimed = job.owner  # type: ignore[assignment]
        row = job.row
        try:
            value = orjson.loads(row.input)
            if c.type == "Q":
                result = await c.processor.do_slow_query(c.initblock, c.context, value)
            else:
                result = await c.processor.do_batch_job(c.initblock, c.context, row.line, value)
            outcome = accepted(row.line, row.attempts, result, c.type == "Q")
        except Exception as exc:
            return self._fault(c, row, _describe(exc), traceback.format_exc(limit=3))
        self._logged(c, outcome)
        return outcome

    def timed_out(self, job: Job, seconds: float) -> Outcome:
        c: Claimed = job.owner  # type: ignore[assignment]
        error = f"row timed out after {seconds:.1f} s (ALYA_ROW_TIMEOUT_SEC={self.cfg.row_timeout_sec:g})"
        return self._fault(c, job.row, error, None)

    def _fault(self, c: Claimed, row: ClaimedRow, error: str, trace: str | None) -> Outcome:
        outcome = fault(row.line, row.attempts, error, self.cfg.max_attempts, self.cfg.retry_backoff_sec)
        c.log.warning("row_fault", batch=c.batch, line=row.line, attempt=row.attempts, old="inprog",
                      new=outcome.status, error=error, trace=trace if outcome.status == "failed" else None)
        return outcome

    @staticmethod
    def _logged(c: Claimed, outcome: Outcome) -> None:
        if outcome.status == "failed":
            c.log.info("row_status", batch=c.batch, line=outcome.line, old="inprog", new="failed")
        else:  # per-row success at debug: at 30k rows/s an info line per row would be the load
            c.log.debug("row_status", batch=c.batch, line=outcome.line, old="inprog", new=outcome.status)


def _by_size(outcomes: list[Outcome], limit: int) -> list[list[Outcome]]:
    """Outcomes in parts of at most ``limit`` bytes of stored text (a part holds at least one row)."""
    parts: list[list[Outcome]] = [[]]
    size = 0
    for o in outcomes:
        n = stored_size(o.res, o.messages, o.blobrows)
        if parts[-1] and size + n > limit:
            parts.append([])
            size = 0
        parts[-1].append(o)
        size += n
    return parts


def _columns(outcomes: list[Outcome]) -> dict[str, list[Any]]:
    """The write-back statement's array parameters, in Outcome's field order."""
    cols = [list(c) for c in zip(*outcomes, strict=True)]
    return dict(zip(("lines", "attempts", "statuses", "res", "messages", "blobrows", "delays", "finished"), cols,
                    strict=True))


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


def _new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]
