"""A worker process for the tests: a JobManager with a logging processor on one app's ops, run with
jm.run() until idle (``--idle``) or until signalled.

    python -m tests.support.worker_main DATABASE_URL STORE_URL APP OP[,OP...] LOGFILE [--sleep S] [--chunk N]
        [--recovery-sec N] [--idle] [--concurrency N] [--stamp]

Each row appends "start <batch> <line> <pid> <unix time>" and "end <batch> <line> <pid> <status> <unix time>"
lines to LOGFILE
(O_APPEND, one write per line, so several processes can share it); mark_done appends "done <batch>
<pid> <status> <nsuccess> <nfailed> <naborted>". A row's answer depends only on its input: "mode":
"fail" fails it, anything else succeeds; "sleep" overrides --sleep. ``--stamp`` appends the wall-clock time
(``time.time()``) to each start and end line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from alya import BatchJobResult, BatchStatus, ErrorMessage, JobManager, JobManagerConfig


class LogProc:
    def __init__(self, log: str, sleep: float, stamp: bool = False) -> None:
        self.fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.stamp = stamp
        self.sleep = sleep
        self.pid = os.getpid()

    def _log(self, text: str) -> None:
        os.write(self.fd, (text + "\n").encode())

    def do_batch_job(self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]) -> Any:
        batch = context.get("tag", "?")
        self._log(f"start {batch} {line} {self.pid} {time.time():.6f}")
        if input.get("mode") == "exit":  # a row that kills its process (a crashing library, an OOM kill)
            os._exit(17)
        time.sleep(float(input.get("sleep", self.sleep)))
        if input.get("mode") == "fail":
            result = BatchJobResult(BatchStatus.FAILED, {"line": line}, [ErrorMessage(1, "bad")])
        else:
            result = BatchJobResult(BatchStatus.SUCCESS, {"line": line}, blobrows={"out.txt": f"{line}"})
        self._log(f"end {batch} {line} {self.pid} {result.status.value} {time.time():.6f}")
        return result

    def mark_done(self, initblock: Any, context: dict[str, Any], details: Any) -> None:
        self._log(f"done {details.id} {self.pid} {details.status.value} {details.nsuccess} {details.nfailed} "
                  f"{details.naborted}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("database_url")
    p.add_argument("store_url")
    p.add_argument("app")
    p.add_argument("ops")
    p.add_argument("log")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--chunk", type=int, default=20)
    p.add_argument("--recovery-sec", type=int, default=60)
    p.add_argument("--idle", action="store_true")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--stamp", action="store_true")
    a = p.parse_args(argv)
    config = JobManagerConfig(batchchunk_nrows=a.chunk, recovery_sec=a.recovery_sec, retry_backoff_sec=0.0,
                              poll_sec=0.1, task_seconds=0.5, concurrency=a.concurrency)
    jm = JobManager(database_url=a.database_url, redis_url=os.environ.get("ALYA_TEST_REDIS"),
                    object_store_url=a.store_url, config=config)
    proc = LogProc(a.log, a.sleep, a.stamp)
    for op in a.ops.split(","):
        jm.register_batch_processor(a.app, op, proc)
    print(f"worker {os.getpid()} {jm.engine.worker_id}", flush=True)
    jm.run(stop_when_idle=a.idle)
    jm.close()
    print(f"worker {os.getpid()} stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
