"""The processing engine: claim a chunk, run the processor on each row, acknowledge the chunk, summarise
finished batches, call mark_done. No Prefect here: the batch-type flows (``alya.batchflow``) wrap these
calls in tasks.

Per chunk, never per row: one claim (FOR UPDATE SKIP LOCKED over the partial index of queued rows, in
the transaction that lists the open batches), one acknowledgement (UPDATE ... FROM unnest(arrays)), and
after its commit one indexed look-up whether the batch has open rows left (then it is summarised).

Lock order everywhere: the batch row before its rows (claim of a queued batch, write-back, release,
abort, summary), so that no two of them can deadlock.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from alya.errors import AlyaError, ProcessorNotFound
from alya.logs import get_logger, status_change
from alya.models import BatchJobResult, BatchStatus, ErrorMessage, SlowQueryResult
from alya.names import batch_prefix
from alya.outputs import normalise_blobrows
from alya.records import BatchRecord, ClaimedRow, Counts, OpenBatch, SlowQueryRow
from alya.registry import Registration
from alya.services import Services
from alya.store import json_text
from alya.validate import file_name

ABORT_CHECK_SEC = 1.0
PROGRESS_REFRESH_SEC = 5.0
WRITE_TRIES = 4
INIT_RETRY_SEC = 1.0  # first delay after an app's init() failed; doubles per failure
INIT_RETRY_MAX_SEC = 30.0


@dataclass
class ChunkReport:
    """What one chunk task did; small and JSON-friendly, because it crosses the Prefect task boundary."""

    batch: str | None = None
    nrows: int = 0
    nsuccess: int = 0
    nfailed: int = 0
    nretry: int = 0
    summarised: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "nrows": self.nrows, "nsuccess": self.nsuccess, "nfailed": self.nfailed,
                "nretry": self.nretry, "summarised": self.summarised}


@dataclass
class Claimed:
    batch: str
    type: str
    context: dict[str, Any]
    rows: list[ClaimedRow]  # ordered by line
    worker: str  # the identity the rows were claimed under (and are written back as)
    ver: int = 0  # the batch's status version when claimed (for cache invalidation)


class Engine:
    """One per JobManager and process: the worker identity and its heartbeat, the claim, the processor
    calls, the write-back, the summary and mark_done. The init blocks are the registry's (``InitBlocks``)."""

    def __init__(self, services: Services) -> None:
        self.svc = services
        self.worker_id = _new_worker_id()
        self.stopping = threading.Event()
        self._init_failures: dict[str, tuple[int, float]] = {}  # app -> (failures in a row, retry at)
        self._progress_at: dict[str, float] = {}  # batch -> when this worker last refreshed its counts
        self._claim_hint: dict[str, int] = {}  # batch -> last line claimed here: where the next scan starts
        self._hb_thread: threading.Thread | None = None
        self._hb_stop = threading.Event()
        self._lock = threading.Lock()
        self.log = get_logger().bind(worker=self.worker_id)

    # ------------------------------------------------------------------ worker identity
    def start(self) -> None:
        """Register this worker (so its rows are not recovered from under it) and keep it alive."""
        with self._lock:
            if self._hb_thread is not None and self._hb_thread.is_alive():
                return
            self._beat()
            self._hb_stop.clear()
            self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="alya-heartbeat", daemon=True)
            self._hb_thread.start()

    def shutdown(self) -> None:
        """Stop: a ``jm.run`` loop on another thread ends after its current row (giving back the rest of
        its chunk), then this worker leaves the ``workers`` table and closes its init blocks."""
        self.stopping.set()
        self._hb_stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join(timeout=5)
            self._hb_thread = None
        try:
            with self.svc.store.tx() as tx:
                tx.run("forget_worker", id=self.worker_id)
        except AlyaError as exc:
            self.log.warning("forget_worker_failed", error=str(exc))
        self.svc.initblocks.close_all()

    def _beat(self) -> None:
        with self.svc.store.tx() as tx:
            tx.run("heartbeat", id=self.worker_id, host=socket.gethostname(), pid=os.getpid())

    def _heartbeat_loop(self) -> None:
        interval = max(0.5, self.svc.config.recovery_sec / 4)
        while not self._hb_stop.wait(interval):
            try:
                self._beat()
            except Exception as exc:  # keep beating through outages
                self.log.warning("heartbeat_failed", error=str(exc))

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
            open_types = {(a, o, t) for a, o, t in tx.all("claimable_batch_types")}
        return [t for k, t in kinds.items() if k in open_types]

    def open_work(self, types: list[tuple[str, str]]) -> bool:
        keys = ["/".join(k) for k in self._kinds(types)]
        with self.svc.store.tx() as tx:
            return bool(tx.one("open_work_exists", types=keys)[0])  # type: ignore[index]

    def next_claimable_in(self, batch_id: str) -> float | None:
        """Seconds until a queued row of the batch may be claimed (0: now); None when none is queued."""
        with self.svc.store.tx() as tx:
            row = tx.one("next_claimable_in", id=batch_id)
        return None if row is None or row[0] is None else max(0.0, float(row[0]))

    # ------------------------------------------------------------------ one chunk
    def process_chunk(self, app: str, op: str, only: str | None = None) -> ChunkReport:
        """Claim up to ALYA_BATCHCHUNK_NROWS rows of one open batch of (app, op) (of batch ``only`` if
        given) and process them."""
        reg = self.svc.registry.processor(app, op)
        self.start()
        if self.stopping.is_set():
            return ChunkReport()
        # The init block before the claim: while the app's init() fails, its rows stay queued, untouched
        # (not claimed and given back at every poll), and init() is retried with a growing delay.
        ok, initblock = self._initblock(app)
        if not ok:
            return ChunkReport()
        claimed = self._claim(app, op, reg.type, only)
        if claimed is None:
            return ChunkReport()
        report = ChunkReport(batch=claimed.batch)
        log = self.log.bind(app=app, op=op, batch=claimed.batch)
        try:
            results, unstarted = self._run_rows(reg, initblock, claimed, log)
        except BaseException:
            # Not a row fault (those are caught per row): an interrupt or a bug. Nothing was written yet.
            self._release(claimed, [r.line for r in claimed.rows], quiet=True)
            raise
        if unstarted:
            self._release(claimed, unstarted)
        if results["lines"]:
            report.nrows = len(results["lines"])
            report.nsuccess = results["statuses"].count("success")
            report.nfailed = results["statuses"].count("failed")
            report.nretry = results["statuses"].count("queued")
            written = self._write(claimed, results, log)
            log.info("chunk_done", rows=report.nrows, success=report.nsuccess, failed=report.nfailed,
                     retry=report.nretry, first_line=claimed.rows[0].line, last_line=claimed.rows[-1].line)
            if written < report.nrows:  # recovered from under us, or aborted: those answers are dropped
                log.warning("results_discarded", rows=report.nrows - written, written=written)
            self._refresh_progress(claimed)
        # Checked after our own commit, never inside it: two workers committing the last rows of a batch
        # at once would each see the other's rows still inprog in their own transaction, and neither
        # would summarise. After the commit, whoever commits last is sure to see every row final.
        if report.nrows and self._all_final(claimed.batch, after=claimed.rows[-1].line):
            try:
                if self.summarise(claimed.batch):
                    report.summarised.append(claimed.batch)
            except AlyaError as exc:  # a failed upload: the batch stays open; cleanup() tries again
                log.error("summary_failed", error=str(exc))
        return report

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

    def _refresh_progress(self, claimed: Claimed) -> None:
        """Let pollers see progress: at most every PROGRESS_REFRESH_SEC per batch and worker, the cached
        counts are invalidated (one Redis call), so the next batch_status recounts from PostgreSQL."""
        now = time.monotonic()
        if now - self._progress_at.get(claimed.batch, 0.0) >= PROGRESS_REFRESH_SEC:
            if len(self._progress_at) > 1000:
                self._progress_at.clear()
            self._progress_at[claimed.batch] = now
            self.svc.summaries.invalidate(claimed.batch, claimed.ver)

    def _all_final(self, batch: str, after: int | None = None) -> bool:
        """Whether every row of the batch is final. Queued rows past this chunk answer "no" cheaply, which
        is the usual case; only near the end of a batch is the full check (both partial indexes from the
        start, past the index entries of rows already done) worth its cost."""
        with self.svc.store.tx() as tx:
            if after is not None and tx.one("queued_after", id=batch, after=after) is not None:
                return False
            return not tx.one("has_open_rows", id=batch)[0]  # type: ignore[index]

    def _write(self, claimed: Claimed, results: dict[str, list[Any]], log: Any) -> int:
        """The chunk's one write-back statement. Idempotent (only rows still held at the claimed attempt
        change), so it is simply repeated through a short outage. If it cannot be written, the rows are
        given back; if even that fails, this worker drops its identity, and recovery requeues the rows
        as it does for a dead worker (they must never stay inprog under a live heartbeat)."""
        delay = 0.2
        for attempt in range(1, WRITE_TRIES + 1):
            try:
                with self.svc.store.tx() as tx:
                    return tx.run("write_results", batch=claimed.batch, worker=claimed.worker, **results)
            except Exception as exc:
                log.warning("write_failed", attempt=attempt, error=_describe(exc))
                if attempt == WRITE_TRIES:
                    if not self._release(claimed, results["lines"], quiet=True):
                        self._retire_identity(claimed.worker)
                    raise
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _claim(self, app: str, op: str, type_: str, only: str | None) -> Claimed | None:
        n = self.svc.config.batchchunk_nrows
        worker = self.worker_id
        moved: list[tuple[str, int]] = []
        claimed = None
        with self.svc.store.tx() as tx:
            for ob in tx.records(OpenBatch, "open_batches", app=app, op=op, type=type_, only=only):
                batch, ver = ob.id, ob.ver
                if ob.status is BatchStatus.QUEUED and (bumped := tx.one("batch_to_inprog", batch=batch)) is not None:
                    # The batch row is locked before its rows, the order abort takes them in: rows first
                    # would deadlock with an abort arriving during the claim (and fail one of the two).
                    ver = int(bumped[0])
                    moved.append((str(batch), ver))
                after = self._claim_hint.get(batch, 0)
                rows = tx.records(ClaimedRow, "claim_rows", batch=batch, n=n, worker=worker, after=after)
                if len(rows) < n and after > 0:  # rows requeued behind the hint (faults, recovery)
                    rows += tx.records(ClaimedRow, "claim_rows", batch=batch, n=n - len(rows), worker=worker,
                                       after=0)
                if rows:
                    if len(self._claim_hint) > 1000:
                        self._claim_hint.clear()
                    self._claim_hint[batch] = max(r.line for r in rows)
                    claimed = Claimed(batch, type_, ob.context, sorted(rows, key=lambda r: r.line), worker, ver)
                    break
        for batch, ver in moved:
            status_change(app, op, batch, "inprog", old="queued")
            self.svc.summaries.invalidate(batch, ver)
        return claimed

    def _run_rows(self, reg: Registration, initblock: Any, claimed: Claimed, log: Any
                  ) -> tuple[dict[str, list[Any]], list[int]]:
        cfg = self.svc.config
        out: dict[str, list[Any]] = {k: [] for k in ("lines", "attempts", "statuses", "res", "messages",
                                                     "blobrows", "delays")}
        is_query = claimed.type == "Q"
        call = reg.processor.do_slow_query if is_query else reg.processor.do_batch_job
        context = claimed.context
        next_check = time.monotonic() + ABORT_CHECK_SEC
        for i, row in enumerate(claimed.rows):
            line, raw_input, attempts = row.line, row.input, row.attempts
            if self.stopping.is_set():
                return out, [r.line for r in claimed.rows[i:]]
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + ABORT_CHECK_SEC
                if self._aborted(claimed.batch):
                    log.info("chunk_stopped_batch_aborted", unstarted=len(claimed.rows) - i)
                    return out, []  # abort already marked these rows; nothing to give back
            try:
                value = orjson.loads(raw_input)
                result = call(initblock, context, value) if is_query else call(initblock, context, line, value)
                status, res, messages, blobs = _accept(result, is_query)
                delay = 0.0
            except Exception as exc:
                status, res, blobs, delay = "queued", None, None, 0.0
                messages = None
                if attempts >= cfg.max_attempts:
                    status = "failed"
                    messages = json_text([ErrorMessage(msgid=0, errcode="processing_error",
                                                       vals=[_describe(exc)]).to_dict()])
                else:
                    delay = cfg.retry_backoff_sec * (2 ** (attempts - 1))
                log.warning("row_fault", line=line, attempt=attempts, new=status, error=_describe(exc),
                            trace=traceback.format_exc(limit=3) if status == "failed" else None)
            else:
                if status == "failed":
                    log.info("row_status", line=line, old="inprog", new="failed")
                else:  # per-row success at debug: at 20k rows/s an info line per row would be the load
                    log.debug("row_status", line=line, old="inprog", new=status)
            out["lines"].append(line)
            out["attempts"].append(attempts)
            out["statuses"].append(status)
            out["res"].append(res)
            out["messages"].append(messages)
            out["blobrows"].append(blobs)
            out["delays"].append(delay)
        return out, []

    def _aborted(self, batch: str) -> bool:
        with self.svc.store.tx() as tx:
            rec: BatchRecord | None = tx.record(BatchRecord, "get_batch", id=batch)
        return rec is None or rec.status is BatchStatus.ABORTED

    def _release(self, claimed: Claimed, lines: list[int], quiet: bool = False) -> bool:
        """Give claimed rows back to the queue, their attempt restored (they were not tried)."""
        try:
            with self.svc.store.tx() as tx:
                attempts = {r.line: r.attempts for r in claimed.rows}
                tx.run("release_rows", batch=claimed.batch, lines=lines, attempts=[attempts[x] for x in lines],
                       worker=claimed.worker)
            return True
        except Exception as exc:
            if not quiet:
                raise
            self.log.error("release_failed", batch=claimed.batch, rows=len(lines), error=_describe(exc))
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

    # ------------------------------------------------------------------ summary
    def summarise(self, batch_id: str) -> bool:
        """Finish a batch whose rows are all final: counts, output files, status, cache, mark_done.

        Exactly once: the batch row is locked and re-read (READ COMMITTED gives each statement a fresh
        snapshot), so the first summariser sees it open and every later one sees it final. Files are
        written while the lock is held and before the status changes: a failed upload rolls back and
        leaves the batch for the next attempt."""
        svc = self.svc
        with svc.store.tx() as tx:
            rec: BatchRecord | None = tx.record(BatchRecord, "lock_open_batch", id=batch_id)
            if rec is None:
                return False
            if tx.one("has_open_rows", id=batch_id)[0]:  # type: ignore[index]
                return False
            counts = Counts.from_rows(tx.all("row_counts", id=batch_id))
            status = counts.final_status
            if rec.is_query:
                q: SlowQueryRow | None = tx.record(SlowQueryRow, "slowquery_row", id=batch_id)
                outputfiles = q.outputfiles if q else {}
            else:
                prefix = batch_prefix(svc.objects.url, rec.app, rec.op, batch_id)
                blobrows = tx.stream("batch_blobrows", id=batch_id)
                try:
                    outputfiles = svc.objects.write_files(prefix, (b for (b,) in blobrows))
                finally:
                    blobrows.close()  # the server-side cursor, while its transaction is still open
            ver, _ = tx.one("finish_batch", id=batch_id, status=status.value, nsuccess=counts.success,  # type: ignore[misc]
                            nfailed=counts.failed, naborted=counts.aborted, outputfiles=json_text(outputfiles))
        status_change(rec.app, rec.op, batch_id, status.value, old=rec.status.value, nsuccess=counts.success,
                      nfailed=counts.failed, naborted=counts.aborted, files=sorted(outputfiles))
        svc.summaries.put_new(batch_id, ver, status, rec.nrows, counts, outputfiles)
        self.notify(batch_id)
        return True

    def notify(self, batch_id: str) -> bool:
        """Call mark_done once: the claim (notifiedat) is committed before the call, so no crash or race
        can make it run twice. Only a process that has the processor claims it."""
        svc = self.svc
        with svc.store.tx() as tx:
            rec: BatchRecord | None = tx.record(BatchRecord, "get_batch", id=batch_id)
        if rec is None:
            return False
        try:
            reg = svc.registry.processor(rec.app, rec.op)
        except ProcessorNotFound:
            return False
        if reg.type != rec.type:
            return False
        log = self.log.bind(app=rec.app, op=rec.op, batch=batch_id)
        try:
            initblock = svc.initblocks.get(rec.app)
        except Exception as exc:  # not claimed: cleanup() tries again once init works
            log.error("mark_done_init_failed", error=_describe(exc))
            return False
        with svc.store.tx() as tx:
            if tx.one("claim_notify", id=batch_id) is None:
                return False
        try:
            reg.processor.mark_done(initblock, rec.context, rec.details())
            log.info("mark_done_called")
        except Exception as exc:
            log.error("mark_done_failed", error=_describe(exc))
        return True


def _accept(result: Any, is_query: bool) -> tuple[str, str | None, str | None, str | None]:
    """Check a processor's answer; anything malformed raises, and is then treated as a fault."""
    expected = SlowQueryResult if is_query else BatchJobResult
    if not isinstance(result, expected):
        raise TypeError(f"processor returned {type(result).__name__}, not {expected.__name__}")
    status = BatchStatus(result.status)
    if status not in (BatchStatus.SUCCESS, BatchStatus.FAILED):
        raise ValueError(f"processor returned status {status.value!r}; only success/failed are allowed")
    if result.result is not None and not isinstance(result.result, dict):
        raise TypeError("result must be a dict or None")
    messages = [m.to_dict() if isinstance(m, ErrorMessage) else ErrorMessage.from_dict(m).to_dict()
                for m in result.messages or []]
    if is_query:
        files = {file_name(k): str(v) for k, v in (result.outputfiles or {}).items()}  # type: ignore[union-attr]
        blobs = files or None
    else:
        blobs = normalise_blobrows(result.blobrows)  # type: ignore[union-attr]
    texts = (
        None if result.result is None else json_text(result.result),
        json_text(messages) if messages else None,
        None if blobs is None else json_text(blobs),
    )
    if any(t is not None and "\\u0000" in t for t in texts):
        raise ValueError("result, messages or blob rows contain a NUL character, which PostgreSQL cannot store")
    return (status.value, *texts)


def _new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]
