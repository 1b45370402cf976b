"""Failed rows from the client's side: retrying a failed batch's failed rows (``jm.batch_retry_failed``,
``alya retry``) and reading a final batch's rows of one status back (``alya done --export --status``,
``--inputs``). The failure threshold itself is the finisher's (``Finisher.stop_if_too_many_failures``), run
by the workers after their write-backs.

A retry is one transaction: the batch is reopened by a conditional UPDATE (only a final ``failed`` batch,
so that two retries at once requeue once), then its failed rows (and aborted ones, if asked) are requeued
by one set-based statement per status, and workers are woken at the commit. Fewer rows requeued than the
batch's stored counts say it has means a purge is removing it (retention: its week of ``batchrows``
detached by a purge that has not yet deleted its record, or its rows deleted in steps before its record):
``BatchNotFound``, nothing changed, as once the purge has ended. Its Redis summary is then
replaced (``Statuses.reopen``): a poller never reads the old final status again. When the requeued rows
are final the batch is summarised as at its first end (counts, output files rebuilt in line order over all
its rows, ``mark_done`` again, its details' ``round`` one more). Rows that succeeded never run again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from alya.batch.services import Services
from alya.batch.status import record_summary
from alya.core import validate
from alya.core.errors import BatchNotFound, InvalidInput, InvalidState
from alya.core.logs import status_change
from alya.core.models import BatchOutput, BatchStatus
from alya.core.names import retry_key
from alya.core.records import BatchRecord
from alya.db.queries import Queries


@dataclass(frozen=True, slots=True)
class Retried:
    """A retry's outcome: the batch as reopened and the rows requeued (failed, aborted)."""

    rec: BatchRecord
    failed: int
    aborted: int

    @property
    def nrows(self) -> int:
        return self.failed + self.aborted

    @property
    def dispatch_key(self) -> str:
        """The idempotency key of the round's flow run (ALYA_DISPATCH=prefect): one run per round."""
        return retry_key(self.rec.id, self.rec.round)


def retry_failed(svc: Services, batch_id: str, include_aborted: bool = False) -> Retried:
    """Requeue the failed (and, with ``include_aborted``, aborted) rows of a final ``failed`` batch and reopen
    it. ``InvalidState`` (nothing changed) unless the batch is a final ``failed`` batch with rows to requeue;
    ``BatchNotFound`` when there is no such batch."""
    batch_id = validate.batch_id(batch_id)
    if not isinstance(include_aborted, bool):
        raise InvalidInput(f"include_aborted must be a bool, got {type(include_aborted).__name__}")

    def retry(q: Queries) -> Retried:
        rec = q.reopen_batch(id=batch_id)
        if rec is None:  # why not: nothing was changed, so the batch can be read as it is
            found = q.get_batch(id=batch_id)
            if found is None:
                raise BatchNotFound(f"no batch {batch_id}")
            if found.is_query:
                raise InvalidState(f"{batch_id} is a slow query: only a batch's failed rows are retried")
            raise InvalidState(f"batch {batch_id} is {found.status.value}: only a failed batch is retried")
        failed = q.requeue_rows(batch=batch_id, status=BatchStatus.FAILED.value)
        aborted = q.requeue_rows(batch=batch_id, status=BatchStatus.ABORTED.value) if include_aborted else 0
        if failed < rec.nfailed or aborted < (rec.naborted if include_aborted else 0):
            # Rows the batch's stored counts say it has are gone: a purge is removing it (its week of
            # batchrows detached, or its rows deleted in steps, its record last). Reopened, it would be a
            # batch without those rows (and without its record once the purge ends); rolled back instead.
            raise BatchNotFound(f"no batch {batch_id}: it is being purged")
        if failed + aborted == 0:  # raised: the transaction rolls back and the batch stays as it was
            what = "failed or aborted rows" if include_aborted else "failed rows (include_aborted=True?)"
            raise InvalidState(f"batch {batch_id} has no {what} to retry")
        q.notify_work(rec.app, rec.op)
        return Retried(rec, failed, aborted)

    done = svc.store.run(retry)
    rec = done.rec
    status_change(rec.app, rec.op, batch_id, BatchStatus.QUEUED.value, old=BatchStatus.FAILED.value,
                  round=rec.round, rows_failed=done.failed, rows_aborted=done.aborted)
    summary = svc.store.run(lambda q: record_summary(q, rec), readonly=True)  # counted at the new version
    svc.statuses.reopen(batch_id, summary)
    return done


def final_status(svc: Services, batch_id: str) -> BatchStatus:
    """The batch's status, which must be final (rows are read back only then)."""
    s = svc.statuses.read(validate.batch_id(batch_id)).value
    if not s.status.is_final:
        raise InvalidState(f"batch {batch_id} is {s.status.value}: its rows can be read once it is final")
    return s.status


def row_status(status: str | None) -> str | None:
    """A row status to filter by (a final one), or None for all."""
    if status is None:
        return None
    try:
        value = BatchStatus(status.lower())
    except ValueError:
        value = None
    if value is None or not value.is_final:
        raise InvalidInput(f"status must be success, failed or aborted, got {status!r}")
    return value.value


def stream_rows(svc: Services, batch_id: str, status: str | None) -> Iterator[BatchOutput]:
    """A final batch's rows of ``status`` (None: all) in line order, from a server-side cursor. Checked at
    the call (a refusal comes before any file is opened); read while iterated (consume it or close it)."""
    batch_id, status = validate.batch_id(batch_id), row_status(status)
    final_status(svc, batch_id)

    def rows() -> Iterator[BatchOutput]:
        with svc.store.tx() as q:
            yield from q.stream_batch_rows_of_status(id=batch_id, status=status)

    return rows()


def input_columns(svc: Services, batch_id: str, status: str | None) -> list[str]:
    """The input keys of a final batch's rows of ``status``, in order of first appearance (a CSV's header)."""
    batch_id, status = validate.batch_id(batch_id), row_status(status)
    final_status(svc, batch_id)
    return svc.store.run(lambda q: q.batch_input_keys(id=batch_id, status=status), readonly=True)


def stream_inputs(svc: Services, batch_id: str, status: str | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """A final batch's rows of ``status`` (None: all) as submitted, ``(line, input)`` in line order; checked
    at the call, read while iterated (as :func:`stream_rows`)."""
    batch_id, status = validate.batch_id(batch_id), row_status(status)
    final_status(svc, batch_id)

    def inputs() -> Iterator[tuple[int, dict[str, Any]]]:
        with svc.store.tx() as q:
            yield from q.stream_batch_inputs(id=batch_id, status=status)

    return inputs()
