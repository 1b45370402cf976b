"""The scale benchmark's batch type ``bench/sleep``: each row sleeps ``input["ms"]`` milliseconds and
succeeds, like a processor waiting on a remote API (I/O-bound: the process is idle while it waits).

Run as a user would on each machine: ``alya worker bench.sleeper:jm`` with ALYA_* set.
"""

from __future__ import annotations

import time
from typing import Any

from alya import BatchJobResult, BatchStatus, JobManager

OK = BatchJobResult(BatchStatus.SUCCESS)


class Sleeper:
    def do_batch_job(self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]) -> BatchJobResult:
        time.sleep(float(input.get("ms", 0)) / 1000)
        return OK

    def mark_done(self, initblock: Any, context: dict[str, Any], details: Any) -> None:
        pass


jm = JobManager.from_env()
jm.register_batch_processor("bench", "sleep", Sleeper())
