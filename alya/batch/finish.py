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
from dataclasses import dataclass
from typing import Any

from alya.batch.services import Services
from alya.batch.status import Summary, record_summary
from alya.core.errors import AlyaError, InvalidState, ProcessorNotFound, describe
from alya.core.logs import get_logger, status_change
from alya.core.models import BatchStatus
from alya.core.names import batch_prefix
from alya.core.records import BatchRecord, Counts
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
            rec = q.lock_open_batch(id=batch_id)
            if rec is None or q.has_open_rows(id=batch_id):
                return False
            counts = q.row_counts(id=batch_id)
            if error is not None:
                ended = self._store_end(q, rec, BatchStatus.FAILED, counts, {}, error)
            else:
                ended = self._store_end(q, rec, counts.final_status, counts, self._outputs(q, rec), None)
        self._announce(ended, files=sorted(ended.outputfiles), **({"error": error} if error is not None else {}))
        return True

    @staticmethod
    def _store_end(q: Queries, rec: BatchRecord, status: BatchStatus, counts: Counts, outputfiles: dict[str, str],
                   error: str | None) -> Ended:
        """Store the batch's end (in the caller's transaction, the batch locked): final status and counts."""
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
            counts = q.row_counts(id=batch_id)
            return rec, self._store_end(q, rec, BatchStatus.ABORTED, counts, {}, None), n_aborted_now

        rec, end, n_aborted_now = self.svc.store.run(abort)
        if isinstance(end, Summary):  # aborted before
            return Aborted(rec, end, now=False)
        return Aborted(rec, self._announce(end, rows_aborted=n_aborted_now), now=True)

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
