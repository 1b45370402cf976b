"""Reading the counters: a batch's rows by status without reading its rows.

``batch_counts`` (migration 0011) is kept by statement-level triggers on ``batchrows``: every statement
that inserts, updates or deletes rows adds, in its own transaction, the difference it made per (batch,
status) to its backend's *shard* row. So the counters are exact at every commit whatever statement moved
the rows, including statements written after this module (they need not know about it), and a batch's
rows in a status are the sum of its shard rows: a handful of index entries, O(1) in the batch's size.

Shards are backends (``pg_backend_pid()``): two transactions never wait for each other on a counter row,
so workers writing back rows of one batch stay as parallel as before, and counters add no deadlock. Rows
per batch grow with the backends that touched it (a worker's pool is 4-12 connections); maintenance folds
the shards of open batches that have many into shard 0 (:meth:`CounterQueries.compact_counts`), skipping
any a transaction holds, so compaction never waits and never makes anyone wait longer than one statement.

These methods are part of ``alya.db.queries.Queries`` (a mixin: that module is at its size limit).
"""

from __future__ import annotations

from typing import Any

from alya.core.records import Counts


class CounterQueries:
    """The counter queries of ``Queries`` (same conventions: one method per named query)."""

    _tx: Any  # alya.db.transport.Tx, set by Queries

    def batch_counts(self, *, id: str) -> Counts:
        """The batch's rows by status, from its counters (a batch whose counters are gone, or that was never
        counted, reads as all zeros: callers read counters only for open batches)."""
        return Counts.from_rows(self._tx.all("batch_counts", id=id))

    def compact_counts(self, *, over: int, n: int) -> int:
        """Fold the shard rows of up to ``n`` open batches having more than ``over`` of them into shard 0;
        rows another transaction holds are left for next time. Returns the rows folded."""
        row = self._tx.one("compact_counts", over=over, n=n)
        return int(row[0]) if row else 0
