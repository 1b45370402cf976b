"""What a flow run worked on, in bounded memory whatever the run's length.

A ``jm.run`` worker run of one type serves batches for up to ``ALYA_FLOW_MAX_TASKS`` chunk tasks: thousands
of small batches or slow queries. Keeping every batch it touched (its last summary, its progress artifact,
a row of its overview) grew with each, and its end read the status of every one (10,000 reads for 10,000
slow queries). The ledger keeps instead:

- the batches still *open* as far as the run knows (a summary read, or none yet), at most ``OPEN_KEPT``;
- for batches that *ended*, only counts (by status, and their rows summed) and the rows of the overview:
  the ``OVERVIEW_ROWS`` most recent failed or aborted ones and as many of the most recent others;
- the ``FINISHED_KEPT`` most recently ended ids, so that a report naming a batch after its end (another
  chunk task's rows of it, written before the end, reported after) is not taken for a new batch.

*Decided:* the overview lists failed and aborted batches first (most recent first), then those still open
at the run's end, then the most recent successes, ``OVERVIEW_ROWS`` in all, and a last row with the total:
the batches someone must look at are never crowded out by thousands of successes, and the total says how
many were left out. The run's final state counts ended batches from what the run read while it ran (each
batch's status is read once per wave that names it, for its progress), and reads at most ``END_READS``
statuses at its end, for the open batches it last touched; an open batch beyond that counts by its status
as last read (``unknown`` if never read).
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from typing import Any

from alya.core.errors import AlyaError
from alya.core.models import BatchStatus, BatchSummary
from alya.prefect.states import status_counts

OVERVIEW_ROWS = 200  # batches a worker run's overview lists (then one row with the total)
FINISHED_KEPT = 1000  # ended batches remembered, so that a late report of one is not a new batch
OPEN_KEPT = 1000  # open batches kept; past it the oldest are looked at again, then counted as last read
END_READS = 200  # statuses a run reads at its end, at most (its most recently touched open batches)
SUMMED = ("nrows", "nsuccess", "nfailed", "naborted")


class Ledger:
    """The batches of one run: written to by the flow's thread (:meth:`touch`) and the artifacts' helper
    thread (:meth:`read`), under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.open: OrderedDict[str, BatchSummary | None] = OrderedDict()  # least recently touched first
        self._ended: OrderedDict[str, None] = OrderedDict()
        self.counts: Counter[str] = Counter()  # status -> batches that ended (or were dropped, as last read)
        self.sums: Counter[str] = Counter()  # SUMMED over the batches counted
        self._bad: deque[tuple[str, BatchSummary]] = deque(maxlen=OVERVIEW_ROWS)  # failed, aborted
        self._good: deque[tuple[str, BatchSummary]] = deque(maxlen=OVERVIEW_ROWS)  # the others
        self.nbatches = 0  # distinct batches the run worked on
        self.rows = 0  # rows the run wrote back

    def touch(self, batch: str, rows: int = 0) -> bool:
        """A chunk report names the batch (``rows`` written by this run). False when the batch has ended
        already (a late report): nothing more to look at."""
        with self._lock:
            self.rows += rows
            if batch in self._ended:
                return False
            if batch in self.open:
                self.open.move_to_end(batch)
            else:
                self.open[batch] = None
                self.nbatches += 1
            return True

    def ended(self, batch: str) -> bool:
        with self._lock:
            return batch in self._ended

    def read(self, batch: str, s: BatchSummary) -> bool:
        """The batch's summary as just read: a final one closes its book (counted, listed, forgotten but
        for its id). True the first time it does."""
        with self._lock:
            if batch in self._ended:
                return False
            if not s.status.is_final:
                if batch in self.open:
                    self.open[batch] = s
                return False
            self.open.pop(batch, None)
            self._close(batch, s)
            return True

    def _close(self, batch: str, s: BatchSummary | None) -> None:
        self._ended[batch] = None
        if len(self._ended) > FINISHED_KEPT:
            self._ended.popitem(last=False)
        self.counts["unknown" if s is None else s.status.value] += 1
        if s is not None:
            for k in SUMMED:
                self.sums[k] += getattr(s, k)
            bad = s.status in (BatchStatus.FAILED, BatchStatus.ABORTED)
            (self._bad if bad else self._good).append((batch, s))

    def overflow(self) -> list[str]:
        """Open batches beyond ``OPEN_KEPT``, least recently touched first: to be read again."""
        with self._lock:
            return list(self.open)[:max(0, len(self.open) - OPEN_KEPT)]

    def drop_overflow(self) -> list[str]:
        """Close the open batches still beyond ``OPEN_KEPT`` as last read (they were read again first)."""
        dropped = []
        with self._lock:
            while len(self.open) > OPEN_KEPT:
                batch, s = self.open.popitem(last=False)
                self._close(batch, s)
                dropped.append(batch)
        return dropped

    def recent_open(self, n: int = END_READS) -> list[str]:
        """The ``n`` open batches touched last."""
        with self._lock:
            return list(self.open)[-n:] if n > 0 else []

    def settle(self, read: Callable[[str], BatchSummary], n: int = END_READS) -> None:
        """At the run's end: read the open batches never read yet (no helper thread read them), the most
        recently touched first, at most ``n``. One whose status cannot be read stays ``unknown``: the run's
        work is done, its state only counts."""
        with self._lock:
            todo = [b for b, s in reversed(self.open.items()) if s is None][:n]
        for batch in todo:
            try:
                self.read(batch, read(batch))
            except AlyaError:
                continue

    def statuses(self) -> Counter[str]:
        """Batches by status: those that ended, and the open ones as last read (``unknown``: never read)."""
        with self._lock:
            out = Counter(self.counts)
            for s in self.open.values():
                out["unknown" if s is None else s.status.value] += 1
        return out

    def overview(self, row: Callable[[str, BatchSummary], dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
        """The overview table (see the module doc) and its description; ``row`` makes a batch's row."""
        with self._lock:
            listed = [*reversed(self._bad), *((b, s) for b, s in reversed(self.open.items()) if s is not None),
                      *reversed(self._good)][:OVERVIEW_ROWS]
            unread = sum(1 for s in self.open.values() if s is None)
            sums = Counter(self.sums)
            for s in self.open.values():
                if s is not None:
                    for k in SUMMED:
                        sums[k] += getattr(s, k)
        counts = self.statuses()
        n = sum(counts.values())
        rows = [row(b, s) for b, s in listed]
        detail = status_counts(counts)
        if n > 1:
            rows.append({"batch": f"all {n:,} batches", "status": detail, **{k: sums[k] for k in SUMMED}})
        text = f"the {n:,} batch{'es' if n != 1 else ''} this run worked on: {detail}"
        if len(listed) < n:
            text += (f"; {len(listed):,} listed: failed and aborted first, then open, then the most recent"
                     + (f" ({unread:,} never read)" if unread else ""))
        return rows, text
