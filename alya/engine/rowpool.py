"""Rows in flight: one pool per worker process with ``ALYA_CONCURRENCY`` slots, shared by every claim of
every batch the process works on. The chunk stays the unit of database work (one claim, one write-back);
the row is the unit of concurrency.

- Synchronous processors run on slot threads (processors must be thread-safe). Slots take the next row
  round-robin across *lanes* (the engine makes each batch a lane): a slow query or a 10-row batch submitted
  behind a big batch's backlog gets the next free slot instead of waiting for that backlog to drain, and a
  slow claim never idles a slot.
- ``async def`` processors run on one event loop thread with the same number of slots (coroutines).
- A call that runs past ``row_timeout_sec`` is finished as a timeout fault by :meth:`RowPool.expire`; a
  thread cannot be killed, so its slot is handed to a fresh thread and the stuck one is abandoned (its
  late answer is dropped, and it exits when the call returns). A coroutine is cancelled instead.

The pool knows nothing of PostgreSQL: a job belongs to a ``Claim``-like owner that collects outcomes
(``finish``) and may be cancelled (an aborted batch, a stopping worker), after which its unstarted rows
are handed back to the owner unrun (``finish(job, None)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol

from alya.core.logs import get_logger
from alya.core.records import ClaimedRow


class JobOwner(Protocol):
    cancelled: bool

    def finish(self, job: Job, outcome: Any) -> bool: ...


@dataclass(eq=False, slots=True)
class Job:
    owner: JobOwner
    row: ClaimedRow
    is_async: bool = False
    started: float = 0.0  # monotonic time the call began (0: not started)
    done: bool = False  # set once, under the owner's lock, by whoever finishes it first
    group: list[ClaimedRow] | None = None  # a bulk call's rows (``row`` is the first): one call, one outcome list


class RowRunner(Protocol):
    """What the engine provides: the processor call wrapped so that it never raises."""

    def run(self, job: Job) -> Any: ...
    def run_async(self, job: Job) -> Awaitable[Any]: ...
    def timed_out(self, job: Job, seconds: float) -> Any: ...


RESERVED_TURN = 10  # one row in this many goes to lower-priority lanes while higher ones wait


@dataclass(eq=False, slots=True)
class _Lane:
    items: deque[tuple[Job, Any]]
    key: Any  # the stats key of its rows (a lane is one batch, so one batch type)
    priority: int


class FairQueue:
    """Rows waiting for a slot: FIFO within a lane, the highest priority first, round-robin across the lanes
    of one priority, and every ``RESERVED_TURN``-th row taken from the lower priorities (each lower level
    in turn), so that a stream of higher-priority work slows lower-priority work down but never stops it.
    Not thread-safe (the pool's lock guards it).

    Also counts waiting rows per stats key, so that each batch type's claim loop sizes its claims by its
    own backlog, not by another type's: by summing its lanes' lengths (a handful of batches in memory),
    which keeps the per-row path to a deque pop and, with several lanes, a rotation."""

    def __init__(self) -> None:
        self._lanes: dict[Any, _Lane] = {}
        self._rings: dict[int, deque[Any]] = {}  # priority -> its lanes with rows, in turn order
        self._levels: list[int] = []  # priorities with rows, highest first
        self._n = 0
        self._turns = 0  # rows taken while several priorities waited
        self._reserved = 0  # reserved turns taken (which lower level is next)

    def extend(self, lane: Any, items: list[tuple[Job, Any]], priority: int = 0) -> None:
        if not items:
            return
        ln = self._lanes.get(lane)
        if ln is None:
            ln = self._lanes[lane] = _Lane(deque(), items[0][1], priority)
            ring = self._rings.get(ln.priority)
            if ring is None:
                ring = self._rings[ln.priority] = deque()
                self._levels.append(ln.priority)
                self._levels.sort(reverse=True)
            ring.append(lane)
        ln.items.extend(items)
        self._n += len(items)

    def popleft(self) -> tuple[Job, Any]:
        levels = self._levels
        level = levels[0]
        if len(levels) > 1:
            self._turns += 1
            if self._turns % RESERVED_TURN == 0:
                level = levels[1 + self._reserved % (len(levels) - 1)]
                self._reserved += 1
        ring = self._rings[level]
        lane = ring[0]
        ln = self._lanes[lane]
        item = ln.items.popleft()
        if ln.items:
            if len(ring) > 1:
                ring.rotate(-1)  # the next row of this priority comes from the next lane
        else:
            ring.popleft()
            del self._lanes[lane]
            if not ring:
                del self._rings[level]
                levels.remove(level)
        self._n -= 1
        return item

    def waiting(self, key: Any = None) -> int:
        """Rows waiting (of stats key ``key`` if given)."""
        if key is None:
            return self._n
        return sum(len(ln.items) for ln in self._lanes.values() if ln.key == key)

    def __len__(self) -> int:
        return self._n


@dataclass(eq=False)
class _Slot:
    thread: threading.Thread | None = None
    job: Job | None = None
    abandoned: bool = False


@dataclass
class PoolStats:
    """Row durations, for sizing claims (about half a second of work each: producer.CLAIM_TARGET_SEC)."""

    rows: int = 0
    busy_sec: float = 0.0
    _ewma: float = field(default=0.0)

    def add(self, seconds: float, n: int = 1) -> None:
        """One call of ``n`` rows (a bulk call: n > 1) took ``seconds``: its rows count at their share."""
        self.rows += n
        self.busy_sec += seconds
        seconds /= n
        self._ewma = seconds if self._ewma == 0.0 else 0.9 * self._ewma + 0.1 * seconds

    @property
    def row_sec(self) -> float:
        """A smoothed duration of one row (0 until the first row ran)."""
        return self._ewma


class RowPool:
    def __init__(self, runner: RowRunner, concurrency: int, row_timeout_sec: float) -> None:
        self.runner = runner
        self.concurrency = concurrency
        self.row_timeout_sec = row_timeout_sec
        self.stats: dict[Any, PoolStats] = {}  # by a key the engine picks: (app, op)
        self._queue = FairQueue()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # slots wait here for rows
        self._slots: list[_Slot] = []
        self._closed = False
        self._abandoned = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aqueue = FairQueue()  # under the same lock
        self._aevent: asyncio.Event | None = None
        self._atasks: dict[Job, asyncio.Task[Any]] = {}
        self.log = get_logger()

    # ------------------------------------------------------------------ submitting
    def submit(self, jobs: list[Job], stats_key: Any = None, lane: Any = None, priority: int = 0) -> None:
        """Queue rows on ``lane`` (rows of different lanes are taken in turn, higher ``priority`` first: see
        :class:`FairQueue`); ``stats_key`` groups their durations and backlog (the engine uses the batch
        type)."""
        sync = [(j, stats_key) for j in jobs if not j.is_async]
        asyn = [(j, stats_key) for j in jobs if j.is_async]
        if sync:
            with self._lock:
                self._closed = False  # a closed pool is reopened by new work (a worker run again)
                self._ensure_threads()
                self._queue.extend(lane, sync, priority)
                self._work.notify(min(len(sync), self.concurrency))
        if asyn:
            loop = self._ensure_loop()
            with self._lock:
                self._aqueue.extend(lane, asyn, priority)
            loop.call_soon_threadsafe(self._poke)

    def backlog(self, stats_key: Any = None) -> int:
        """Rows submitted and not yet started (of ``stats_key`` if given)."""
        with self._lock:
            return self._queue.waiting(stats_key) + self._aqueue.waiting(stats_key)

    # ------------------------------------------------------------------ threads
    def _ensure_threads(self) -> None:
        live = [s for s in self._slots if not s.abandoned]
        for _ in range(self.concurrency - len(live)):
            self._start_slot()

    def _start_slot(self) -> None:
        slot = _Slot()
        slot.thread = threading.Thread(target=self._slot_loop, args=(slot,), name="alya-row", daemon=True)
        self._slots.append(slot)
        slot.thread.start()

    def _slot_loop(self, slot: _Slot) -> None:
        queue, runner, stats = self._queue, self.runner, self.stats
        while True:
            with self._lock:
                while not queue and not self._closed:
                    self._work.wait()
                if self._closed and not queue:
                    self._slots.remove(slot)
                    return
                job, key = queue.popleft()
                if job.owner.cancelled:
                    slot.job = None
                    skip = True
                else:
                    job.started = time.monotonic()
                    slot.job = job
                    skip = False
            if skip:
                job.owner.finish(job, None)
                continue
            outcome = runner.run(job)
            took = time.monotonic() - job.started
            s = stats.get(key)
            if s is None:
                s = stats[key] = PoolStats()
            s.add(took, 1 if job.group is None else len(job.group))
            with self._lock:
                slot.job = None
                abandoned = slot.abandoned
            job.owner.finish(job, outcome)  # after a timeout this is a no-op: the job is done already
            if abandoned:
                with self._lock:
                    self._slots.remove(slot)
                    self._abandoned -= 1
                self.log.warning("row_thread_returned_after_timeout", line=job.row.line, seconds=round(took, 1))
                return

    # ------------------------------------------------------------------ timeouts
    def expire(self) -> int:
        """Finish every call running past ``row_timeout_sec`` as a timeout fault and free its slot.
        Returns how many were expired. Called by the engine's claim loop (at least every flush)."""
        now = time.monotonic()
        limit = self.row_timeout_sec
        expired: list[Job] = []
        with self._lock:
            for slot in self._slots:
                job = slot.job
                if job is not None and not slot.abandoned and now - job.started > limit:
                    slot.abandoned = True
                    self._abandoned += 1
                    expired.append(job)
            if expired and not self._closed:
                for _ in expired:
                    self._start_slot()  # the slot goes on with a fresh thread
        for job in expired:
            job.owner.finish(job, self.runner.timed_out(job, now - job.started))
        if self._loop is not None:
            for job, atask in list(self._atasks.items()):
                if now - job.started > limit:
                    self._loop.call_soon_threadsafe(atask.cancel)  # the coroutine finishes it as a timeout
        return len(expired)

    @property
    def abandoned_threads(self) -> int:
        return self._abandoned

    # ------------------------------------------------------------------ async
    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                ready = threading.Event()
                loop = asyncio.new_event_loop()

                def main() -> None:
                    asyncio.set_event_loop(loop)
                    self._aevent = asyncio.Event()
                    for _ in range(self.concurrency):
                        loop.create_task(self._async_slot())
                    ready.set()
                    loop.run_forever()

                threading.Thread(target=main, name="alya-rows-async", daemon=True).start()
                ready.wait()
                self._loop = loop
            return self._loop

    def _poke(self) -> None:
        if self._aevent is not None:
            self._aevent.set()

    async def _async_slot(self) -> None:
        assert self._aevent is not None
        while not self._closed:
            with self._lock:
                item = self._aqueue.popleft() if len(self._aqueue) else None
            if item is None:
                self._aevent.clear()
                await self._aevent.wait()
                continue
            job, key = item
            if job.owner.cancelled:
                job.owner.finish(job, None)
                continue
            job.started = time.monotonic()
            atask = asyncio.ensure_future(self.runner.run_async(job))
            self._atasks[job] = atask
            try:
                outcome = await atask
            except asyncio.CancelledError:
                outcome = self.runner.timed_out(job, time.monotonic() - job.started)
            finally:
                self._atasks.pop(job, None)
            s = self.stats.get(key)
            if s is None:
                s = self.stats[key] = PoolStats()
            s.add(time.monotonic() - job.started, 1 if job.group is None else len(job.group))
            job.owner.finish(job, outcome)

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        """Stop the slots once the queue is empty (callers cancel their claims first)."""
        with self._lock:
            self._closed = True
            self._work.notify_all()
        if self._loop is not None:
            loop, self._loop = self._loop, None
            loop.call_soon_threadsafe(self._poke)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)

