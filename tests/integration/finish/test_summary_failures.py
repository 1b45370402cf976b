"""A summary that keeps failing the same way fails its batch with a clear reason instead of leaving it open
for ever; one that fails for a while and then works (an outage) changes nothing.

The failure is real: a regular file sits where the batch's output folder must go, so every attempt to
write the output files fails with the same error, as a permission or naming problem in a real store would.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from alya import BatchStatus, JobManager
from alya.core.names import batch_prefix
from tests.support.config import make_config
from tests.support.procs import FastProc, rows

APP, OP = "sumfail", "op"


def manager(database_url: str, redis_url: str, file_store_url: str, **config: object) -> JobManager:
    return JobManager(database_url=database_url, redis_url=redis_url, object_store_url=file_store_url,
                      config=make_config(**config))


@pytest.fixture
def blocked(database_url: str, redis_url: str, file_store_url: str) -> Iterator[tuple[JobManager, FastProc, str, Path]]:
    """A JobManager that gives up after 3 equal failures at once (no minimum span), and a 5-row batch whose
    output folder is blocked by a file."""
    jm = manager(database_url, redis_url, file_store_url, summary_giveup_after=3, summary_giveup_sec=0)
    proc = FastProc()
    jm.register_batch_processor(APP, OP, proc)
    bid = jm.batch_submit(APP, OP, {"k": 1}, rows(5, blobs={"out.txt": "a line\n"}))
    folder = Path(urlparse(batch_prefix(file_store_url, APP, OP, bid)).path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_text("not a folder")
    yield jm, proc, bid, folder
    jm.close()


def test_a_summary_failing_the_same_way_fails_the_batch_with_the_reason(
        blocked: tuple[JobManager, FastProc, str, Path]) -> None:
    jm, proc, bid, _ = blocked
    jm.engine.process_chunk(APP, OP)  # every row succeeds; the summary fails (1)
    s = jm.batch_status(bid)
    assert (s.status, s.nsuccess, s.error) == (BatchStatus.INPROG, 5, None)
    jm.cleanup()  # (2)
    assert jm.batch_status(bid).status is BatchStatus.INPROG
    jm.cleanup()  # (3): given up
    s = jm.batch_status(bid)
    assert s.status is BatchStatus.FAILED
    assert (s.nsuccess, s.nfailed, s.outputfiles) == (5, 0, {})
    assert s.error is not None and "summary failed 3 times" in s.error and "Error" in s.error, s.error
    done = jm.batch_done(bid)
    assert done.status is BatchStatus.FAILED and done.error == s.error
    assert done.rows is not None and [r.line for r in done.rows] == [1, 2, 3, 4, 5]  # results are kept
    assert all(r.status is BatchStatus.SUCCESS for r in done.rows)
    assert [d.status for d in proc.done] == [BatchStatus.FAILED]  # mark_done once, told why
    assert proc.done[0].error == s.error
    jm.cleanup()
    assert len(proc.done) == 1 and jm.batch_status(bid).status is BatchStatus.FAILED


def test_a_summary_failing_for_less_than_the_span_is_retried_and_then_written(
        database_url: str, redis_url: str, file_store_url: str,
        blocked: tuple[JobManager, FastProc, str, Path]) -> None:
    _, _, bid, folder = blocked
    # Same database and batch, but a manager that gives up only after an hour of equal failures.
    jm = manager(database_url, redis_url, file_store_url, summary_giveup_after=2, summary_giveup_sec=3600)
    proc = FastProc()
    jm.register_batch_processor(APP, OP, proc)
    try:
        jm.engine.process_chunk(APP, OP)
        for _ in range(4):  # an outage: the same failure, again and again
            jm.cleanup()
        assert jm.batch_status(bid).status is BatchStatus.INPROG
        folder.unlink()  # the outage ends
        jm.cleanup()
        s = jm.batch_status(bid)
        assert (s.status, s.nsuccess, s.error) == (BatchStatus.SUCCESS, 5, None)
        out = Path(urlparse(s.outputfiles["out.txt"]).path)
        assert out.read_text() == "a line\n" * 5
        assert [d.status for d in proc.done] == [BatchStatus.SUCCESS]
    finally:
        jm.close()
        if folder.is_dir():
            shutil.rmtree(folder)
