"""The multi-host tests' batch type ``mh/rec``: a processor that records every call it gets.

Each call appends ``call <tag> <line> <host> <pid>`` to a journal local to its host (``$MH_JOURNAL``, one
``write`` per line on an O_APPEND descriptor, so every process of a host can share it), sleeps
``input["ms"]`` milliseconds (I/O-bound work), and answers success with ``{"host": ...}`` and the output
line ``<tag>,<line>`` in ``out.csv``; ``mark_done`` appends ``done <batch> <tag> <host> <pid> <status>
<nsuccess> <nfailed>``. The journal is local on purpose: a host whose network is cut keeps recording the
calls it makes, so the test can tell calls that reached nobody from results that were written.
``tag`` comes from the batch context.

Started as a user would: ``alya worker tests.support.mh_app:jm``, or the flow ``tests/support/mh_app.py:mh_rec_flow``
deployed to a work pool. Imports only alya (the flow-run subprocess loads this file by path).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from alya import BatchJobResult, BatchStatus, JobManager, batch_flow

APP, OP = "mh", "rec"


class Journal:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self._fd: int | None = None

    def write(self, text: str) -> None:
        if not self.path:
            return
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(self._fd, (text + "\n").encode())


class Recorder:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def do_batch_job(self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]) -> BatchJobResult:
        host, tag = socket.gethostname(), context.get("tag", "?")
        self.journal.write(f"call {tag} {line} {host} {os.getpid()}")
        start = time.time_ns()  # one kernel clock for every simulated host: spans compare across hosts
        time.sleep(float(input.get("ms", 0)) / 1000)
        self.journal.write(f"span {tag} {line} {host} {start} {time.time_ns()}")
        return BatchJobResult(BatchStatus.SUCCESS, {"host": host}, blobrows={"out.csv": f"{tag},{line}"})

    def mark_done(self, initblock: Any, context: dict[str, Any], details: Any) -> None:
        self.journal.write(f"done {details.id} {context.get('tag', '?')} {socket.gethostname()} {os.getpid()} "
                           f"{details.status.value} {details.nsuccess} {details.nfailed}")


jm = JobManager.from_env()
jm.register_batch_processor(APP, OP, Recorder(Journal(os.environ.get("MH_JOURNAL"))))


@batch_flow(APP, OP)
def mh_rec_flow(batch_id: str | None = None) -> dict[str, Any]:
    """The probe's batch type as a deployable flow."""
    return jm.process_batches(APP, OP, batch_id)
