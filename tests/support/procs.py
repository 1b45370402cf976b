"""Test processors and initializers, importable by test subprocesses too (tests/support/worker_main.py).

``Proc`` decides what to do from each row's input, so one registered processor covers every row
semantic:
  {"mode": "ok"}                 success, result {"line": .., "x": ..}, blob rows from input["blobs"]
  {"mode": "fail"}               business failure with a message
  {"mode": "raise"}              raises every time (a fault)
  {"mode": "raise_once"}         raises on the first call for this (batch line), then succeeds
  {"mode": "bad_type"}           returns a dict instead of a BatchJobResult
  {"mode": "queued"/"inprog"}    returns a status other than success/failed
  "sleep": seconds               sleeps before answering

Also the engine tests' helpers: ``rows``, ``drain`` (the engine, chunk by chunk, without Prefect),
``wait_until``, worker processes (``spawn_worker``, ``worker_processes``, ``wait_workers_registered``,
``stop_workers``, ``kill_when_busy``, ``read_log``), ``run_until_idle`` and ``finish`` (``jm.run`` on a
thread), ``run_claim``, and ``manager``, ``states`` and ``batch_row`` (a JobManager of a test's own, its rows
and its batch row as stored).
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from alya import BatchDetails, BatchJobResult, BatchStatus, ErrorMessage, JobManager, SlowQueryResult
from tests.support.config import make_config
from tests.support.services import store_sql


@dataclass
class Block:
    n: int
    alive: bool = True
    closed: bool = False

    def is_alive(self) -> bool:
        return self.alive

    def close(self) -> None:
        self.closed = True


@dataclass
class Init:
    """Counts init() calls; the first ``fail_first`` calls raise; ``broken`` makes every call raise."""

    fail_first: int = 0
    broken: bool = False
    calls: int = 0
    blocks: list[Block] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def init(self, app: str) -> Block:
        with self.lock:
            self.calls += 1
            if self.broken or self.calls <= self.fail_first:
                raise ConnectionError(f"init of {app} failed (call {self.calls})")
            block = Block(self.calls)
            self.blocks.append(block)
            return block


class Proc:
    """A batch processor driven by the row's input; records every call and every mark_done."""

    def __init__(self, hook: Any = None) -> None:
        self.lock = threading.Lock()
        self.calls: Counter[int] = Counter()  # line -> number of calls
        self.blocks_seen: set[int] = set()
        self.done: list[BatchDetails] = []
        self.hook = hook  # called as hook(line, input) before answering

    def do_batch_job(self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]) -> Any:
        with self.lock:
            self.calls[line] += 1
            ncalls = self.calls[line]
            if initblock is not None:
                self.blocks_seen.add(initblock.n)
        if self.hook is not None:
            self.hook(line, input)
        if input.get("sleep"):
            time.sleep(float(input["sleep"]))
        mode = input.get("mode", "ok")
        if mode == "raise" or (mode == "raise_once" and ncalls == 1):
            raise RuntimeError(f"boom at line {line}")
        if mode == "bad_type":
            return {"status": "success"}
        if mode in ("queued", "inprog"):
            return BatchJobResult(BatchStatus(mode))
        if mode == "fail":
            return BatchJobResult(BatchStatus.FAILED, {"line": line},
                                  [ErrorMessage(7, "bad_value", "x", [str(input.get("x"))])])
        return BatchJobResult(BatchStatus.SUCCESS, {"line": line, "x": input.get("x"), "ctx": context},
                              blobrows=input.get("blobs") or {})

    def mark_done(self, initblock: Any, context: dict[str, Any], details: BatchDetails) -> None:
        with self.lock:
            self.done.append(details)


class QueryProc:
    def __init__(self) -> None:
        self.done: list[BatchDetails] = []

    def do_slow_query(self, initblock: Any, context: dict[str, Any], input: dict[str, Any]) -> SlowQueryResult:
        if input.get("mode") == "raise":
            raise RuntimeError("query boom")
        if input.get("mode") == "fail":
            return SlowQueryResult(BatchStatus.FAILED, None, [ErrorMessage(1, "bad_input", "q")])
        return SlowQueryResult(BatchStatus.SUCCESS, {"answer": input.get("q"), "who": context.get("user")},
                               [ErrorMessage(2, "note")], {"report.csv": "s3://bucket/some/report.csv"})

    def mark_done(self, initblock: Any, context: dict[str, Any], details: BatchDetails) -> None:
        self.done.append(details)


class FastProc:
    """A no-op processor (benchmarks, the 200k-row batch): one blob row per row when the input asks."""

    def __init__(self) -> None:
        self.done: list[BatchDetails] = []

    def do_batch_job(self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]) -> Any:
        return BatchJobResult(BatchStatus.SUCCESS, None, blobrows=input.get("blobs") or {})

    def mark_done(self, initblock: Any, context: dict[str, Any], details: BatchDetails) -> None:
        self.done.append(details)


def rows(n: int, start: int = 1, **input: Any) -> list[tuple[int, dict[str, Any]]]:
    return [(line, {"x": line, **input}) for line in range(start, start + n)]


def drain(jm: Any, app: str, op: str, limit: int = 10_000) -> int:
    """Process chunks of (app, op) with the engine directly (no Prefect) until none is left to claim;
    returns the number of rows written."""
    done = 0
    for _ in range(limit):
        rep = jm.engine.process_chunk(app, op)
        if rep.batch is None:
            return done
        done += rep.nrows
    raise AssertionError("drain did not finish")


def wait_until(pred: Any, timeout: float = 30.0, every: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def spawn_worker(database_url: str, store_url: str, app: str, ops: str, log: str, *args: str,
                 out: Any = None) -> Any:
    """Start tests/support/worker_main.py in its own process, talking to this session's Prefect test server (no
    ephemeral server of its own: that would take 5-16 s to start per process). ``out``: a file path for
    the worker's stdout and stderr (its JSON log lines)."""
    import os
    import subprocess
    import sys

    import prefect.settings

    from tests.support import services

    env = dict(os.environ)
    env.update({
        "PREFECT_API_URL": str(prefect.settings.PREFECT_API_URL.value()),
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "ALYA_TEST_REDIS": services.REDIS_URL,
        "PYTHONPATH": os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    })
    cmd = [sys.executable, "-m", "tests.support.worker_main", database_url, store_url, app, ops, log, *args]
    if out is None:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out, "wb") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)


@contextmanager
def worker_processes(workers: list[Any]) -> Iterator[list[Any]]:
    """The worker processes (of ``spawn_worker``) for a ``with`` block; any still running when it ends (a
    failed test) is killed."""
    try:
        yield workers
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()


def wait_workers_registered(jm: JobManager, n: int, timeout: float = 180) -> None:
    """Until ``n`` workers are in the ``workers`` table (each has started its engine)."""
    wait_until(lambda: int(store_sql(jm.store, "SELECT count(*) FROM workers")[0][0]) >= n, timeout=timeout,
               what=f"{n} workers registered")


def stop_workers(workers: list[Any]) -> list[int]:
    """SIGTERM every worker process; their exit codes (each given 60 s)."""
    for w in workers:
        w.send_signal(signal.SIGTERM)
    return [w.wait(60) for w in workers]


def kill_when_busy(jm: JobManager, batch: str, worker: Any, nsuccess: int, timeout: float) -> None:
    """Once ``nsuccess`` rows of the batch succeeded and some are in progress (the worker holds a chunk),
    SIGKILL the worker process, and check it died of it."""
    def busy() -> bool:
        st = [s[0] for s in states(jm, batch).values()]
        return st.count("success") >= nsuccess and "inprog" in st

    wait_until(busy, timeout=timeout, every=0.05, what="the worker to be busy")
    worker.send_signal(signal.SIGKILL)
    assert worker.wait(10) == -signal.SIGKILL


@contextmanager
def run_until_idle(jm: JobManager) -> Iterator[threading.Thread]:
    """``jm.run(stop_when_idle=True)`` on a daemon thread, started; a run still going when the ``with`` block
    ends (a failed test) is told to stop and given 30 s."""
    runner = threading.Thread(daemon=True, target=jm.run, kwargs={"stop_when_idle": True})
    try:
        runner.start()
        yield runner
    finally:
        if runner.is_alive():
            jm.engine.stopping.set()
            runner.join(30)


def finish(runner: threading.Thread, timeout: float = 60) -> None:
    """Wait for the run of ``run_until_idle`` to end by itself (idle), and check that it did."""
    runner.join(timeout)
    assert not runner.is_alive()


def read_log(path: str) -> list[list[str]]:
    try:
        with open(path) as fh:
            return [line.split() for line in fh if line.strip()]
    except FileNotFoundError:
        return []


ROOT = str(__import__("pathlib").Path(__file__).resolve().parents[2])


def run_claim(jm: Any, claimed: Any) -> list[Any]:
    """Run a claim's rows on this thread, one by one, as the row pool would (tests that stage races
    between a claim, its outcomes and their write-back)."""
    from alya.engine.rowpool import Job

    reg = jm.registry.processor(claimed.app, claimed.op)
    claimed.processor, claimed.initblock, claimed.log = reg.processor, None, jm.engine.log
    runner = jm.engine.pool.runner
    return [runner.run(Job(claimed, row)) for row in claimed.rows]


def manager(database_url: str, redis_url: str, store_url: str, **cfg: Any) -> JobManager:
    """A JobManager of its own (the caller closes it), with the test config changed by ``cfg``."""
    return JobManager(database_url=database_url, redis_url=redis_url, object_store_url=store_url,
                      config=make_config(**cfg))


def states(jm: JobManager, batch: str) -> dict[int, tuple[Any, ...]]:
    """line -> (status, attempts, doneby) of every row of the batch, read from the database."""
    found = store_sql(jm.store, "SELECT line, status::text, attempts, doneby FROM batchrows WHERE batch = %s",
                      batch)
    return {r[0]: tuple(r[1:]) for r in found}


def batch_row(jm: JobManager, batch: str) -> dict[str, Any]:
    """The batch's own row in the database: status, counts, whether mark_done was called, output files."""
    [(st, ns, nf, na, notified, files)] = store_sql(
        jm.store, "SELECT status::text, nsuccess, nfailed, naborted, notifiedat IS NOT NULL, outputfiles "
        "FROM batches WHERE id = %s", batch)
    return {"status": st, "nsuccess": ns, "nfailed": nf, "naborted": na, "notified": notified, "files": files}


class Gauge(Proc):
    """Sleeps per row and records the most calls in flight at once."""

    def __init__(self, sleep: float = 0.2, hook: Any = None) -> None:
        super().__init__(hook)
        self.sleep = sleep
        self.now = 0
        self.most = 0
        self.started: list[float] = []

    def do_batch_job(self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]) -> Any:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.started.append(time.monotonic())
        try:
            time.sleep(float(input.get("sleep", self.sleep)))
            return super().do_batch_job(initblock, context, line, input)
        finally:
            with self.lock:
                self.now -= 1
