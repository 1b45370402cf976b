"""A benchmark worker process for the engine benchmarks (io, latency, abort, crash): ``jm.run()`` until
SIGTERM, serving the batch type ``bench/probe`` (each row sleeps ``input["ms"]`` or ``--sleep-ms``) and the
slow-query type ``bench/query`` (instant), and for ``bench.mixed`` the types ``other/instant``,
``other/query`` and ``fresh/first``. With ``--log FILE`` every processor call that returns appends
"end <line> <pid> <monotonic-ns>" to FILE (O_APPEND, one write per line), so a benchmark can count calls
made, and made twice, across processes.

    python -m bench.probe DATABASE_URL [--sleep-ms N] [--log FILE]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from alya import BatchJobResult, BatchStatus, JobManager, SlowQueryResult

OK = BatchJobResult(BatchStatus.SUCCESS)


class Probe:
    def __init__(self, sleep_ms: float, log: str | None) -> None:
        self.sleep = sleep_ms / 1000
        self.fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if log else None
        self.pid = os.getpid()

    def do_batch_job(self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]) -> Any:
        time.sleep(float(input.get("ms", self.sleep * 1000)) / 1000)
        if self.fd is not None:
            os.write(self.fd, f"end {line} {self.pid} {time.time_ns()}\n".encode())
        return OK

    def mark_done(self, initblock: Any, context: dict[str, Any], details: Any) -> None:
        pass


class Query:
    def do_slow_query(self, initblock: Any, context: dict[str, Any], input: dict[str, Any]) -> SlowQueryResult:
        # the wall time of the call: bench latency splits submit -> call -> visible with it
        return SlowQueryResult(BatchStatus.SUCCESS, {"echo": input.get("q"), "t": time.time()})

    def mark_done(self, initblock: Any, context: dict[str, Any], details: Any) -> None:
        pass


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("database_url")
    p.add_argument("--sleep-ms", type=float, default=0.0)
    p.add_argument("--log")
    a = p.parse_args()
    jm = JobManager(database_url=a.database_url)
    jm.register_batch_processor("bench", "probe", Probe(a.sleep_ms, a.log))
    jm.register_slowquery_processor("bench", "query", Query())
    # the "many at once" bench (bench.mixed): another app's batch and slow-query types, and a type that
    # no warm-up runs (the first batch of a type a running worker has not seen yet)
    jm.register_batch_processor("other", "instant", Probe(0, None))
    jm.register_slowquery_processor("other", "query", Query())
    jm.register_batch_processor("fresh", "first", Probe(0, None))
    jm.run()


if __name__ == "__main__":
    main()
