"""``jm.metrics()`` and the Prometheus endpoint on real PostgreSQL: queues per type, the process's finished
and failed rows, live workers, claim and write-back latency; scraped over HTTP."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from alya import JobManager
from alya.api.prometheus import serve_metrics
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


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_the_prometheus_endpoint_is_scraped_over_http(jm: JobManager, procs: None) -> None:
    jm.batch_submit(APP, "work", {}, rows(30) + rows(3, start=31, mode="fail"))
    drain(jm, APP, "work")
    jm.batch_submit(APP, "work", {}, rows(7))
    server = serve_metrics(jm, 0, "127.0.0.1")
    try:
        got = scrape(server.server_port)
    finally:
        server.shutdown()
    work = (("app", APP), ("kind", "B"), ("op", "work"))
    assert got[("alya_database_up", ())] == 1
    assert got[("alya_rows_queued", work)] == 7 and got[("alya_rows_inprog", work)] == 0
    assert got[("alya_rows_finished_total", work)] == 33 and got[("alya_rows_failed_total", work)] == 3
    assert 0 <= got[("alya_oldest_queued_seconds", work)] < 30
    assert got[("alya_live_workers", ())] == 1
    assert got[("alya_claim_seconds_count", ())] >= 1
    assert got[("alya_write_back_seconds_bucket", (("le", "+Inf"),))] == got[("alya_write_back_seconds_count", ())]
    assert got[("alya_write_back_seconds_sum", ())] > 0


def test_an_unreachable_database_is_a_series_not_a_failed_scrape(redis_url: str, file_store_url: str) -> None:
    jm = JobManager(database_url="postgresql://postgres@127.0.0.1:9/none", redis_url=redis_url,
                    object_store_url=file_store_url)
    server = serve_metrics(jm, 0, "127.0.0.1")
    try:
        assert scrape(server.server_port) == {("alya_database_up", ()): 0}
    finally:
        server.shutdown()
        jm.close()
