"""Priorities: higher first among queued work, equal ones in turn, lower ones never starved.

The rules alone (which lane, which batch next) are tested without a database in tests/unit/test_rowpool.py
and tests/unit/test_engine_decisions.py; here a real worker (``jm.run``, PostgreSQL, Prefect) runs them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest

from alya import BatchJobResult, BatchStatus, InvalidInput, JobManager
from tests.support.config import make_config
from tests.support.procs import QueryProc, wait_until


class Sleepy:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tags: list[str] = []

    def do_batch_job(self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]) -> Any:
        time.sleep(float(input.get("sleep", 0.01)))
        with self.lock:
            self.tags.append(context["tag"])
        return BatchJobResult(BatchStatus.SUCCESS, {"line": line})

    def mark_done(self, initblock: Any, context: dict[str, Any], details: Any) -> None:
        pass



def stored_priorities(url: str) -> dict[str, int]:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT id::text, priority FROM batches")
        return dict(cur.fetchall())


def test_priority_is_stored_with_defaults_and_bad_values_store_nothing(jm: JobManager, database_url: str) -> None:
    b0 = jm.batch_submit("prio", "op", {}, [(1, {})])
    b7 = jm.batch_submit("prio", "op", {}, [(1, {})], priority=7)
    q10 = jm.slowquery_submit("prio", "q", {}, {})
    qlow = jm.slowquery_submit("prio", "q", {}, {}, priority=-3)
    before = stored_priorities(database_url)
    assert before == {b0: 0, b7: 7, q10: 10, qlow: -3}
    for bad in (True, "5", 1.5, 1001, -1001, None):
        with pytest.raises(InvalidInput, match="priority"):
            jm.batch_submit("prio", "op", {}, [(1, {})], priority=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="priority"):
            jm.slowquery_submit("prio", "q", {}, {}, priority=bad)  # type: ignore[arg-type]
    assert stored_priorities(database_url) == before


@pytest.fixture
def wjm(database_url: str, redis_url: str, file_store_url: str) -> Iterator[JobManager]:
    manager = JobManager(database_url=database_url, redis_url=redis_url, object_store_url=file_store_url,
                         config=make_config(concurrency=4))
    yield manager
    manager.close()


@pytest.fixture
def worker(wjm: JobManager, prefect_harness: None) -> Iterator[Sleepy]:
    """A worker with 4 slots serving (prio, op) batches and (prio, q) slow queries, each type run once."""
    jm = wjm
    proc = Sleepy()
    jm.register_batch_processor("prio", "op", proc)
    jm.register_slowquery_processor("prio", "q", QueryProc())
    runner = threading.Thread(daemon=True, target=jm.run)
    runner.start()
    try:
        warm = [jm.batch_submit("prio", "op", {"tag": "warm"}, [(1, {"sleep": 0})]),
                jm.slowquery_submit("prio", "q", {}, {})]
        wait_until(lambda: jm.batch_status(warm[0]).status.is_final and jm.slowquery_done(warm[1]).status.is_final,
                   timeout=60, what="warm-up")
        yield proc
    finally:
        jm.engine.stopping.set()
        runner.join(60)


def test_a_higher_priority_batch_goes_first_and_the_lower_one_keeps_a_share(wjm: JobManager, worker: Sleepy) -> None:
    """A 1,500-row priority-0 batch is running; a 200-row priority-5 batch of the same type submitted
    then takes most of the slots until it is done (the low one still gets its reserved share, about 1 row
    in 10), and a slow query (priority 10 by default) answers while both run."""
    jm = wjm
    low = jm.batch_submit("prio", "op", {"tag": "low"}, [(n, {"sleep": 0.01}) for n in range(1, 1501)])
    wait_until(lambda: worker.tags.count("low") >= 40, timeout=60, every=0.01, what="the low batch")
    high = jm.batch_submit("prio", "op", {"tag": "high"}, [(n, {"sleep": 0.01}) for n in range(1, 201)],
                           priority=5)
    t0 = time.monotonic()
    query = jm.slowquery_submit("prio", "q", {}, {"x": 1})
    wait_until(lambda: jm.slowquery_done(query).status.is_final, timeout=30, every=0.005, what="the query")
    query_sec = time.monotonic() - t0
    low_at_query = worker.tags.count("low")
    wait_until(lambda: jm.batch_status(high).status.is_final, timeout=60, every=0.02, what="the high batch")
    assert jm.batch_status(high).status is BatchStatus.SUCCESS
    wait_until(lambda: jm.batch_status(low).status.is_final, timeout=120, what="the low batch")
    assert jm.batch_status(low).nsuccess == 1500
    # Judged by the order the rows ran in (the processor's own record), not by when a poll saw a status:
    # the high batch did not wait for the low one...
    tags = worker.tags
    first_high, last_high = tags.index("high"), len(tags) - 1 - tags[::-1].index("high")
    assert tags[last_high + 1:].count("low") >= 500, tags[last_high + 1:].count("low")
    # ...it had most of the slots, and the low one neither stopped (starved) nor kept its fair half
    during = tags[first_high:last_high + 1]
    low_share = during.count("low") / len(during)
    assert 0 < low_share < 0.35, (low_share, len(during))
    assert low_at_query < 1500, query_sec  # the query was answered while the big batch ran
    print(f"\nslow query during a priority-5 and a priority-0 batch: {query_sec * 1000:.0f} ms")


def test_a_stream_of_higher_priority_work_never_starves_a_low_batch(wjm: JobManager, worker: Sleepy) -> None:
    """While higher-priority batches keep coming (each submitted before the last is done, so the queue
    always holds higher-priority rows), a priority -5 batch goes on making progress."""
    jm = wjm
    low = jm.batch_submit("prio", "op", {"tag": "low"}, [(n, {"sleep": 0.005}) for n in range(1, 301)],
                          priority=-5)
    deadline = time.monotonic() + 6.0
    highs = []
    while time.monotonic() < deadline:
        tag = f"high{len(highs)}"
        highs.append(jm.batch_submit("prio", "op", {"tag": tag}, [(n, {"sleep": 0.005}) for n in range(1, 101)],
                                     priority=3))
        while time.monotonic() < deadline and worker.tags.count(tag) < 50:
            time.sleep(0.01)
    during = worker.tags.count("low")
    busy = [jm.batch_status(h) for h in highs]
    assert sum(1 for s in busy if not s.status.is_final) >= 1  # high-priority work was still queued at the end
    print(f"\nlow batch during the stream: {during} rows; high batches: {len(highs)}")
    assert during >= 20, (during, len(highs))  # it progressed at its reserved share, not zero
    wait_until(lambda: jm.batch_status(low).status.is_final, timeout=120, what="the low batch")
    assert jm.batch_status(low).nsuccess == 300
