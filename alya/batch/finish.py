"""Ending a batch, exactly once: its summary (counts, output files in line order, final status, cache) and
then its ``mark_done``, or its abort. The summary is called by the engine after a write-back that may have
been a batch's last, and by maintenance (``alya.engine.maintenance``) for batches whose summary or
notification was missed; the abort by the facade (``JobManager.batch_abort``).

Every end of a batch (a summary, a summary given up, an abort) is stored and announced by the same two
steps, ``_store_end`` in the transaction and ``_announce`` after its commit, so that the batch's final
counts, its status change log line and its cached summary cannot differ between the ways a batch ends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from alya.batch.services import Services
from alya.batch.status import Summary, record_summary
from alya.core.errors import AlyaError, InvalidState, ProcessorNotFound, describe
from alya.core.logs import get_logger, status_change
from alya.core.models import BatchStatus
from alya.core.names import batch_prefix
from alya.core.records import BatchRecord, Counts, RowResult
from alya.db.batches import locked_batch
from alya.db.queries import Queries
from alya.db.store import json_text


@dataclass(frozen=True, slots=True)
class Ended:
    """A batch's end as stored: the record as it was locked, and what ``finish_batch`` wrote."""

    rec: BatchRecord
    status: BatchStatus
    counts: Counts
    outputfiles: dict[str, str]
    error: str | None
    ver: int
    row: RowResult | None = None  # a slow query's one row, cached with its end (``announce_end``)


@dataclass(frozen=True, slots=True)
class Aborted:
    """An abort's outcome: the batch's summary, and whether this call aborted it (False: it already was)."""

    rec: BatchRecord
    summary: Summary
    now: bool


class Finisher:
    def __init__(self, services: Services) -> None:
        self.svc = services
        self.log = get_logger()

    def summarise(self, batch_id: str) -> bool:
        """Finish a batch whose rows are all final: counts, output files, status, cache (mark_done is the
        caller's next step: ``Engine.summarise``).

        Exactly once: the batch row is locked and re-read (READ COMMITTED gives each statement a fresh
        snapshot), so the first summariser sees it open and every later one sees it final. Files are
        written while the lock is held and before the status changes: a failed upload rolls back and
        leaves the batch for the next attempt. A summary that keeps failing the same way is given up
        (:meth:`_failed`): the batch then ends ``failed`` with the reason, instead of staying open for ever."""
        try:
            return self._summarise(batch_id)
        except AlyaError as exc:
            if self._failed(batch_id, exc):
                return True
            raise

    def _summarise(self, batch_id: str) -> bool:
        return self._finish(batch_id, error=None)

    def _finish(self, batch_id: str, error: str | None) -> bool:
        """Lock the open batch, count its rows and store its end: with ``error`` None its real summary
        (output files written, status from the counts); with an ``error`` (a summary given up) ``failed``
        with no output files and that reason."""
        with self.svc.store.tx() as q:
            ended = self.end_in(q, batch_id, error)
        if ended is None:
            return False
        self.announce_end(ended)
        return True

    def end_in(self, q: Queries, batch_id: str, error: str | None = None) -> Ended | None:
        """The summary's transaction part, in the caller's transaction: None when the batch is not open or
        has open rows. The caller commits, then calls :meth:`announce_end`. The write-back of a slow query
        summarises it this way in its own transaction: one transaction less on the path a web call waits on."""
        rec = q.lock_open_batch(id=batch_id)
        if rec is None:
            return None
        if rec.is_query and error is None:
            return self._end_query(q, rec)
        if q.has_open_rows(id=batch_id):
            return None
        counts = self.final_counts(q, rec)
        if error is not None:
            return self._store_end(q, rec, BatchStatus.FAILED, counts, {}, error)
        # A batch past its failure threshold says so, however it came to its end (slow queries have none).
        limit = None if rec.is_query else q.failure_limit(id=batch_id)
        return self._store_end(q, rec, counts.final_status, counts, self._outputs(q, rec),
                               limit.error(counts.failed) if limit and limit.passed else None)

    def _end_query(self, q: Queries, rec: BatchRecord) -> Ended | None:
        """A slow query's end: its one row says everything (whether it is final, the counts, the output
        files), read once, instead of the open-rows check, the recount and the outputs' read of a batch:
        two statements less on the path a web call waits on."""
        row = q.slowquery_row(id=rec.id)
        if row is None or not row.status.is_final:
            return None
        counts = Counts(**{row.status.value: 1})
        ended = self._store_end(q, rec, counts.final_status, counts, row.outputfiles, None)
        return replace(ended, row=RowResult(0, row.status.value, row.res, row.messages))

    def announce_end(self, ended: Ended) -> None:
        """After the commit of :meth:`end_in`: the status change line and the cached summary."""
        error = ended.error
        if ended.row is not None and self.svc.config.done_cache_rows >= 1:
            # the answer its client polls for, cached before the final status that sends the client to it
            self.svc.statuses.put_rows(ended.rec.id, ended.ver, [ended.row])
        self._announce(ended, files=sorted(ended.outputfiles), round=ended.rec.round,
                       **({"error": error} if error is not None else {}))

    def stop_if_too_many_failures(self, batch_id: str) -> bool:
        """After a write-back that failed rows: if more rows than the batch's threshold have failed, stop it
        (True). Two steps. First, under the batch's lock (write-backs hold it shared, so none is half done),
        its queued and in-progress rows become ``aborted`` and workers are told at the commit (NOTIFY): rows
        stop starting at once, and a result arriving later finds its row no longer in progress and is
        dropped (it neither reopens the batch nor counts twice; the row stays ``aborted``). Then the batch,
        all of whose rows are now final, is summarised as any other (``failed``, its ``error`` saying why,
        output files of the finished rows, ``mark_done`` once). Should that summary fail (the object store),
        the batch is left open with no open row, and cleanup summarises it alike."""
        with self.svc.store.tx() as q:  # unlocked first: a write-back under the limit must not queue here
            seen = q.failure_limit(id=batch_id)
        if seen is None or not seen.passed:
            return False
        with self.svc.store.tx() as q:
            rec = q.lock_open_batch(id=batch_id)
            limit = None if rec is None else q.failure_limit(id=batch_id)
            if rec is None or limit is None or not limit.passed:
                return False
            stopped = q.abort_rows(id=batch_id)
            q.notify_abort(batch_id)  # workers holding its rows stop starting them (alya.engine.engine)
        self.log.warning("failure_limit_passed", app=rec.app, op=rec.op, batch=batch_id, limit=limit.limit,
                         nrows=limit.nrows, rows_aborted=stopped, round=rec.round)
        try:
            if self.summarise(batch_id):
                self.notify(batch_id)
        except AlyaError as exc:
            self.log.error("summary_failed", batch=batch_id, error=str(exc), next="cleanup summarises it")
        return True

    @staticmethod
    def final_counts(q: Queries, rec: BatchRecord) -> Counts:
        """The counts a batch ends with (in the caller's transaction, the batch locked, no row open), kept for
        ever. From its counters (``alya.db.counters``: O(1) in the batch's size) when three exact checks agree
        with them: no row open, every row of the batch counted (``nrows``), and as many failed rows as the
        partial index of failed rows holds (O(failed rows)). Otherwise a bug or a hand-made change moved rows
        behind the triggers' back: said loudly, and the rows win (a recount). Why not always recount: it reads
        every row of the batch under the batch's lock, on the path its client waits on (125 ms at 200,000
        rows, measured; 6 % of a no-op batch's time from release to final status)."""
        counted = q.batch_counts(id=rec.id)
        if (counted.queued == counted.inprog == 0
                and counted.success + counted.failed + counted.aborted == rec.nrows
                and counted.failed == q.failed_rows(id=rec.id)):
            return counted
        counts = q.row_counts(id=rec.id)
        if counts != counted:
            get_logger().error("counters_drift", batch=rec.id, counted=str(counted), recounted=str(counts),
                               note="the stored counts come from the rows; the counters were wrong")
        return counts

    @staticmethod
    def _store_end(q: Queries, rec: BatchRecord, status: BatchStatus, counts: Counts, outputfiles: dict[str, str],
                   error: str | None) -> Ended:
        """Store the batch's end (in the caller's transaction, the batch locked): final status and counts
        (``counts``: :meth:`final_counts`, or a slow query's one row), its counters folded into one row per
        status."""
        q.fold_counts(ids=[rec.id])
        ver = q.finish_batch(id=rec.id, status=status, nsuccess=counts.success, nfailed=counts.failed,
                             naborted=counts.aborted, outputfiles=json_text(outputfiles), error=error)
        return Ended(rec, status, counts, outputfiles, error, ver)

    def _announce(self, ended: Ended, **fields: Any) -> Summary:
        """After the commit: the status change line, and the summary cached at the end's version."""
        rec, c = ended.rec, ended.counts
        fields = {"nrows": rec.nrows, "nsuccess": c.success, "nfailed": c.failed, "naborted": c.aborted,
                  "type": rec.type, **fields}  # the counts also make the event's payload (alya.core.events)
        status_change(rec.app, rec.op, rec.id, ended.status.value, old=rec.status.value, **fields)
        return self.svc.statuses.put_new(rec.id, ended.ver, ended.status, rec.nrows, ended.counts,
                                          ended.outputfiles, ended.error)

    def _outputs(self, q: Queries, rec: BatchRecord) -> dict[str, str]:
        """A slow query's output files are its row's; a batch's are written from its blob rows, in line
        order, while the batch row is locked (a failed upload rolls the summary back)."""
        if rec.is_query:
            row = q.slowquery_row(id=rec.id)
            return row.outputfiles if row else {}
        prefix = batch_prefix(self.svc.objects.url, rec.app, rec.op, rec.id)
        blobrows = q.stream_batch_blobrows(id=rec.id)
        try:
            return self.svc.objects.write_files(prefix, blobrows)
        finally:
            blobrows.close()  # the server-side cursor, while its transaction is still open

    def abort(self, batch_id: str, type_: str | None = None) -> Aborted:
        """Abort: the batch's queued and in-progress rows become ``aborted`` and the batch ends ``aborted``
        with the counts of its rows, in one transaction; workers are told at its commit (they stop starting
        its rows). Refused once the batch ended success or failed; an aborted one is returned as it is.
        ``type_`` ("B", "Q"): refuse a batch of the other kind. Cancelling its flow runs is the caller's
        (Prefect is a layer up)."""

        def abort(q: Queries) -> tuple[BatchRecord, Summary | Ended, int]:
            rec = locked_batch(q, batch_id)
            if type_ is not None and rec.type != type_:
                raise InvalidState(f"{batch_id} is a batch, not a slow query")
            if rec.status in (BatchStatus.SUCCESS, BatchStatus.FAILED):
                raise InvalidState(f"batch {batch_id} already ended {rec.status.value}")
            if rec.status is BatchStatus.ABORTED:
                return rec, record_summary(q, rec), 0
            n_aborted_now = q.abort_rows(id=batch_id)
            q.notify_abort(batch_id)
            counts = self.final_counts(q, rec)
            return rec, self._store_end(q, rec, BatchStatus.ABORTED, counts, {}, None), n_aborted_now

        rec, end, n_aborted_now = self.svc.store.run(abort)
        if isinstance(end, Summary):  # aborted before
            return Aborted(rec, end, now=False)
        return Aborted(rec, self._announce(end, rows_aborted=n_aborted_now), now=True)

    def stop(self, batch_id: str, error: str) -> bool:
        """End an open batch now, with ``error`` (its deadline passed): rows not yet final become ``aborted``
        (workers are told at the commit, as by an abort), the output files of the rows that finished are
        written, and the batch ends ``aborted`` with that error; unlike a plain abort its ``mark_done`` is
        due (``notifiedat`` stays NULL: the caller's next step, or maintenance's). False when the batch
        had already ended. A failed upload rolls everything back: the next attempt stops it again."""
        with self.svc.store.tx() as q:
            rec = locked_batch(q, batch_id)
            if rec.status.is_final:
                return False
            n_aborted_now = q.abort_rows(id=batch_id)
            q.notify_abort(batch_id)
            counts = self.final_counts(q, rec)
            ended = self._store_end(q, rec, BatchStatus.ABORTED, counts, self._outputs(q, rec), error)
        self._announce(ended, rows_aborted=n_aborted_now, nsuccess=counts.success, nfailed=counts.failed,
                       files=sorted(ended.outputfiles), error=error)
        return True

    def _failed(self, batch_id: str, exc: AlyaError) -> bool:
        """Count a failed summary attempt; give the summary up (True) once the same error has repeated
        ``summary_giveup_after`` times over at least ``summary_giveup_sec``.

        Both, because an outage of the object store fails every attempt the same way too, and attempts are
        frequent (every worker's cleanup tries every few seconds): only an error that outlasts any outage
        worth waiting for is taken as permanent. Giving up keeps every row's result (``batch_done`` still
        returns them) and ends the batch ``failed`` with no output files and the reason in ``error``;
        mark_done is then called as for any finished batch. If even the count cannot be written (the
        database is what fails), nothing is counted."""
        cfg = self.svc.config
        error = _same_way(exc)
        try:
            with self.svc.store.tx() as q:
                counted = q.summary_failed(id=batch_id, error=error)
            if counted is None:
                return False
            failures, seconds = counted.failures, counted.seconds
            if failures < cfg.summary_giveup_after or seconds < cfg.summary_giveup_sec:
                self.log.warning("summary_failed_again", batch=batch_id, failures=failures,
                                 seconds=round(seconds, 1), error=error,
                                 gives_up_after=cfg.summary_giveup_after, gives_up_sec=cfg.summary_giveup_sec)
                return False
            return self._give_up(batch_id, failures, seconds, describe(exc))
        except AlyaError as again:
            self.log.warning("summary_failure_not_counted", batch=batch_id, error=str(again))
            return False

    def _give_up(self, batch_id: str, failures: int, seconds: float, error: str) -> bool:
        reason = (f"summary failed {failures} times over {seconds:.0f} s, the same way each time; the last: {error}; "
                  "output files were not written (every row's result is kept)")
        if not self._finish(batch_id, error=reason):
            return False
        self.log.error("summary_given_up", batch=batch_id, error=reason)
        return True

    def refresh_summary(self, batch_id: str) -> None:
        """Cache the batch's summary as PostgreSQL has it now (after results kept past an abort)."""
        with self.svc.store.tx() as q:
            rec = q.get_batch(id=batch_id)
            summary = None if rec is None else record_summary(q, rec)
        if summary is not None:
            self.svc.statuses.put(batch_id, summary)

    def notify(self, batch_id: str) -> bool:
        """Call mark_done once: the claim (notifiedat) is committed before the call, so no crash or race
        can make it run twice. Only a process that has the processor claims it."""
        svc = self.svc
        with svc.store.tx() as q:
            rec = q.get_batch(id=batch_id)
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
            log.error("mark_done_init_failed", error=describe(exc))
            return False
        with svc.store.tx() as q:
            if not q.claim_notify(id=batch_id):
                return False
        try:
            reg.processor.mark_done(initblock, rec.context, rec.details())
            log.info("mark_done_called")
        except Exception as exc:
            log.error("mark_done_failed", error=describe(exc))
        return True


_VARYING = re.compile(r"0x[0-9a-fA-F]+|[0-9a-fA-F]{8,}|\d+")


def _same_way(exc: BaseException) -> str:
    """The error as text with its numbers and ids blanked, so that failures differing only in a request
    id, a port or a time count as the same way of failing."""
    return _VARYING.sub("#", f"{type(exc).__name__}: {exc}")[:500]
