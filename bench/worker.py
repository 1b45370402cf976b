"""A benchmark worker process: a no-op processor on (app, op), run until SIGTERM."""

from __future__ import annotations

import sys
from typing import Any

from alya import BatchJobResult, BatchStatus, JobManager, JobManagerConfig

OK = BatchJobResult(BatchStatus.SUCCESS)
WARMUP_OP = "warmup"


class NoOp:
    def do_batch_job(self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]) -> BatchJobResult:
        return OK

    def mark_done(self, initblock: Any, context: dict[str, Any], details: Any) -> None:
        pass


def main() -> None:
    database_url, app, op = sys.argv[1:4]
    jm = JobManager(database_url=database_url, config=JobManagerConfig())
    jm.register_batch_processor(app, op, NoOp())
    jm.register_batch_processor(app, WARMUP_OP, NoOp())  # another type, run before the clock starts
    jm.run()


if __name__ == "__main__":
    main()
