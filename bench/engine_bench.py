"""The engine benchmarks (rows, not chunks, as the unit of concurrency and visibility), each against a
fresh database, a `prefect server start` and warm worker processes (``bench.probe``, ``jm.run()``):

    python -m bench io --rows 10000 --sleep-ms 20 --workers 2 --concurrency 16   # rows/s against the ideal
    python -m bench latency --queries 100 --workers 2                             # slow-query p50/p99/max
    python -m bench abort --rows 20000 --sleep-ms 10 --workers 2                  # done but recorded aborted
    python -m bench crash --rows 20000 --sleep-ms 10 --workers 2                  # calls replayed after SIGKILL

"Warm": the workers are up and have each run a flow before the timed part starts (a process's first
Prefect flow run costs seconds, which a long-running worker pays once).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg2

from alya import BatchInput, JobManager, JobManagerConfig
from bench.common import fresh_database, prefect_server, wait_registered


@contextmanager
def warm_workers(url: str, penv: dict[str, str], n: int, env: dict[str, str], *args: str,
                 warm: tuple[str, str] = ("bench", "probe")) -> Iterator[list[Any]]:
    """``n`` probe workers, registered, each having run a flow (a warm-up batch of type ``warm``, two rows
    per slot)."""
    full = {**os.environ, **penv, "ALYA_DATABASE_URL": url, "ALYA_LOG_LEVEL": "warning",
            "PREFECT_LOGGING_LEVEL": "WARNING", **env}
    procs = [subprocess.Popen([sys.executable, "-m", "bench.probe", url, *args], env=full) for _ in range(n)]
    jm = JobManager(database_url=url)
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        wait_registered(conn, procs, n)
        slots = int(env.get("ALYA_CONCURRENCY", "8"))
        ran: set[str] = set()
        for _ in range(20):  # until every worker has run a flow (each picks up work at its own pace)
            warm_id = jm.batch_submit(*warm, {},
                                      (BatchInput(i, {"ms": 200}) for i in range(1, 2 * n * slots + 1)))
            while not jm.batch_status(warm_id).status.is_final:
                time.sleep(0.05)
            with conn.cursor() as cur:
                cur.execute("SELECT DISTINCT split_part(doneby, ':', 2) FROM batchrows WHERE batch = %s", (warm_id,))
                ran |= {r[0] for r in cur.fetchall()}
            if len(ran) >= n:
                break
        print(f"warm-up: {len(ran)} of {n} workers ran rows")
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait(60)
        conn.close()
        jm.close()


def _held_batch(url: str, rows: int, sleep_ms: float) -> tuple[JobManager, str]:
    jm = JobManager(database_url=url, config=JobManagerConfig(batchrowmax=max(rows, 1)))  # type: ignore[call-arg]
    bid = jm.batch_submit("bench", "probe", {}, (BatchInput(i, {"ms": sleep_ms}) for i in range(1, rows + 1)),
                          wait=True)
    return jm, bid


def _until_final(jm: JobManager, bid: str, every: float = 0.02) -> float:
    t = time.perf_counter()
    while not jm.batch_status(bid).status.is_final:
        time.sleep(every)
    return time.perf_counter() - t


def io(rows: int = 10_000, sleep_ms: float = 20, workers: int = 2, concurrency: int = 16,
       from_submit: bool = False) -> None:
    """I/O-bound rows (each sleeps SLEEP_MS): rows/s against the ideal workers x concurrency x 1000/ms.
    ``--from-submit``: as a user times it, from the ``batch_submit`` call (rows streamed in included), on
    workers warmed on *another* type (the batch's type's first flow run on them included); otherwise the
    held batch is released on workers that have run its type."""
    warm = ("other", "instant") if from_submit else ("bench", "probe")
    with fresh_database() as url, prefect_server() as penv, \
            warm_workers(url, penv, workers, {"ALYA_CONCURRENCY": str(concurrency)}, warm=warm):
        if from_submit:
            jm = JobManager(database_url=url, config=JobManagerConfig(batchrowmax=max(rows, 1)))  # type: ignore[call-arg]
            t = time.perf_counter()
            bid = jm.batch_submit("bench", "probe", {}, (BatchInput(i, {"ms": sleep_ms}) for i in range(1, rows + 1)))
        else:
            jm, bid = _held_batch(url, rows, sleep_ms)
            t = time.perf_counter()
            jm.wait_off(bid)
        _until_final(jm, bid)
        elapsed = time.perf_counter() - t
        s = jm.batch_status(bid)
        jm.close()
    ideal = workers * concurrency * 1000 / sleep_ms
    rate = rows / elapsed
    print(f"io  {rows} rows x {sleep_ms:g} ms, {workers} workers x concurrency {concurrency}"
          f"{', from submit, type not run before' if from_submit else ''}: {elapsed:.2f} s = "
          f"{rate:.0f} rows/s; ideal {ideal:.0f} rows/s; ratio {rate / ideal:.2f}  (status {s.status.value}, "
          f"nsuccess {s.nsuccess})")


def latency(queries: int = 100, workers: int = 2, poll_ms: float = 5.0, redis: bool = True,
            settle: float = 0.0) -> None:
    """Slow queries with an instant processor, one after another, against warm workers: time from submit
    until slowquery_done reports a final status (polled every POLL_MS), Redis on as a web service runs it
    (``--no-redis``: every poll reads PostgreSQL). ``--settle``: seconds to wait after the warm-up, so that
    the workers are idle (the warm-up's chunk tasks linger ``ALYA_TASK_SECONDS``, its run ``ALYA_LINGER_SEC``)."""
    from bench.mixed import REDIS

    env = {"ALYA_REDIS_URL": REDIS} if redis else {}
    with fresh_database() as url, prefect_server() as penv, warm_workers(url, penv, workers, env):
        time.sleep(settle)
        jm = JobManager(database_url=url, redis_url=REDIS if redis else None)
        took, submit_ms, to_call, to_seen = [], [], [], []
        for i in range(queries + 5):
            t, wall = time.perf_counter(), time.time()
            req = jm.slowquery_submit("bench", "query", {}, {"q": i})
            submitted = time.perf_counter()
            while not (done := jm.slowquery_done(req)).status.is_final:
                time.sleep(poll_ms / 1000)
            seen, seen_wall = time.perf_counter(), time.time()
            if i >= 5:  # the first few are the warm-up of the query type's flow run
                took.append((seen - t) * 1000)
                submit_ms.append((submitted - t) * 1000)
                called = (done.result or {}).get("t", seen_wall)
                to_call.append((called - wall) * 1000)
                to_seen.append((seen_wall - called) * 1000)
        jm.close()
    quarters = [statistics.median(took[i * len(took) // 4:(i + 1) * len(took) // 4] or [0.0]) for i in range(4)]
    took.sort()
    p99 = took[min(len(took) - 1, int(len(took) * 0.99))]
    print(f"latency  {queries} slow queries, {workers} warm workers, Redis {'on' if redis else 'off'}, "
          f"polled every {poll_ms:g} ms: p50 {statistics.median(took):.1f} ms, "
          f"p99 {p99:.1f} ms, max {took[-1]:.1f} ms")
    print(f"  p50 of each part: the submit call {statistics.median(submit_ms):.1f} ms; submit to the processor "
          f"call {statistics.median(to_call):.1f} ms; the call to the client seeing it final "
          f"{statistics.median(to_seen):.1f} ms (polled every {poll_ms:g} ms)")
    print("  p50 of each quarter of the stream, in order: " + ", ".join(f"{q:.1f}" for q in quarters) + " ms")


def _ended(log: str) -> list[tuple[int, int, int]]:
    try:
        with open(log) as fh:
            return [(int(p[1]), int(p[2]), int(p[3])) for p in (ln.split() for ln in fh) if len(p) == 4]
    except FileNotFoundError:
        return []


def abort(rows: int = 20_000, sleep_ms: float = 10, workers: int = 2, after: int = 2000) -> None:
    """Abort a running batch once AFTER rows were processed: how many rows whose processor call had
    returned end up recorded `aborted` (and how many kept their results)."""
    log = tempfile.mktemp(prefix="alya-bench-abort-")
    with fresh_database() as url, prefect_server() as penv, \
            warm_workers(url, penv, workers, {}, "--log", log):
        open(log, "w").close()  # the warm-up's calls out (truncated in place: the workers keep appending)
        jm, bid = _held_batch(url, rows, sleep_ms)
        jm.wait_off(bid)
        while len(_ended(log)) < after:
            time.sleep(0.005)
        summary = jm.batch_abort(bid)
        time.sleep(3.0)  # the workers' last write-backs (within a flush) and their in-flight rows
        s = jm.batch_status(bid)
        conn = psycopg2.connect(url)
        with conn.cursor() as cur:
            cur.execute("SELECT line, status::text FROM batchrows WHERE batch = %s", (bid,))
            status = dict(cur.fetchall())
        conn.close()
        jm.close()
    returned = {line for line, _, _ in _ended(log)}
    lost = sum(1 for line in returned if status[line] == "aborted")
    print(f"abort  after {after} rows of {sleep_ms:g} ms, {workers} workers: {len(returned)} calls returned; "
          f"{lost} of them recorded aborted (done but aborted); at the abort nsuccess {summary.nsuccess}, "
          f"finally {s.nsuccess} success, {s.naborted} aborted")
    os.unlink(log)


def crash(rows: int = 20_000, sleep_ms: float = 10, workers: int = 2, after: int = 2000) -> None:
    """SIGKILL one of the workers once AFTER rows were processed; the others (and recovery after
    ALYA_RECOVERY_SEC=5) finish the batch: how many processor calls were made twice."""
    log = tempfile.mktemp(prefix="alya-bench-crash-")
    with fresh_database() as url, prefect_server() as penv, \
            warm_workers(url, penv, workers, {"ALYA_RECOVERY_SEC": "5"}, "--log", log) as procs:
        open(log, "w").close()  # the warm-up's calls out (truncated in place: the workers keep appending)
        jm, bid = _held_batch(url, rows, sleep_ms)
        jm.wait_off(bid)
        while len(_ended(log)) < after:
            time.sleep(0.005)
        victim = procs[0]
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        took = _until_final(jm, bid, every=0.1)
        s = jm.batch_status(bid)
        jm.close()
    ended = _ended(log)
    calls = Counter(line for line, _, _ in ended)
    replayed = sum(n - 1 for n in calls.values() if n > 1)
    by_victim = sum(1 for _, pid, _ in ended if pid == victim.pid)
    print(f"crash  {rows} rows of {sleep_ms:g} ms, {workers} workers, SIGKILL of one after {after} rows: "
          f"{replayed} calls replayed (the victim had finished {by_victim}); batch {s.status.value} "
          f"({s.nsuccess} success) {took:.1f} s after the kill; {len(calls)} distinct rows called")
    os.unlink(log)


def register(app: Any) -> None:
    from bench.mixed import mixed

    for fn in (io, latency, abort, crash, mixed):
        app.command()(fn)

