"""Retention: deleting final batches (and slow queries) that ended before a date, with their rows, their
file-intake records, their cached statuses and, when asked, their output files.

First, weeks of ``batchrows`` (migration 0012: partitions by range of UUIDv7 batch ids) whose batches are
all purgeable are detached and dropped whole, whatever their size (:func:`_drop_partitions`); what is left
(and the records of those batches) goes as follows. A purge is many small transactions, never one big
one: batches go in groups of about ``chunk_rows`` rows (one ``purge_batches`` statement per group), and a
batch bigger than that loses its rows ``chunk_rows`` at a time (``purge_rows``) before its record goes. So
a purge of months of history holds each lock for a fraction of a second (workers claim and write back
meanwhile), writes a bounded amount of WAL per commit, and leaves dead tuples that autovacuum reclaims as
it goes (``bench purge`` measures it).

Open batches are never touched: every statement re-checks, under the batch's lock, that the batch is final
and ended before ``before``. Two purges at once skip each other's batches (``SKIP LOCKED``). A purge that
stops halfway (an outage) has removed whole groups; running it again finishes the rest. While a batch of
more than ``chunk_rows`` rows is being purged, a reader of its rows may see part of them: its record (its
status and counts) goes last. Output files are deleted before the batch's record, so a failure never
leaves files that no record points at.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from alya.batch.services import Services
from alya.core import validate
from alya.core.errors import InvalidInput
from alya.core.ids import id_time
from alya.core.logs import get_logger
from alya.core.models import PurgeReport
from alya.core.names import done_key, summary_key
from alya.core.records import PurgeCandidate

CHUNK_ROWS = 10_000  # rows per purge transaction
PAGE = 1000  # candidates read per look-up
DROP_ATTEMPTS = 5  # a partition's DROP that cannot have its locks soon is tried this often, then left
_START = datetime(1970, 1, 1, tzinfo=UTC)
_NO_ID = "00000000-0000-0000-0000-000000000000"


def purge_before(value: Any) -> datetime:
    """``before`` must be an aware datetime: a naive one is ambiguous by hours (the server's zone or UTC?)."""
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(f"before must be a timezone-aware datetime, got {value!r}")
    return value


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``3600s``, ``2w`` (a bare number is days) as a duration."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(text).lower())
    if m is None:
        raise InvalidInput(f"not an age: {text!r} (give e.g. 30d, 12h, 90m)")
    return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2) or "d"])


def retention_cutoff(days: float, now: datetime | None = None) -> datetime | None:
    """The ``before`` of ALYA_RETENTION_DAYS (None: 0 keeps everything)."""
    if days <= 0:
        return None
    return (now or datetime.now(UTC)) - timedelta(days=days)


def purge(svc: Services, before: datetime, app: str | None = None, files: bool = False, *,
          chunk_rows: int = CHUNK_ROWS, max_sec: float | None = None) -> PurgeReport:
    """Delete final batches that ended before ``before`` (of ``app``, or of every app), see the module.
    ``max_sec``: stop after about this long (maintenance purges a little at every tick); the rest is left
    for the next call."""
    before = purge_before(before)
    app = validate.app_name(app) if app is not None else None
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise InvalidInput(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    deadline = None if max_sec is None else time.monotonic() + max_sec
    report = _Counts()
    _drop_partitions(svc, before, app, report, deadline)
    after_at, after_id = _START, _NO_ID
    page: list[PurgeCandidate] | None = None
    while (page is None or page) and not _late(deadline):
        with svc.store.tx() as q:
            page = q.purgeable_batches(before=before, app=app, after_at=after_at, after_id=after_id, n=PAGE)
        if page:
            after_at, after_id = page[-1].doneat, page[-1].id
        for group in _groups(page, chunk_rows):
            if _late(deadline):
                break
            _purge_group(svc, group, before, files, chunk_rows, report, deadline)
    if app is None and not _late(deadline):
        while True:  # records of rejected files: they have no batch
            with svc.store.tx() as q:
                n = q.purge_rejected_files(before=before, n=chunk_rows)
            report.nrecords += n
            if n < chunk_rows:
                break
    out = PurgeReport(nbatches=report.nbatches, nrows=report.nrows, nfiles=report.nfiles, nrecords=report.nrecords)
    if out.nbatches or out.nrecords or report.npartitions:
        get_logger().info("batches_purged", before=before.isoformat(), app=app, batches=out.nbatches, rows=out.nrows,
                          files=out.nfiles, records=out.nrecords, partitions=report.npartitions)
    return out


def _drop_partitions(svc: Services, before: datetime, app: str | None, report: _Counts,
                     deadline: float | None) -> None:
    """The cheap path (migration 0012): a range partition of ``batchrows`` whose week ended before
    ``before`` and whose batches are all purgeable goes whole, whatever its size. A partition holding an
    open or younger batch (or, with ``app``, another app's) is left to the batched DELETE below, as are the
    default partition's rows; the batch records of a dropped partition go there too (their rows are gone:
    a probe each). Three short transactions (``alya.db.partitions``): DETACH (ACCESS EXCLUSIVE on
    ``batchrows`` for about a millisecond), its foreign key (the same on ``batches``), then DROP, whose
    unlinking of the files locks nothing but the detached table. Each waits at most
    ``partitions.LOCK_TIMEOUT_MS`` for its locks (statements queue behind a waiting lock) and is tried again
    a few times, then left for the next purge (which first finishes partitions left detached)."""
    with svc.store.tx() as q:
        parts = [p for p in q.rows_partitions() if id_time(p.hi) <= before]
        orphans = q.detached_rows_partitions()
    for name in orphans:
        _discard(svc, name)
    for p in parts:
        n = -2
        for attempt in range(DROP_ATTEMPTS):
            if _late(deadline):
                return
            with svc.store.tx() as q:
                n = q.detach_rows_partition(part=p.name, before=before, app=app)
            if n != -2:
                break
            time.sleep(0.05 * (attempt + 1))
        if n >= 0:
            report.nrows += n
            report.npartitions += 1
            _discard(svc, p.name)
            get_logger().info("partition_dropped", partition=p.name, rows=n)
        elif n == -2:
            get_logger().warning("partition_drop_deferred", partition=p.name, reason="lock not available")


def _discard(svc: Services, name: str) -> None:
    """Drop a detached partition: its foreign key, then the table (each retried; else the next purge)."""
    for fk in (True, False):
        for attempt in range(DROP_ATTEMPTS):
            with svc.store.tx() as q:
                if q.discard_rows_partition(part=name, fk=fk):
                    break
            time.sleep(0.05 * (attempt + 1))
        else:
            get_logger().warning("partition_drop_deferred", partition=name, reason="lock not available")
            return


def _late(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


class _Counts:
    def __init__(self) -> None:
        self.nbatches = self.nrows = self.nfiles = self.nrecords = self.npartitions = 0


def _groups(page: list[PurgeCandidate], chunk_rows: int) -> list[list[PurgeCandidate]]:
    """Consecutive batches of about ``chunk_rows`` rows together (a big batch alone)."""
    groups: list[list[PurgeCandidate]] = []
    size = chunk_rows  # forces a new group first
    for c in page:
        if not groups or size + c.nrows > chunk_rows or len(groups[-1]) >= 1000:
            groups.append([])
            size = 0
        groups[-1].append(c)
        size += c.nrows
    return groups


def _purge_group(svc: Services, group: list[PurgeCandidate], before: datetime, files: bool, chunk_rows: int,
                 report: _Counts, deadline: float | None) -> None:
    if files:
        report.nfiles += svc.objects.delete_files(u for c in group for u in c.outputfiles.values())
    for c in group:
        if c.nrows > chunk_rows:  # a big batch: its rows first, a bounded transaction at a time
            after = -1
            while True:
                with svc.store.tx() as q:
                    n, after = q.purge_rows(id=c.id, before=before, after=after, n=chunk_rows)
                report.nrows += n
                if n < chunk_rows:
                    break
                if _late(deadline):
                    return  # the record (and the rest of its rows) at the next call
    with svc.store.tx() as q:
        done = q.purge_batches(ids=[c.id for c in group], before=before)
    report.nbatches += len(done.ids)
    report.nrows += done.nrows
    report.nrecords += done.nrecords
    svc.cache.delete(*[k for i in done.ids for k in (summary_key(i), done_key(i))])
