"""The status read model: a batch's status, counts and output files (the contract's ``BatchSummary``) and
its final rows, read from Redis when cached, from PostgreSQL otherwise, and written to Redis after every
status change.

This is the one place that builds a status: clients (batch_status, batch_done), the engine (after a claim,
a write-back, finishing a batch: ``alya.batch.finish``) and the facade (after submit, abort) all go through
``Statuses``, so the cached form and the version rule cannot differ between writers.

Redis is not trusted: anyone who reaches it may write any value under a batch's key. A cached summary is
used only if every field checks (types, a known status agreeing with ``final``, counts within ``nrows``, a
version in range), and cached rows only if they carry the summary's version and its row count; anything
else is a miss that PostgreSQL answers and overwrites. A value whose version is above PostgreSQL's (or that
claims final where PostgreSQL does not) can only be forged: a write it blocks replaces it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from alya.core.errors import BatchNotFound, InvalidState
from alya.core.logs import get_logger
from alya.core.models import BatchOutput, BatchStatus, BatchSummary, SlowQueryDone, messages_from_json
from alya.core.names import done_key, summary_key
from alya.core.records import BatchRecord, Counts, RowResult, batch_output
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
    def from_cached(cls, d: dict[str, Any]) -> Summary | None:
        """The summary of a cached value, or None when any field fails its check (a forged or garbled
        value is a miss, never an exception)."""
        ver, final = d.get("ver"), d.get("final")
        if type(ver) is not int or not 0 < ver <= MAX_VER or type(final) is not bool:
            return None
        try:
            s = BatchSummary.from_row(d)
        except (KeyError, ValueError, TypeError):
            return None
        counts = [getattr(s, name) for name in _COUNTS]
        if s.status.is_final is not final or any(type(c) is not int or c < 0 for c in counts) \
                or sum(counts[1:]) > s.nrows:
            return None
        if not isinstance(s.outputfiles, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in s.outputfiles.items()):
            return None
        if (s.error is not None and not isinstance(s.error, str)) or type(s.paused) is not bool:
            return None
        return cls(s, ver)


MAX_VER = 2**31 - 1  # batches.ver is an integer column
_COUNTS = ("nrows", "nsuccess", "nfailed", "naborted", "nqueued", "ninprog")


def cached_rows(cached: dict[str, Any] | None, summary: Summary) -> list[BatchOutput] | None:
    """The rows of a cached done entry, if it is the one of this summary (same version, one row per line
    of the batch, each a final row); else None (a miss)."""
    if cached is None or cached.get("ver") != summary.ver or type(cached.get("ver")) is not int:
        return None
    rows = cached.get("rows")
    if not isinstance(rows, list) or len(rows) != summary.value.nrows:
        return None
    try:
        out = [batch_output(r) for r in rows]
    except (ValueError, TypeError, KeyError):
        return None
    if any(type(r.line) is not int or not r.status.is_final or (r.res is not None and not isinstance(r.res, dict))
           for r in out):
        return None
    return out


def make_summary(status: BatchStatus, nrows: int, counts: Counts, outputfiles: dict[str, str], ver: int,
                 error: str | None = None, paused: bool = False) -> Summary:
    return Summary(BatchSummary(status=status, outputfiles=outputfiles, nrows=nrows, nsuccess=counts.success,
                                nfailed=counts.failed, naborted=counts.aborted, nqueued=counts.queued,
                                ninprog=counts.inprog, error=error, paused=paused and not status.is_final), ver)


def record_summary(q: Queries, rec: BatchRecord) -> Summary:
    """A final batch's counts are stored on it; an open one's are read from its counters (kept by
    PostgreSQL triggers on every statement that moves rows: ``alya.db.counters``), not counted from its
    rows: O(1) in the batch's size."""
    if rec.status.is_final:
        counts = Counts(success=rec.nsuccess, failed=rec.nfailed, aborted=rec.naborted)
    else:
        counts = q.batch_counts(id=rec.id)
    return make_summary(rec.status, rec.nrows, counts, rec.outputfiles, rec.ver, rec.error, rec.paused)


# The status of a batch that workers are changing (queued, inprog) lives at most this long in Redis: a
# worker that cannot reach Redis cannot invalidate it, so it must expire by itself; and since workers do not
# invalidate it per write-back (that would be a Redis call per write-back, and every poller's next read a
# PostgreSQL read, however cheap the counters made it), this expiry is also how pollers see progress.
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
        checked = Summary.from_cached(cached) if cached is not None else None
        if checked is not None:
            return checked
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
        key = summary_key(batch_id)
        ttl = OPEN_TTL_SEC if status in _WORKED_ON else None
        if not self.cache.put(key, summary.as_cached(), summary.ver, status.is_final, ttl=ttl) \
                and self._forged(batch_id, key, summary.ver):
            self.cache.put(key, summary.as_cached(), summary.ver, status.is_final, ttl=ttl)

    def _forged(self, batch_id: str, key: str, ver: int) -> bool:
        """After a put the cache refused (it holds a newer or a final value): whether that value is forged,
        i.e. newer than PostgreSQL's version or final where PostgreSQL's batch is not (every real value is
        written after its commit, so it can be neither). A forged value is deleted. Costs one read of the
        batch, only on refused puts (rare: a stale reader losing a race)."""
        held = self.cache.get(key, stale=True)
        if held is None or not self.cache.available:
            return False
        held_ver, held_final = held.get("ver"), held.get("final")
        if type(held_ver) is int and held_ver <= ver and held_final is not True:
            return False
        rec = self.store.run(lambda q: q.get_batch(id=batch_id), readonly=True)
        if rec is not None and type(held_ver) is int and held_ver <= rec.ver and \
                (held_final is not True or rec.status.is_final):
            return False
        get_logger().warning("cache_value_forged", batch=batch_id, cached_ver=str(held_ver)[:20],
                             ver=rec.ver if rec else None, next="replaced from PostgreSQL")
        self.cache.delete(key)
        return True

    def put_new(self, batch_id: str, ver: int, status: BatchStatus, nrows: int, counts: Counts,
                outputfiles: dict[str, str] | None = None, error: str | None = None, paused: bool = False) -> Summary:
        summary = make_summary(status, nrows, counts, outputfiles or {}, ver, error, paused)
        self.put(batch_id, summary)
        return summary

    def reopen(self, batch_id: str, summary: Summary) -> None:
        """A final batch opened again (a retry), at a newer version: its summary replaces the cached final one
        (which no ordinary put may), and its cached rows go. A reader that read the final status before the
        reopen holds an older version, so it cannot put it back: pollers never see the old end again."""
        key = summary_key(batch_id)
        if not self.cache.put(key, summary.as_cached(), summary.ver, False, ttl=OPEN_TTL_SEC, reopen=True):
            self.cache.delete(key)  # a newer value, or Redis failing: gone either way (remembered if down)
        self.cache.delete(done_key(batch_id))

    def invalidate(self, batch_id: str, ver: int) -> None:
        """The next read recounts from PostgreSQL (a reader holding an older version cannot refill it)."""
        self.cache.invalidate(summary_key(batch_id), ver)

    def final_rows(self, batch_id: str, summary: Summary) -> list[BatchOutput]:
        """Every row of a final batch, ordered by line; small batches are cached whole."""
        if summary.value.nrows <= self.done_cache_rows:
            key = done_key(batch_id)
            rows = cached_rows(self.cache.get(key), summary)
            if rows is not None:
                return rows
            stored = self.store.run(lambda q: q.batch_rows(id=batch_id), readonly=True)
            self.put_rows(batch_id, summary.ver, stored)
            return [r.output() for r in stored]

        # Large: rows go from a server-side cursor straight into the result, never held twice.
        return self.store.run(lambda q: list(q.stream_batch_rows(id=batch_id)), readonly=True)

    def put_rows(self, batch_id: str, ver: int, rows: list[RowResult]) -> None:
        """Cache every row of a final batch at its final version (never raises: the cache is optional)."""
        key = done_key(batch_id)
        value = {"rows": [r.as_cached() for r in rows]}
        if not self.cache.put(key, value, ver, final=True) and self._forged(batch_id, key, ver):
            self.cache.put(key, value, ver, final=True)

    def slowquery_done(self, req_id: str) -> SlowQueryDone:
        """A slow query's result once final (its status alone before). Its row comes from the done cache, which
        the worker that ended it filled (``Finisher.announce_end``): a poll that sees the answer reads Redis
        only, as a poll before it does."""
        summary = self.read(req_id)
        s = summary.value
        if not s.status.is_final:
            return SlowQueryDone(status=s.status, result=None, messages=[], outputfiles={})
        if s.nrows == 1 and self.done_cache_rows >= 1:
            rows = self.final_rows(req_id, summary)
            if rows[0].line != 0:
                raise InvalidState(f"{req_id} is not a slow query")
            return SlowQueryDone(status=s.status, result=rows[0].res, messages=rows[0].messages,
                                 outputfiles=s.outputfiles)
        row = self.store.run(lambda q: q.slowquery_row(id=req_id), readonly=True)
        if row is None:
            raise InvalidState(f"{req_id} is not a slow query")
        return SlowQueryDone(status=s.status, result=row.res, messages=messages_from_json(row.messages),
                             outputfiles=s.outputfiles)

    def stream_rows(self, batch_id: str, itersize: int = 5000) -> Iterator[BatchOutput]:
        """Every row of a final batch, ordered by line, read ``itersize`` at a time from a server-side
        cursor: memory stays flat however large the batch. The read transaction stays open while the
        caller iterates; closing the iterator early ends it."""
        with self.store.tx() as q:
            yield from q.stream_batch_rows(id=batch_id, itersize=itersize)
