"""Many at once: a small batch or a slow query is not held behind a big batch, of its own type or another.

The row pool takes rows of different batches in turn (``FairQueue``, alone: tests/unit/test_rowpool.py),
claims take a type's open batches in turn, and a worker runs each batch type's flow run on its own thread
over the one pool."""

from __future__ import annotations

import threading
import time
from typing import Any

from alya import BatchJobResult, BatchStatus, JobManager
from tests.support.procs import QueryProc, wait_until


# ------------------------------------------------------------------------------------------ whole workers
class Sleepy:
    def __init__(self) -> None:
        self.lines: list[tuple[str, int]] = []

    def do_batch_job(self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]) -> Any:
        time.sleep(float(input.get("sleep", 0.02)))
        self.lines.append((context.get("tag", "?"), line))
        return BatchJobResult(BatchStatus.SUCCESS, {"line": line})

    def mark_done(self, initblock: Any, context: dict[str, Any], details: Any) -> None:
        pass



def test_small_batches_and_slow_queries_finish_during_a_big_batch(jm: JobManager, prefect_harness: None) -> None:
    """While a 3,000-row batch of 20 ms rows runs (about 8 s on 8 slots), a 10-row batch of the same type,
    a 10-row batch of another type and a slow query of a third type each finish long before it does."""
    proc = Sleepy()
    jm.register_batch_processor("fair", "big", proc)
    jm.register_batch_processor("fair", "other", Sleepy())
    jm.register_slowquery_processor("fair", "q", QueryProc())
    runner = threading.Thread(daemon=True, target=jm.run)
    runner.start()
    try:
        # each type has run once on this worker (its first flow run costs Prefect's set-up, seconds)
        warm = [jm.slowquery_submit("fair", "q", {}, {"x": 0}),
                jm.batch_submit("fair", "other", {"tag": "warm"}, [(1, {"sleep": 0.0})]),
                jm.batch_submit("fair", "big", {"tag": "warm"}, [(1, {"sleep": 0.0})])]
        wait_until(lambda: jm.slowquery_done(warm[0]).status.is_final
                   and all(jm.batch_status(b).status.is_final for b in warm[1:]), timeout=60, what="warm-up")
        big = jm.batch_submit("fair", "big", {"tag": "big"}, [(n, {"sleep": 0.02}) for n in range(1, 3001)])
        wait_until(lambda: jm.batch_status(big).nsuccess >= 200, timeout=60, every=0.05, what="the big batch")
        t0 = time.monotonic()
        small = jm.batch_submit("fair", "big", {"tag": "small"}, [(n, {"sleep": 0.02}) for n in range(1, 11)])
        other = jm.batch_submit("fair", "other", {"tag": "other"}, [(n, {"sleep": 0.0}) for n in range(1, 11)])
        query = jm.slowquery_submit("fair", "q", {}, {"x": 1})
        took: dict[str, float] = {}

        def all_final() -> bool:
            for name, final in (("small", lambda: jm.batch_status(small).status.is_final),
                                ("other", lambda: jm.batch_status(other).status.is_final),
                                ("query", lambda: jm.slowquery_done(query).status.is_final)):
                if name not in took and final():
                    took[name] = time.monotonic() - t0
            return len(took) == 3

        wait_until(all_final, timeout=60, every=0.01, what="the small batches and the query")
        big_left = jm.batch_status(big)
        assert not big_left.status.is_final, (took, big_left)  # all three were done while it still ran
        assert big_left.nrows - big_left.nsuccess > 200, (took, big_left)
        assert jm.batch_status(small).nsuccess == 10 and jm.batch_status(other).nsuccess == 10
        assert jm.slowquery_done(query).status is BatchStatus.SUCCESS
        # the small batch of the big one's type ran its rows among the big batch's, not after them
        done_big_after = [i for i, (tag, _) in enumerate(proc.lines) if tag == "big"]
        done_small = [i for i, (tag, _) in enumerate(proc.lines) if tag == "small"]
        assert max(done_small) < max(done_big_after)
        print(f"\nunder a big batch: {', '.join(f'{k} {v * 1000:.0f} ms' for k, v in sorted(took.items()))}")
        wait_until(lambda: jm.batch_status(big).status.is_final, timeout=120, what="the big batch")
        assert jm.batch_status(big).status is BatchStatus.SUCCESS
    finally:
        jm.engine.stopping.set()
        runner.join(60)
