"""The status read model: a batch's status, counts and output files (the contract's ``BatchSummary``) and
its final rows, read from Redis when cached, from PostgreSQL otherwise, and written to Redis after every
status change.

This is the one place that builds a status: clients (batch_status, batch_done), the engine (after a claim,
a write-back, finishing a batch: ``alya.batch.finish``) and the facade (after submit, abort) all go through
``Statuses``, so the cached form and the version rule cannot differ between writers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from alya.core.errors import BatchNotFound
from alya.core.models import BatchOutput, BatchStatus, BatchSummary
from alya.core.names import done_key, summary_key
from alya.core.records import BatchRecord, Counts, batch_output
from alya.db.queries import Queries
from alya.db.store import Store
from alya.io.cache import StatusCache


@dataclass(frozen=True, slots=True)
class Summary:
    """A BatchSummary and the batch version it was read at (the cache keeps the newest version)."""

    value: BatchSummary
    ver: int

    def as_cached(self) -> dict[str, Any]:
        return self.value.as_row()  # the cache adds ``ver`` and ``final``

    @classmethod
    def from_cached(cls, d: dict[str, Any]) -> Summary:
        return cls(BatchSummary.from_row(d), int(d.get("ver", 0)))


def make_summary(status: BatchStatus, nrows: int, counts: Counts, outputfiles: dict[str, str], ver: int,
                 error: str | None = None) -> Summary:
    return Summary(BatchSummary(status=status, outputfiles=outputfiles, nrows=nrows, nsuccess=counts.success,
                                nfailed=counts.failed, naborted=counts.aborted, nqueued=counts.queued,
                                ninprog=counts.inprog, error=error), ver)


def record_summary(q: Queries, rec: BatchRecord) -> Summary:
    """A final batch's counts are stored on it; an open one's are counted from its rows."""
    if rec.status.is_final:
        counts = Counts(success=rec.nsuccess, failed=rec.nfailed, aborted=rec.naborted)
    else:
        counts = q.row_counts(id=rec.id)
    return make_summary(rec.status, rec.nrows, counts, rec.outputfiles, rec.ver, rec.error)


# The status of a batch that workers are changing (queued, inprog) lives at most this long in Redis: a
# worker that cannot reach Redis cannot invalidate it, so it must expire by itself; and since workers do not
# invalidate it per write-back (each invalidation cost a recount of the whole batch), this expiry is also
# how pollers see progress.
OPEN_TTL_SEC = 5
_WORKED_ON = (BatchStatus.QUEUED, BatchStatus.INPROG)


class Statuses:
    """Batch statuses (``BatchSummary`` at a version) and final rows: Redis first, PostgreSQL behind it."""

    def __init__(self, store: Store, cache: StatusCache, done_cache_rows: int) -> None:
        self.store = store
        self.cache = cache
        self.done_cache_rows = done_cache_rows

    def read(self, batch_id: str) -> Summary:
        """From Redis when cached, else from PostgreSQL (and then cached)."""
        cached = self.cache.get(summary_key(batch_id))
        if cached is not None:
            return Summary.from_cached(cached)
        def read(q: Queries) -> Summary:
            rec = q.get_batch(id=batch_id)
            if rec is None:
                raise BatchNotFound(f"no batch {batch_id}")
            return record_summary(q, rec)

        summary = self.store.run(read, readonly=True)
        self.put(batch_id, summary)
        return summary

    def put(self, batch_id: str, summary: Summary) -> None:
        """Cache a status unless a newer version is cached (never raises: the cache is optional)."""
        status = summary.value.status
        self.cache.put(summary_key(batch_id), summary.as_cached(), summary.ver, status.is_final,
                       ttl=OPEN_TTL_SEC if status in _WORKED_ON else None)

    def put_new(self, batch_id: str, ver: int, status: BatchStatus, nrows: int, counts: Counts,
                outputfiles: dict[str, str] | None = None, error: str | None = None) -> Summary:
        summary = make_summary(status, nrows, counts, outputfiles or {}, ver, error)
        self.put(batch_id, summary)
        return summary

    def invalidate(self, batch_id: str, ver: int) -> None:
        """The next read recounts from PostgreSQL (a reader holding an older version cannot refill it)."""
        self.cache.invalidate(summary_key(batch_id), ver)

    def final_rows(self, batch_id: str, summary: Summary) -> list[BatchOutput]:
        """Every row of a final batch, ordered by line; small batches are cached whole."""
        if summary.value.nrows <= self.done_cache_rows:
            cached = self.cache.get(done_key(batch_id))
            if cached is not None:
                return [batch_output(r) for r in cached["rows"]]
            stored = self.store.run(lambda q: q.batch_rows(id=batch_id), readonly=True)
            self.cache.put(done_key(batch_id), {"rows": [r.as_cached() for r in stored]}, summary.ver, final=True)
            return [r.output() for r in stored]

        # Large: rows go from a server-side cursor straight into the result, never held twice.
        return self.store.run(lambda q: list(q.stream_batch_rows(id=batch_id)), readonly=True)

    def stream_rows(self, batch_id: str, itersize: int = 5000) -> Iterator[BatchOutput]:
        """Every row of a final batch, ordered by line, read ``itersize`` at a time from a server-side
        cursor: memory stays flat however large the batch. The read transaction stays open while the
        caller iterates; closing the iterator early ends it."""
        with self.store.tx() as q:
            yield from q.stream_batch_rows(id=batch_id, itersize=itersize)
