"""Reading the counters: a batch's rows by status without reading its rows.

``batch_counts`` (migration 0011) is kept by statement-level triggers on ``batchrows``: every statement
that updates or deletes rows adds, in its own transaction, the difference it made per (batch, status) to
its backend's *shard* row; the two that insert rows (a submit's or an append's COPY, a slow query's row)
add their count themselves (:meth:`CounterQueries.count_inserted`), since a trigger would keep every
copied row only to count it. So the counters are exact at every commit whatever statement moved
the rows, including statements written after this module (they need not know about it), and a batch's
rows in a status are the sum of its shard rows: a handful of index entries, O(1) in the batch's size.

Shards are backends (``pg_backend_pid()``): two transactions never wait for each other on a counter row,
so workers writing back rows of one batch stay as parallel as before, and counters add no deadlock. Rows
per batch grow with the backends that touched it (a worker's pool is 4-12 connections); maintenance folds
the shards of open batches that have many into shard 0 (:meth:`CounterQueries.fold_counts`), skipping any a
transaction holds, so folding never waits and never makes anyone wait longer than one statement; and a
batch's end folds its own (a final batch keeps a row per final status it has: a slow query one), so the
table does not grow by a row per backend and status for every batch kept until retention purges it.

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

    def failed_rows(self, *, id: str) -> int:
        """The batch's failed rows, counted exactly (through their partial index: O(failed rows))."""
        row = self._tx.one("failed_rows", id=id)
        return int(row[0]) if row else 0

    def count_inserted(self, *, batch: str, n: int) -> None:
        """``n`` rows were just inserted into ``batch`` (all ``queued``), in this transaction: the statements
        that insert count themselves (no INSERT trigger: see migration 0011)."""
        self._tx.run("count_inserted", batch=batch, n=n)

    def crowded_counts(self, *, over: int, n: int) -> list[str]:
        """Up to ``n`` open batches with more than ``over`` shard rows (to fold)."""
        return [str(r[0]) for r in self._tx.all("crowded_counts", over=over, n=n)]

    def fold_counts(self, *, ids: list[str]) -> int:
        """Fold the batches' shard rows into shard 0 (rows another transaction holds are left for next
        time); statuses that sum to zero leave no row. Returns the rows folded."""
        row = self._tx.one("fold_counts", ids=ids)
        return int(row[0]) if row else 0
