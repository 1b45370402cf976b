"""Polling shows progress: the cached summary of an open batch expires within OPEN_TTL_SEC by itself, even
though ALYA_BATCHSTATUS_CACHEDUR_SEC is a minute; workers do not invalidate it per write-back (each
invalidation cost a recount of the whole batch), only on status changes."""

from __future__ import annotations

import redis

from alya import BatchStatus, JobManager
from alya.batch.status import OPEN_TTL_SEC
from alya.core.names import summary_key
from tests.support.procs import FastProc, rows


def test_counts_refresh_while_running(jm: JobManager, redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    jm.register_batch_processor("prog", "op", FastProc())
    bid = jm.batch_submit("prog", "op", {}, rows(300))
    assert jm.batch_status(bid).nqueued == 300  # cached, for at most OPEN_TTL_SEC while open
    keys = [k for k in r.scan_iter(match=f"*{summary_key(bid)}*")]
    assert keys and all(0 < r.ttl(k) <= OPEN_TTL_SEC for k in keys)
    assert OPEN_TTL_SEC <= 10

    jm.engine.process_chunk("prog", "op")  # 100 rows (chunk size in tests): queued -> inprog invalidates
    s = jm.batch_status(bid)
    assert (s.status, s.nsuccess, s.nqueued) == (BatchStatus.INPROG, 100, 200)

    jm.engine.process_chunk("prog", "op")  # a write-back leaves the cached counts as they were...
    assert jm.batch_status(bid).nsuccess == 100
    for k in keys:
        assert 0 < r.ttl(k) <= OPEN_TTL_SEC
        r.delete(k)  # ...until they expire (as OPEN_TTL_SEC passing would)
    assert jm.batch_status(bid).nsuccess == 200
    jm.engine.process_chunk("prog", "op")  # the last rows: the summary caches the final status at once
    s = jm.batch_status(bid)
    assert s.status is BatchStatus.SUCCESS and s.nsuccess == 300


def test_one_kind_per_batch_type(jm: JobManager) -> None:
    import pytest

    from alya import InvalidInput
    from tests.support.procs import QueryProc

    jm.register_batch_processor("prog", "op", FastProc())
    jm.register_batch_processor("prog", "op", FastProc())  # replacing with the same kind is fine
    with pytest.raises(InvalidInput):
        jm.register_slowquery_processor("prog", "OP", QueryProc())
