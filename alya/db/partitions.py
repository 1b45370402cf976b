"""The partitions of ``batchrows`` (migration 0012): one per week of batch ids (UUIDv7, ``alya.core.ids``),
created ahead of time by maintenance, dropped whole by a purge.

*Why a week:* with the default retention (30 days) about 5 past weeks live at once plus the ones made ahead,
so a statement that is not pruned to one partition (recovery, the queue figures) walks ~14 small sets of
partial indexes, and a partition is dropped at most a week after its last batch passed retention. A day
would make 30+ live partitions for little gain (retention is counted in days, not hours); a month would keep
up to a month of rows past retention.

*Ahead of time:* a submit never waits for DDL: maintenance (duty ``partitions``) keeps this week and the next
``AHEAD`` created. Creating one takes a brief SHARE UPDATE EXCLUSIVE lock on ``batchrows`` (no conflict with
reads and writes of rows) and SHARE ROW EXCLUSIVE on ``batches`` (its foreign key: batch writes wait a few
milliseconds), each waited for at most LOCK_TIMEOUT_MS, but it scans the DEFAULT partition under an ACCESS
EXCLUSIVE lock on it, to prove that none of its rows belongs to the new range (0.09 s per million rows,
measured); so while the default partition holds more than ``SMALL_DEFAULT`` rows (the table of old v4 ids,
emptied by retention), creation waits, unless no partition covers this week at all: then it is created
whatever the scan costs, once. A submit whose id no partition covers (later than the horizon, or a week
already dropped: a client's clock far off) lands in the default partition, and a purge deletes it with the
batched DELETE.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta
from typing import Any

from alya.core.ids import floor_id
from alya.core.names import rows_partition
from alya.core.records import RowsPartition

PERIOD = timedelta(days=7)
AHEAD = 8  # weeks created ahead of this one (the migration creates as many)
SMALL_DEFAULT = 1_000_000  # rows of the default partition (estimated) below which creating ahead is cheap
LOCK_TIMEOUT_MS = 100  # DDL that waits longer for a lock gives up (and is tried again): workers never wait long


def period_start(at: datetime) -> datetime:
    """Monday 00:00 UTC of ``at``'s week."""
    day = at.astimezone(UTC).date()
    return datetime.combine(day - timedelta(days=day.weekday()), time(), UTC)


def periods(now: datetime, ahead: int = AHEAD) -> Iterator[tuple[str, str, str]]:
    """(partition name, lower id, upper id) of ``now``'s week and the ``ahead`` following ones."""
    start = period_start(now)
    for k in range(ahead + 1):
        lo = start + k * PERIOD
        yield rows_partition(lo.strftime("%Y%m%d")), floor_id(lo), floor_id(lo + PERIOD)


class PartitionQueries:
    """The partition queries of ``Queries`` (a mixin, as ``alya.db.counters``); SQL in ``sql/partitions.sql``."""

    _tx: Any  # alya.db.transport.Tx, set by Queries

    def rows_partitions(self) -> list[RowsPartition]:
        """The range partitions of ``batchrows``, oldest first (not the default one)."""
        return [RowsPartition(str(r[0]), str(r[1]), str(r[2])) for r in self._tx.all("rows_partitions")]

    def default_rows(self) -> int:
        """The default partition's rows as the planner estimates them (-1: never analysed)."""
        row = self._tx.one("default_rows")
        return int(row[0]) if row else 0

    def create_rows_partition(self, *, part: str, lo: str, hi: str, ms: int = LOCK_TIMEOUT_MS) -> bool:
        """Create and attach the partition (False: it exists). A lock not had within ``ms`` raises
        (``BackendUnavailable``: try again at the next tick)."""
        row = self._tx.one("create_rows_partition", part=part, lo=lo, hi=hi, ms=ms)
        return bool(row and row[0])

    def detach_rows_partition(self, *, part: str, before: datetime, app: str | None,
                              ms: int = LOCK_TIMEOUT_MS) -> int:
        """Detach the partition if all its batches are purgeable: their rows; -1 if not; -2 if a lock was not
        had within ``ms``. Then :meth:`discard_rows_partition`, twice, each in a transaction of its own."""
        row = self._tx.one("detach_rows_partition", part=part, before=before, app=app, ms=ms)
        return int(row[0]) if row else -1

    def discard_rows_partition(self, *, part: str, fk: bool, ms: int = LOCK_TIMEOUT_MS) -> bool:
        """A detached partition's foreign key (``fk``), then the table (its files unlinked under its own lock
        only). False: a lock was not had within ``ms`` (or no such table)."""
        row = self._tx.one("discard_rows_partition", part=part, fk=fk, ms=ms)
        return bool(row and row[0])

    def detached_rows_partitions(self) -> list[str]:
        """Partitions a purge detached and did not drop yet (it stopped between its steps)."""
        return [str(r[0]) for r in self._tx.all("detached_rows_partitions")]


def ensure_partitions(store: Any, now: datetime | None = None) -> list[str]:
    """Create the missing partitions of this week and the ``AHEAD`` next ones (maintenance, duty
    ``partitions``); returns those created. While the default partition is large, only this week's, and only
    when no partition covers it (see the module). ``store``: an ``alya.db.store.Store``."""
    now = now or datetime.now(UTC)
    with store.tx() as q:
        have = {p.name for p in q.rows_partitions()}
        big = q.default_rows() > SMALL_DEFAULT
    wanted = [p for p in periods(now) if p[0] not in have]
    if big:
        wanted = [p for p in wanted[:1] if p[0] == rows_partition(period_start(now).strftime("%Y%m%d"))]
    made = []
    for name, lo, hi in wanted:
        with store.tx() as q:
            if q.create_rows_partition(part=name, lo=lo, hi=hi):
                made.append(name)
    return made
