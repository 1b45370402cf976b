"""A file-intake application for the tests, importable in subprocesses (concurrent scans, the memory bound,
the CLI): file type ``rows`` (any CSV, Parquet or JSON lines file with a column ``id`` becomes a batch of
acme/load) on a JobManager built from ALYA_DATABASE_URL (and ALYA_INTAKE_TEST_DELAY_SEC per check).

    python -m tests.support.intake_app scan FOLDER START_AT     # one pass at START_AT (epoch s); prints taken files
    python -m tests.support.intake_app memory FILE              # file_submit; prints peak RSS and seconds
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import sys
import time
from typing import Any

from alya import FileCheck, IncomingFile, JobManager, JobManagerConfig

APP, OP, FILE_TYPE = "acme", "load", "rows"


class RowsChecker:
    """A file with a column ``id`` becomes a batch; one without is rejected. ``delay_sec``: a slow check,
    so that concurrent scans overlap."""

    def __init__(self, delay_sec: float = 0.0, chunksize: int = 50_000) -> None:
        self.delay_sec = delay_sec
        self.chunksize = chunksize

    def check(self, file: IncomingFile, context: dict[str, Any]) -> FileCheck:
        frames = file.frames(chunksize=self.chunksize)
        first = next(frames, None)
        if first is None or "id" not in first.columns:
            return FileCheck(ok=False, error="no column id")
        if self.delay_sec:
            time.sleep(self.delay_sec)
        return FileCheck(ok=True, app=APP, op=OP, context={**context, "file": file.name},
                         rows=itertools.chain([first], frames))


def build() -> JobManager:
    manager = JobManager(database_url=os.environ.get("ALYA_DATABASE_URL"),
                         config=JobManagerConfig(batchchunk_nrows=100))  # type: ignore[call-arg]
    manager.register_file_checker(FILE_TYPE, RowsChecker(float(os.environ.get("ALYA_INTAKE_TEST_DELAY_SEC", "0"))))
    return manager


jm = build()  # for `alya intake --module tests.support.intake_app:jm`; connects on first use only


def main(argv: list[str]) -> None:
    if argv[0] == "scan":
        folder, start_at = argv[1], float(argv[2])
        time.sleep(max(0.0, start_at - time.time()))
        taken = jm.intake_scan(folder, {"*.csv": FILE_TYPE}, min_age_sec=0)
        print(json.dumps([fi.source for fi in taken]))
    elif argv[0] == "memory":
        # warm up (imports, pools, first COPY) on a tiny file, so that the growth measured is the file's
        tiny = argv[1] + ".tiny.csv"
        with open(tiny, "w") as fh:
            fh.write("id\n1\n")
        jm.file_submit(tiny, FILE_TYPE)
        base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        fi = jm.file_submit(argv[1], FILE_TYPE)
        elapsed = time.perf_counter() - t0
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"status": fi.status, "nrows": fi.nrows, "error": fi.error, "peak_kb": peak_kb,
                          "base_kb": base_kb, "seconds": elapsed}))
    jm.close()


if __name__ == "__main__":
    main(sys.argv[1:])
