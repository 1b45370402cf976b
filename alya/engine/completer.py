"""The completer: claimed rows' outcomes written back, and claimed rows given back.

- **Write-backs** are one statement per batch, at the end of a claim and at least every ``ALYA_FLUSH_SEC``
  for rows already done: a crash replays at most about one flush of work per slot.
- Every write-back is an **abort check**: an aborted batch's unstarted rows are dropped; rows that finished
  before the abort committed keep their results (a second statement, run only in that case).
- A write-back is idempotent (only rows still held at the claimed attempt change), so it is simply repeated
  through a short outage. If it cannot be written, the rows are given back; if even that fails, the worker
  identity is retired, and recovery requeues the rows as it does for a dead worker: rows must never stay
  inprog under a live heartbeat.
"""

from __future__ import annotations

import time
from time import perf_counter  # its own name: tests replace ``time`` to skip the retry sleeps
from typing import Any

from alya.batch.finish import Finisher
from alya.batch.outcomes import Outcome, stored_size
from alya.batch.services import Services
from alya.core.errors import AlyaError, describe
from alya.core.models import BatchStatus
from alya.core.records import WriteResult
from alya.db.queries import Queries
from alya.engine.claim import ChunkReport, Claimed
from alya.engine.identity import Identity

WRITE_TRIES = 4
WRITE_PART_BYTES = 128 * 2**20  # a write-back statement carries at most this much result text
LIMITS_KEPT = 1000  # batches whose failure threshold (whether they have one) is remembered


class Completer:
    """Write-backs and give-backs for every claim loop of the process. It keeps no state of its own (the
    claims carry theirs), so it needs no lock."""

    def __init__(self, services: Services, identity: Identity, finisher: Finisher) -> None:
        self.svc = services
        self.identity = identity
        self.finisher = finisher
        self._limited: dict[str, bool] = {}  # batch -> has a failure threshold (fixed at submit): read once

    def has_failure_limit(self, batch: str) -> bool:
        """Whether the batch has a failure threshold, read once per process (it never changes)."""
        known = self._limited.get(batch)
        if known is None:
            try:
                with self.svc.store.tx() as tx:
                    known = tx.batch_has_failure_limit(id=batch)
            except AlyaError:  # unknown for now (an outage): this claim's failed rows wait for the flush
                return False
            if len(self._limited) >= LIMITS_KEPT:
                self._limited.clear()
            self._limited[batch] = known
        return known

    def flush(self, claims: list[Claimed], report: ChunkReport, log: Any) -> None:
        """One write-back statement per batch for the outcomes of these claims (an abort check too)."""
        # One statement per batch and identity: after a retire, one batch can have claims under the old and
        # the new worker id, and each row is written back as the identity it was claimed under.
        by_batch: dict[tuple[str, str], list[Claimed]] = {}
        for c in claims:
            by_batch.setdefault((c.batch, c.worker), []).append(c)
        for (batch, _), group in by_batch.items():
            outcomes = [o for c in group for o in c.take()]
            if not outcomes:
                if not any(c.aborted for c in group):
                    self.check_aborts(group, log)
                continue
            t0 = perf_counter()
            try:
                res = self.write(group[0], outcomes, log)
            except AlyaError:
                for c in group:  # write() gave the rows back (or retired this identity): drop the claims
                    c.cancelled = c.lost = True
                continue
            statuses = [o.status for o in outcomes]
            c0 = group[0]
            self.svc.metrics.written(c0.app, c0.op, c0.type, perf_counter() - t0, statuses)  # per write-back
            report.add(statuses, batch)
            ended = ended_status(res.status)
            if res.written < len(outcomes):  # recovered from under us, aborted or stopped: answers dropped
                why = "batch aborted" if ended else "rows recovered by another worker (or the batch stopped)"
                (log.info if ended else log.warning)("results_discarded", batch=batch, reason=why,
                                                     rows=len(outcomes) - res.written, written=res.written)
            if ended:  # aborted, or stopped past its failure threshold: its unstarted rows are not run
                aborted_seen(group, log)
                if res.late:
                    log.info("results_kept_after_abort", batch=batch, rows=res.late)
            else:
                lines = [o.line for o in outcomes]
                log.info("rows_written", batch=batch, rows=len(outcomes), success=statuses.count("success"),
                         failed=statuses.count("failed"), retry=statuses.count("queued"),
                         first_line=min(lines), last_line=max(lines))
                if c0.limited and res.written and "failed" in statuses:
                    self.check_failure_limit(group, log)
                # Progress reaches pollers by itself: an open batch's cached summary expires within
                # OPEN_TTL_SEC (alya.batch.status). Invalidating it here made every worker cause a recount
                # of the whole batch (O(rows)) every few seconds; now a polled batch is counted once per TTL.

    def check_failure_limit(self, claims: list[Claimed], log: Any) -> None:
        """Rows of these claims' batch (one batch) failed: stop the batch if it passed its threshold
        (``Finisher.stop_if_too_many_failures``); its other claims here stop at the abort notice."""
        try:
            if self.finisher.stop_if_too_many_failures(claims[0].batch):
                aborted_seen(claims, log)
        except AlyaError as exc:  # checked again at the next write-back that fails rows
            log.error("failure_limit_check_failed", batch=claims[0].batch, error=str(exc))

    def write(self, claimed: Claimed, outcomes: list[Outcome], log: Any) -> WriteResult:
        """The write-back statement, tried ``WRITE_TRIES`` times through an outage; on the last failure the
        rows are given back and the error raised."""
        parts = [_columns(p) for p in _by_size(outcomes, WRITE_PART_BYTES)]
        delay = 0.2
        for attempt in range(1, WRITE_TRIES + 1):
            try:
                with self.svc.store.tx() as tx:
                    # One statement, unless the results are too large for one message (PostgreSQL refuses a
                    # statement of about 1 GB): then one per part, in the same transaction.
                    results = [_write_part(tx, claimed, p) for p in parts]
                    res = WriteResult(results[-1].status, sum(r.written for r in results),
                                      sum(r.late for r in results),
                                      next((r.ver for r in reversed(results) if r.ver is not None), None))
                    retry = any(o.status == "queued" for o in outcomes)
                    if retry:  # retries become claimable later
                        tx.notify_work(claimed.app, claimed.op)
                    # A slow query's one row is final: summarise it in this transaction, one WAL flush
                    # less before its client sees the answer.
                    ended = (self.finisher.end_in(tx, claimed.batch)
                             if claimed.type == "Q" and not retry and res.written
                             and res.status != BatchStatus.ABORTED.value else None)
                if ended is not None:
                    claimed.ended = True
                    self.finisher.announce_end(ended)
                if res.late:  # results kept past an abort changed the final counts: re-cache them
                    self.finisher.refresh_summary(claimed.batch)
                return res
            except AlyaError as exc:
                log.warning("write_failed", batch=claimed.batch, attempt=attempt, error=str(exc))
                if attempt == WRITE_TRIES:  # the outcomes may be of several claims: their own attempts
                    self.release(claimed, [o.line for o in outcomes], [o.attempts for o in outcomes])
                    raise
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def check_aborts(self, claims: list[Claimed], log: Any) -> None:
        """An abort check for claims with nothing to write yet (rows still running)."""
        open_claims = [c for c in claims if not c.aborted]
        if not open_claims:
            return
        try:
            with self.svc.store.tx() as tx:
                states = tx.batch_statuses(ids=list({c.batch for c in open_claims}))
            statuses = {s.id: s.status for s in states}
        except AlyaError as exc:
            log.warning("abort_check_failed", error=str(exc))
            return
        for c in open_claims:
            if statuses.get(c.batch) is None or ended_status(statuses.get(c.batch)):
                aborted_seen([c], log)

    def release(self, claimed: Claimed, lines: list[int], attempts: list[int] | None = None) -> bool:
        """Give claimed rows back to the queue, their attempt restored (they were not tried). If even that
        fails, this worker stops vouching for them (a new identity): rows must never stay inprog under a
        live heartbeat, and recovery requeues them after ALYA_RECOVERY_SEC as for a dead worker. ``attempts``:
        each line's claimed attempt (default: looked up in the claim's rows)."""
        try:
            if attempts is None:
                of = {r.line: r.attempts for r in claimed.rows}
                attempts = [of[x] for x in lines]
            with self.svc.store.tx() as tx:
                tx.release_rows(batch=claimed.batch, lines=lines, attempts=attempts, worker=claimed.worker)
                tx.notify_work(claimed.app, claimed.op)
            return True
        except Exception as exc:
            self.identity.log.error("release_failed", batch=claimed.batch, rows=len(lines), error=describe(exc))
            self.identity.retire(claimed.worker)
            return False


def ended_status(status: str | None) -> bool:
    """Whether a write-back's batch status says the batch has ended while rows of it were held: aborted, or
    stopped past its failure threshold (a batch summarised normally has no rows in progress)."""
    return status is not None and BatchStatus(status).is_final


def aborted_seen(claims: list[Claimed], log: Any) -> None:
    """The batch of these claims was aborted: their unstarted rows are not run, nothing is given back."""
    for c in claims:
        if not c.aborted:
            c.aborted = c.cancelled = True
            log.info("batch_aborted_seen", batch=c.batch, rows_unfinished=c.pending)


def _write_part(tx: Queries, claimed: Claimed, params: dict[str, list[Any]]) -> WriteResult:
    """The usual write-back; after an abort, a second statement keeps the results of rows whose call
    returned before the abort committed (the hot path never pays for that case)."""
    res = tx.write_results(batch=claimed.batch, worker=claimed.worker, **params)
    if res.status != BatchStatus.ABORTED.value or res.written == len(params["lines"]):
        return res
    late, ver = tx.write_results_late(batch=claimed.batch, worker=claimed.worker, **params)
    return WriteResult(res.status, res.written + late, late, ver)


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
