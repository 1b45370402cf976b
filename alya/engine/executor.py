"""Running rows: the processor call of each claimed row, in the process's row pool.

The executor owns the :class:`~alya.engine.rowpool.RowPool` (``ALYA_CONCURRENCY`` slots shared by every claim
of every batch in the process) and the call of the application's processor, which never raises: every
call comes to an :class:`~alya.batch.outcomes.Outcome` (accepted, a fault to retry, failed, timed out) that
the completer writes back. It knows nothing of PostgreSQL.
"""

from __future__ import annotations

import inspect
import traceback

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

    @property
    def concurrency(self) -> int:
        return self.pool.concurrency

    def submit(self, claimed: Claimed, reg: Registration) -> None:
        """Queue the claim's rows on the pool's slots (its processor's coroutine slots if it is async)."""
        method = reg.processor.do_slow_query if reg.type == "Q" else reg.processor.do_batch_job
        is_async = inspect.iscoroutinefunction(method)
        self.pool.submit([Job(claimed, row, is_async) for row in claimed.rows], stats_key=(reg.app, reg.op),
                         lane=claimed.batch, priority=claimed.priority)

    def backlog(self, app: str | None = None, op: str | None = None) -> int:
        """Rows queued on the pool and not yet started (of batch type (app, op) if given)."""
        return self.pool.backlog(None if app is None else (app, op))

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
            return self._fault(c, row, describe(exc), traceback.format_exc(limit=3))
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
            return self._fault(c, row, describe(exc), traceback.format_exc(limit=3))
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
