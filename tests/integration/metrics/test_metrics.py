"""``jm.metrics()`` and the Prometheus endpoint on real PostgreSQL: queues per type, the process's finished
and failed rows, live workers, claim and write-back latency."""

from __future__ import annotations

import pytest

from alya import JobManager
from alya.batch.monitor import Monitor
from alya.core.metrics import TypeMetrics
from tests.support.procs import Proc, QueryProc, drain, rows

APP = "met"


@pytest.fixture
def procs(jm: JobManager) -> None:
    jm.register_batch_processor(APP, "work", Proc())
    jm.register_slowquery_processor(APP, "ask", QueryProc())


def test_the_snapshot(jm: JobManager, procs: None) -> None:
    fresh = Monitor(jm.services, reuse_sec=0)
    assert jm.metrics().types == []
    jm.batch_submit(APP, "work", {}, rows(40) + rows(10, start=41, mode="fail"))
    jm.batch_submit(APP, "work", {}, rows(5), wait=True)  # held: not queued
    jm.slowquery_submit(APP, "ask", {}, {"q": 1})
    m = fresh.snapshot()
    assert [(t.app, t.op, t.kind, t.queued, t.inprog, t.finished) for t in m.types] == [
        (APP, "ask", "Q", 1, 0, 0), (APP, "work", "B", 50, 0, 0)]
    assert all(t.oldest_queued_sec is not None and 0 <= t.oldest_queued_sec < 30 for t in m.types)
    assert m.claim.count == 0 and m.write.count == 0

    drain(jm, APP, "work")
    drain(jm, APP, "ask")
    m = fresh.snapshot()
    assert m.types == [TypeMetrics(APP, "ask", "Q", finished=1), TypeMetrics(APP, "work", "B", finished=50, failed=10)]
    assert m.live_workers == 1  # this process's engine beat
    assert m.claim.count >= 2 and m.write.count >= 2 and sum(m.write.counts) == m.write.count
    assert m.claim.mean_ms is not None and 0 < m.claim.mean_ms < 1000
    assert m.write.quantile_ms(0.5) is not None

