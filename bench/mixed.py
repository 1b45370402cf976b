"""Many at once, timed as a user sees it: from submit to the final status read by a polling client (Redis
on), on warm workers, with a big batch in the queue.

    python -m bench mixed --big-rows 40000 --sleep-ms 20 --workers 2 --concurrency 16

Two warm ``jm.run()`` workers (``bench.probe``). Each type is run once before the clock starts, except
``fresh/first``. Then a batch of BIG_ROWS rows of ``bench/probe`` (SLEEP_MS a row) is submitted, and while it
runs, every 0.5 s a slow query (``bench/query`` and ``other/query`` in turn) and a 10-row batch of another
type (``other/instant``, instant rows), every second a 10-row batch of the big batch's own type (SLEEP_MS
rows), and once, 2 s in, a 10-row batch of ``fresh/first``, a type no worker has run yet. A client thread
polls every open item every 5 ms (``slowquery_done`` / ``batch_status``) and notes when it reads it final.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Any

from alya import BatchInput, JobManager, JobManagerConfig
from bench.common import fresh_database, prefect_server

REDIS = os.environ.get("ALYA_BENCH_REDIS", "redis://127.0.0.1:6379/13")


class _Poller:
    """Submitted items and the time a client first read each one final."""

    def __init__(self, jm: JobManager) -> None:
        self.jm = jm
        self.items: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def add(self, kind: str, ident: str, t0: float, query: bool = False) -> None:
        with self.lock:
            self.items.append({"kind": kind, "id": ident, "t0": t0, "query": query, "done": None})

    def _run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                open_items = [i for i in self.items if i["done"] is None]
            for i in open_items:
                final = (self.jm.slowquery_done(i["id"]).status.is_final if i["query"]
                         else self.jm.batch_status(i["id"]).status.is_final)
                if final:
                    i["done"] = time.perf_counter()
            time.sleep(0.005)

    def waits(self, kind: str) -> list[float]:
        with self.lock:
            return sorted(i["done"] - i["t0"] for i in self.items if i["kind"] == kind and i["done"] is not None)

    def pending(self) -> int:
        with self.lock:
            return sum(1 for i in self.items if i["done"] is None)


def _line(name: str, waits: list[float]) -> str:
    if not waits:
        return f"  {name:<44} none finished"
    if len(waits) == 1:
        return f"  {name:<44} {waits[0] * 1000:,.0f} ms"
    return (f"  {name:<44} n={len(waits):<3} p50 {statistics.median(waits) * 1000:,.0f} ms, "
            f"max {waits[-1] * 1000:,.0f} ms")


def mixed(big_rows: int = 40_000, sleep_ms: float = 20, workers: int = 2, concurrency: int = 16) -> None:
    """Slow queries and small batches submitted while a big batch runs: submit-to-final waits as a polling
    client sees them (Redis on), and the big batch's rate against the ideal."""
    from bench.engine_bench import warm_workers

    env = {"ALYA_CONCURRENCY": str(concurrency), "ALYA_REDIS_URL": REDIS}
    with fresh_database() as url, prefect_server() as penv, warm_workers(url, penv, workers, env):
        jm = JobManager(database_url=url, redis_url=REDIS,
                        config=JobManagerConfig(batchrowmax=max(big_rows, 1)))  # type: ignore[call-arg]

        def small(app: str, op: str, ms: float) -> str:
            return jm.batch_submit(app, op, {}, [BatchInput(i, {"ms": ms}) for i in range(1, 11)])

        for ident, query in ((jm.slowquery_submit("bench", "query", {}, {"q": 0}), True),
                             (jm.slowquery_submit("other", "query", {}, {"q": 0}), True),
                             (small("other", "instant", 0), False), (small("bench", "probe", sleep_ms), False)):
            while not (jm.slowquery_done(ident) if query else jm.batch_status(ident)).status.is_final:
                time.sleep(0.01)  # every type but fresh/first has run once on the workers
        poller = _Poller(jm)
        t_big = time.perf_counter()
        big = jm.batch_submit("bench", "probe", {}, (BatchInput(i, {"ms": sleep_ms}) for i in range(1, big_rows + 1)))
        poller.add("big", big, t_big)
        n = 0
        fresh_sent = False
        while not jm.batch_status(big).status.is_final:
            time.sleep(0.5)
            n += 1
            app = "bench" if n % 2 else "other"
            t = time.perf_counter()
            poller.add("slow query under load", jm.slowquery_submit(app, "query", {}, {"q": n}), t, query=True)
            t = time.perf_counter()
            poller.add("10 rows, another type, under load", small("other", "instant", 0), t)
            if n % 2 == 0:
                t = time.perf_counter()
                poller.add("10 rows, the big batch's type, under load", small("bench", "probe", sleep_ms), t)
            if not fresh_sent and time.perf_counter() - t_big >= 2:
                fresh_sent = True
                t = time.perf_counter()
                poller.add("10 rows, a type no worker has run yet", small("fresh", "first", 0), t)
        deadline = time.monotonic() + 120
        while poller.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        poller.stop.set()
        big_s = poller.waits("big")[0]
        jm.close()
    ideal = workers * concurrency * 1000 / sleep_ms
    print(f"mixed  {big_rows} rows x {sleep_ms:g} ms, {workers} workers x concurrency {concurrency}, Redis on; "
          "submit -> final as read by a client polling every 5 ms:")
    for kind in ("slow query under load", "10 rows, another type, under load",
                 "10 rows, the big batch's type, under load", "10 rows, a type no worker has run yet"):
        print(_line(kind, poller.waits(kind)))
    print(f"  {'the big batch':<44} {big_s:.1f} s = {big_rows / big_s:,.0f} rows/s, "
          f"{big_rows / big_s / ideal:.2f} of the ideal {ideal:,.0f}")
    if poller.pending():
        print(f"  {poller.pending()} items not final 120 s after the big batch")
