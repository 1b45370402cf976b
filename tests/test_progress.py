"""Polling shows progress: the cached counts of a running batch are refreshed by the workers (at most
every few seconds per batch), even though ALYA_BATCHSTATUS_CACHEDUR_SEC is a minute."""

from __future__ import annotations

from alya import BatchStatus, JobManager
from alya.engine import PROGRESS_REFRESH_SEC
from tests.procs import FastProc, rows


def test_counts_refresh_while_running(jm: JobManager) -> None:
    jm.register_batch_processor("prog", "op", FastProc())
    bid = jm.batch_submit("prog", "op", {}, rows(300))
    assert jm.batch_status(bid).nqueued == 300  # now cached for a minute

    jm.engine.process_chunk("prog", "op")  # 100 rows (chunk size in tests), first refresh of this batch
    s = jm.batch_status(bid)
    assert (s.status, s.nsuccess, s.nqueued) == (BatchStatus.INPROG, 100, 200)

    jm.engine.process_chunk("prog", "op")  # within PROGRESS_REFRESH_SEC: the cache may stay as it was
    assert jm.batch_status(bid).nsuccess in (100, 200)
    jm.engine._progress_at.clear()  # as if PROGRESS_REFRESH_SEC had passed
    jm.engine.process_chunk("prog", "op")
    assert PROGRESS_REFRESH_SEC <= 10
    s = jm.batch_status(bid)
    assert s.status is BatchStatus.SUCCESS and s.nsuccess == 300


def test_one_kind_per_batch_type(jm: JobManager) -> None:
    import pytest

    from alya import InvalidInput
    from tests.procs import QueryProc

    jm.register_batch_processor("prog", "op", FastProc())
    jm.register_batch_processor("prog", "op", FastProc())  # replacing with the same kind is fine
    with pytest.raises(InvalidInput):
        jm.register_slowquery_processor("prog", "OP", QueryProc())
