"""Running rows: the processor call of each claimed row, in the process's row pool.

The executor owns the :class:`~alya.engine.rowpool.RowPool` (``ALYA_CONCURRENCY`` slots shared by every claim
of every batch in the process) and the call of the application's processor, which never raises: every
call comes to an :class:`~alya.batch.outcomes.Outcome` (accepted, a fault to retry, failed, timed out) that
the completer writes back. It knows nothing of PostgreSQL.
"""

from __future__ import annotations

import inspect
import traceback
from typing import Any

import orjson

from alya.batch.outcomes import Outcome, accepted, fault
from alya.core.errors import describe
from alya.core.records import ClaimedRow
from alya.core.registry import Registration
from alya.core.settings import JobManagerConfig
from alya.engine.claim import Claimed
from alya.engine.rowpool import Job, PoolStats, RowPool


class Executor:
    """The row pool and the processor calls. The pool has its own lock; this class holds no state."""

    def __init__(self, config: JobManagerConfig) -> None:
        self.pool = RowPool(_Runner(config), config.concurrency, config.row_timeout_sec)
        self.bulk_rows = config.bulk_rows
        self._bulk_types: set[tuple[str, str]] = set()  # types whose pool jobs are bulk calls

    @property
    def concurrency(self) -> int:
        return self.pool.concurrency

    def submit(self, claimed: Claimed, reg: Registration) -> None:
        """Queue the claim's rows on the pool's slots (its processor's coroutine slots if it is async)."""
        bulk = getattr(reg.processor, "do_batch_jobs", None) if reg.type == "B" else None
        if callable(bulk):
            self._bulk_types.add((reg.app, reg.op))
            self.pool.submit(self.groups(claimed, inspect.iscoroutinefunction(bulk)), stats_key=(reg.app, reg.op),
                             lane=claimed.batch, priority=claimed.priority)
            return
        method = reg.processor.do_slow_query if reg.type == "Q" else reg.processor.do_batch_job
        is_async = inspect.iscoroutinefunction(method)
        self.pool.submit([Job(claimed, row, is_async) for row in claimed.rows], stats_key=(reg.app, reg.op),
                         lane=claimed.batch, priority=claimed.priority)

    def groups(self, claimed: Claimed, is_async: bool) -> list[Job]:
        """A bulk processor's calls: the claim's first-attempt rows in groups of up to ``ALYA_BULK_ROWS``
        (in line order), and every row on a later attempt alone. A row is on a later attempt because a
        call it was in faulted: alone, it faults (and uses up its attempts) only for what it does itself."""
        fresh = [r for r in claimed.rows if r.attempts <= 1]
        alone = [[r] for r in claimed.rows if r.attempts > 1]
        n = self.bulk_rows
        return [Job(claimed, g[0], is_async, group=g)
                for g in [fresh[i:i + n] for i in range(0, len(fresh), n)] + alone]

    def backlog(self, app: str | None = None, op: str | None = None) -> int:
        """Rows queued on the pool and not yet started (of batch type (app, op) if given). The pool counts
        calls: a bulk type's are counted as full calls (an upper bound), so that its claim loop does not
        take a hundred times the rows it means to hold."""
        if app is None:
            return self.pool.backlog(None)
        n = self.pool.backlog((app, op))
        return n * self.bulk_rows if (app, op) in self._bulk_types else n

    def row_stats(self, app: str, op: str) -> PoolStats | None:
        return self.pool.stats.get((app, op))

    def expire(self) -> int:
        """Finish calls past ``ALYA_ROW_TIMEOUT_SEC`` as timeout faults (the claim loop calls this)."""
        return self.pool.expire()

    def close(self) -> None:
        self.pool.close()


class _Runner:
    """The processor call of one row, as the row pool runs it: never raises, always an Outcome."""

    def __init__(self, config: JobManagerConfig) -> None:
        self.cfg = config

    def run(self, job: Job) -> Outcome | list[Outcome]:
        c: Claimed = job.owner  # type: ignore[assignment]
        row = job.row
        if job.group is not None:
            try:
                rows = [(r.line, orjson.loads(r.input)) for r in job.group]
                return self._group(c, job.group, c.processor.do_batch_jobs(c.initblock, c.context, rows))
            except (Exception, SystemExit) as exc:
                return self._group_fault(c, job.group, describe(exc), traceback.format_exc(limit=3))
        try:
            value = orjson.loads(row.input)
            if c.type == "Q":
                result = c.processor.do_slow_query(c.initblock, c.context, value)
            else:
                result = c.processor.do_batch_job(c.initblock, c.context, row.line, value)
            outcome = accepted(row.line, row.attempts, result, c.type == "Q")
        except (Exception, SystemExit) as exc:  # SystemExit: a processor calling sys.exit() is a fault too
            return self._fault(c, row, describe(exc), traceback.format_exc(limit=3))
        self._logged(c, outcome)
        return outcome

    async def run_async(self, job: Job) -> Outcome | list[Outcome]:
        c: Claimed = job.owner  # type: ignore[assignment]
        row = job.row
        if job.group is not None:
            try:
                rows = [(r.line, orjson.loads(r.input)) for r in job.group]
                return self._group(c, job.group, await c.processor.do_batch_jobs(c.initblock, c.context, rows))
            except Exception as exc:
                return self._group_fault(c, job.group, describe(exc), traceback.format_exc(limit=3))
        try:
            value = orjson.loads(row.input)
            if c.type == "Q":
                result = await c.processor.do_slow_query(c.initblock, c.context, value)
            else:
                result = await c.processor.do_batch_job(c.initblock, c.context, row.line, value)
            outcome = accepted(row.line, row.attempts, result, c.type == "Q")
        except Exception as exc:
            return self._fault(c, row, describe(exc), traceback.format_exc(limit=3))
        self._logged(c, outcome)
        return outcome

    def timed_out(self, job: Job, seconds: float) -> Outcome | list[Outcome]:
        c: Claimed = job.owner  # type: ignore[assignment]
        what = "row" if job.group is None else f"call of {len(job.group)} rows"
        error = f"{what} timed out after {seconds:.1f} s (ALYA_ROW_TIMEOUT_SEC={self.cfg.row_timeout_sec:g})"
        if job.group is not None:
            return self._group_fault(c, job.group, error, None)
        return self._fault(c, job.row, error, None)

    def _group(self, c: Claimed, rows: list[ClaimedRow], results: Any) -> list[Outcome]:
        """A bulk call's answer: one result per row, in order (else the whole call is a fault); a
        malformed result is that row's own fault."""
        results = list(results)
        if len(results) != len(rows):
            raise ValueError(f"do_batch_jobs returned {len(results)} results for {len(rows)} rows")
        out = []
        for row, result in zip(rows, results, strict=True):
            try:
                outcome = accepted(row.line, row.attempts, result, False)
            except Exception as exc:
                out.append(self._fault(c, row, describe(exc), None))
                continue
            self._logged(c, outcome)
            out.append(outcome)
        return out

    def _group_fault(self, c: Claimed, rows: list[ClaimedRow], error: str, trace: str | None) -> list[Outcome]:
        """A bulk call that raised, timed out or answered the wrong number of results. Alone, the row's own
        fault. Of several rows, none is to blame yet: each is requeued (after the first retry delay) to run
        alone, where only its own faults use up its attempts (so a group fault never fails a row)."""
        if len(rows) == 1:
            return [self._fault(c, rows[0], error, trace)]
        c.log.warning("bulk_call_fault", batch=c.batch, lines=f"{rows[0].line}-{rows[-1].line}", nrows=len(rows),
                      error=error, trace=trace, next="each row retried alone")
        return [fault(r.line, r.attempts, error, r.attempts + 1, self.cfg.retry_backoff_sec) for r in rows]

    def _fault(self, c: Claimed, row: ClaimedRow, error: str, trace: str | None) -> Outcome:
        outcome = fault(row.line, row.attempts, error, self.cfg.max_attempts, self.cfg.retry_backoff_sec)
        c.log.warning("row_fault", batch=c.batch, line=row.line, attempt=row.attempts, old="inprog",
                      new=outcome.status, error=error, trace=trace if outcome.status == "failed" else None)
        return outcome

    @staticmethod
    def _logged(c: Claimed, outcome: Outcome) -> None:
        if outcome.status == "failed":  # its error codes and fields: what went wrong, in the run's logs too
            c.log.info("row_status", batch=c.batch, line=outcome.line, old="inprog", new="failed",
                       errors=error_codes(outcome.messages))
        else:  # per-row success at debug: at 30k rows/s an info line per row would be the load
            c.log.debug("row_status", batch=c.batch, line=outcome.line, old="inprog", new=outcome.status)


def error_codes(messages: str | None) -> str:
    """A failed row's messages (JSON text) as one short text: ``bad_amount (amount), over_limit``."""
    try:
        parsed = orjson.loads(messages) if messages else []
        return ", ".join(str(m.get("errcode")) + (f" ({m['field']})" if m.get("field") else "") for m in parsed)
    except (ValueError, TypeError, AttributeError):
        return str(messages)
