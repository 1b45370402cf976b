"""What one claim is: the rows a worker took in one statement, and what became of them so far.

A :class:`Claimed` is shared by the roles of the engine: the producer makes it, the executor's row slots
finish its rows (``finish``), the completer writes its outcomes back (``take``), and the claim loop waits on
it (``done``). Its own lock guards only its own counters.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from alya.batch.outcomes import Outcome
from alya.core.records import ClaimedRow
from alya.engine.rowpool import Job

FLUSH_ROWS = 100  # this many finished rows are written back once they are FLUSH_ROWS_AGE_SEC old...
FLUSH_ROWS_AGE_SEC = 0.05  # ...so that a crash replays little even for fast rows (ALYA_FLUSH_SEC bounds all)


@dataclass
class ChunkReport:
    """What one call of :meth:`Engine.work` did; small and JSON-friendly, because it crosses the Prefect
    task boundary."""

    batch: str | None = None
    nrows: int = 0
    nsuccess: int = 0
    nfailed: int = 0
    nretry: int = 0
    summarised: list[str] = field(default_factory=list)
    batches: dict[str, int] = field(default_factory=dict)  # every batch it wrote rows of: rows written
    busy: bool = False  # its last claim was full (``Claimed.full``): work was likely left when it stopped

    def as_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "nrows": self.nrows, "nsuccess": self.nsuccess, "nfailed": self.nfailed,
                "nretry": self.nretry, "summarised": self.summarised, "batches": self.batches, "busy": self.busy}

    def add(self, statuses: list[str], batch: str | None = None) -> None:
        if batch is not None:
            self.batches[batch] = self.batches.get(batch, 0) + len(statuses)
        self.nrows += len(statuses)
        self.nsuccess += statuses.count("success")
        self.nfailed += statuses.count("failed")
        self.nretry += statuses.count("queued")


@dataclass(eq=False)
class Claimed:
    """Rows this worker claimed in one statement, and what became of them so far. It owns the rows' jobs
    in the row pool: ``finish`` is called once per row, from whichever slot or timeout got there first."""

    batch: str
    app: str
    op: str
    type: str
    context: dict[str, Any]
    rows: list[ClaimedRow]  # ordered by line
    worker: str  # the identity the rows were claimed under (and are written back as)
    ver: int = 0  # the batch's status version when claimed (for cache invalidation)
    priority: int = 0  # the batch's: the row pool takes higher first
    cancelled: bool = False  # unstarted rows are not run (stopping worker, aborted batch)
    suspect: bool = False  # one row held by a worker that died: this process holds nothing else meanwhile
    aborted: bool = False  # the batch was aborted: nothing is given back, no summary
    lost: bool = False  # its write-back failed for good: its rows were given back (or are recovered)
    ended: bool = False  # its write-back also summarised its batch (a slow query's one row)
    limited: bool = False  # the batch has a failure threshold: a failed row is written back at once
    full: bool = False  # it got as many rows as it asked for: its batch likely has more queued
    processor: Any = None
    initblock: Any = None
    log: Any = None
    wake: threading.Condition | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.pending = len(self.rows)
        self.outcomes: list[Outcome] = []
        self.first_outcome_at = 0.0  # monotonic time of the oldest outcome not yet written
        self.skipped: list[int] = []  # lines never started
        # batches this claim moved queued -> inprog: (batch, ver, nrows), announced once its rows are running
        self.moved: list[tuple[str, int, int]] = []

    def finish(self, job: Job, outcome: Outcome | list[Outcome] | None) -> bool:
        """A row's outcome, or a bulk call's (``job.group``: a list, one per row); None: never started."""
        with self._lock:
            if job.done:
                return False
            job.done = True
            group = job.group
            if outcome is None:
                if group is None:
                    self.skipped.append(job.row.line)
                else:
                    self.skipped.extend(r.line for r in group)
            else:
                if not self.outcomes:
                    self.first_outcome_at = time.monotonic()
                if group is None:
                    self.outcomes.append(outcome)  # type: ignore[arg-type]
                else:
                    self.outcomes.extend(outcome)  # type: ignore[arg-type]
            self.pending -= 1 if group is None else len(group)
            last = self.pending == 0
        if last and self.wake is not None:
            with self.wake:
                self.wake.notify_all()
        return True

    def take(self) -> list[Outcome]:
        with self._lock:
            out, self.outcomes = self.outcomes, []
        return out

    def flush_due(self, now: float, flush_sec: float) -> bool:
        """Whether its finished rows should be written now, before the claim ends: at least every
        ``flush_sec``, and sooner when many have piled up (a crash replays only what is not written)."""
        if not self.outcomes:
            return False
        if self.limited and any(o.status == "failed" for o in self.outcomes):
            return True  # the threshold is checked at the write-back: the sooner, the fewer rows start past it
        age = now - self.first_outcome_at
        return age >= flush_sec or (len(self.outcomes) >= FLUSH_ROWS and age >= FLUSH_ROWS_AGE_SEC)

    @property
    def done(self) -> bool:
        return self.pending == 0

    @property
    def unwritten(self) -> int:
        """Rows not yet written back: running or unstarted, and finished but not flushed."""
        return self.pending + len(self.outcomes)
