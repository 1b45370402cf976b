"""alya.engine.rowpool without a database: the pool knows nothing of PostgreSQL, only owners that collect
outcomes (``finish``) and may be cancelled, and a runner that calls the processor. Here the owner is a
list and the runner sleeps or hangs as each row's input says. (The same behaviours through the engine, on
real services: tests/integration/engine/test_rows.py.)"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from alya.core.records import ClaimedRow
from alya.engine.rowpool import FairQueue, Job, RowPool


class Owner:
    """Collects each job's outcome once, as a claim does (a late second answer changes nothing)."""

    def __init__(self) -> None:
        self.cancelled = False
        self.lock = threading.Lock()
        self.outcomes: dict[int, Any] = {}
        self.answers = 0  # finish calls, the ignored ones included

    def finish(self, job: Job, outcome: Any) -> bool:
        with self.lock:
            self.answers += 1
            if job.done:
                return False
            job.done = True
            self.outcomes[job.row.line] = outcome
            return True

    def wait(self, n: int, timeout: float = 10) -> dict[int, Any]:
        deadline = time.monotonic() + timeout
        while len(self.outcomes) < n:
            assert time.monotonic() < deadline, f"{len(self.outcomes)} of {n} rows finished"
            time.sleep(0.01)
        return self.outcomes


class Runner:
    """Sleeps ``input`` seconds ("hang": until released) and answers ("done", line); counts calls at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = self.most = 0
        self.release = threading.Event()

    def _enter(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def _leave(self) -> None:
        with self.lock:
            self.now -= 1

    def run(self, job: Job) -> Any:
        self._enter()
        try:
            if job.row.input == "hang":
                self.release.wait(30)
            else:
                time.sleep(float(job.row.input))
            return ("done", job.row.line)
        finally:
            self._leave()

    async def run_async(self, job: Job) -> Any:
        self._enter()
        try:
            await asyncio.sleep(3600 if job.row.input == "hang" else float(job.row.input))
            return ("done", job.row.line)
        finally:
            self._leave()

    def timed_out(self, job: Job, seconds: float) -> Any:
        return ("timeout", job.row.line)


def jobs(owner: Owner, inputs: list[str], is_async: bool = False) -> list[Job]:
    return [Job(owner, ClaimedRow(line, text, 1), is_async=is_async) for line, text in enumerate(inputs, 1)]


@pytest.fixture
def runner() -> Iterator[Runner]:
    r = Runner()
    yield r
    r.release.set()  # a hung call of a failed test must not outlive it


def test_rows_run_on_every_slot_at_once_and_each_is_answered_once(runner: Runner) -> None:
    pool = RowPool(runner, concurrency=4, row_timeout_sec=60)
    owner = Owner()
    try:
        t0 = time.monotonic()
        pool.submit(jobs(owner, ["0.2"] * 12), stats_key=("app", "op"))
        outcomes = owner.wait(12)
        took = time.monotonic() - t0
    finally:
        pool.close()
    assert outcomes == {n: ("done", n) for n in range(1, 13)} and owner.answers == 12
    assert runner.most == 4  # the configured slots, all used, never more
    assert took < 2.0  # 3 rounds of 0.2 s, not 12
    stats = pool.stats[("app", "op")]
    assert stats.rows == 12 and stats.row_sec >= 0.15 and pool.backlog(("app", "op")) == pool.backlog() == 0


def test_a_cancelled_owner_gets_its_unstarted_rows_back_unrun(runner: Runner) -> None:
    pool = RowPool(runner, concurrency=1, row_timeout_sec=60)
    owner = Owner()
    try:
        pool.submit(jobs(owner, ["hang", "0", "0"]))
        deadline = time.monotonic() + 10
        while runner.now == 0:  # the first row's call has begun
            assert time.monotonic() < deadline
            time.sleep(0.01)
        owner.cancelled = True  # an aborted batch: the running row finishes, the others never start
        runner.release.set()
        outcomes = owner.wait(3)
    finally:
        pool.close()
    assert outcomes == {1: ("done", 1), 2: None, 3: None}


def test_a_hung_row_times_out_and_its_slot_goes_on_with_a_fresh_thread(runner: Runner) -> None:
    pool = RowPool(runner, concurrency=1, row_timeout_sec=0.3)
    owner = Owner()
    try:
        pool.submit(jobs(owner, ["hang", "0", "0"]))
        time.sleep(0.5)
        assert pool.expire() == 1 and pool.abandoned_threads == 1
        outcomes = owner.wait(3)
        assert outcomes == {1: ("timeout", 1), 2: ("done", 2), 3: ("done", 3)}  # the freed slot ran the rest
        runner.release.set()  # the stuck call returns at last: its answer changes nothing
        deadline = time.monotonic() + 10
        while pool.abandoned_threads:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        pool.close()
    assert owner.outcomes[1] == ("timeout", 1) and owner.answers == 4


def test_async_rows_run_on_one_event_loop_with_the_same_slots(runner: Runner) -> None:
    pool = RowPool(runner, concurrency=3, row_timeout_sec=0.5)
    owner = Owner()
    try:
        pool.submit(jobs(owner, ["0.1"] * 9 + ["hang"], is_async=True))
        owner.wait(9)
        time.sleep(0.6)
        pool.expire()  # a coroutine past the limit is cancelled: it finishes as a timeout
        outcomes = owner.wait(10)
    finally:
        loop = pool._loop
        pool.close()
        if loop is not None:  # close() stops the loop and leaves its slots pending ("Task was destroyed")
            deadline = time.monotonic() + 10
            while loop.is_running() and time.monotonic() < deadline:
                time.sleep(0.01)
            slots = asyncio.all_tasks(loop)
            for task in slots:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*slots, return_exceptions=True))
            loop.close()
    assert outcomes == {**{n: ("done", n) for n in range(1, 10)}, 10: ("timeout", 10)}
    assert runner.most == 3


# ------------------------------------------------------------------------------------------ the pool's queue
def test_fair_queue_takes_lanes_in_turn_and_counts_per_key() -> None:
    q = FairQueue()
    big = [(Job(None, None), "A") for _ in range(5)]  # type: ignore[arg-type]
    small = [(Job(None, None), "B") for _ in range(2)]  # type: ignore[arg-type]
    q.extend("big", big)
    q.extend("small", small)
    assert (len(q), q.waiting("A"), q.waiting("B")) == (7, 5, 2)
    order = [q.popleft() for _ in range(7)]
    # the small batch's two rows go second and fourth, not after the big batch's five
    assert [o[1] for o in order] == ["A", "B", "A", "B", "A", "A", "A"]
    assert order[0] is big[0] and order[2] is big[1] and order[1] is small[0]  # FIFO within a lane
    assert (len(q), q.waiting("A"), q.waiting()) == (0, 0, 0)


def test_fair_queue_takes_higher_priority_first_and_lower_ones_every_reserved_turn() -> None:
    q = FairQueue()
    low = [(Job(None, None), "A") for _ in range(30)]  # type: ignore[arg-type]
    high1 = [(Job(None, None), "B") for _ in range(20)]  # type: ignore[arg-type]
    high2 = [(Job(None, None), "C") for _ in range(20)]  # type: ignore[arg-type]
    q.extend("low", low, priority=0)
    q.extend("high1", high1, priority=10)
    q.extend("high2", high2, priority=10)
    order = [q.popleft()[1] for _ in range(40)]
    # the two high-priority lanes in turn; every RESERVED_TURN-th row from the low lane
    assert [i for i, k in enumerate(order, 1) if k == "A"] == [10, 20, 30, 40]
    highs = [k for k in order if k != "A"]
    assert highs == ["B", "C"] * 18
    assert q.waiting("A") == 26 and q.waiting("B") == 2 and len(q) == 30
    rest = [q.popleft()[1] for _ in range(30)]
    assert rest[:4].count("A") == 0 and rest[-26:] == ["A"] * 26  # alone, the low lane takes every slot


def test_fair_queue_reserved_turns_go_to_each_lower_level_in_turn() -> None:
    q = FairQueue()
    for name, prio in (("p0", 0), ("p5", 5), ("p9", 9)):
        q.extend(name, [(Job(None, None), name) for _ in range(100)], priority=prio)  # type: ignore[arg-type]
    order = [q.popleft()[1] for _ in range(100)]
    assert order.count("p9") == 90 and order.count("p5") == 5 and order.count("p0") == 5
