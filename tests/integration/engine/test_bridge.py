"""Rows before their flow run (``alya.prefect.bridge``): a worker starts a type's rows at once while Prefect
creates the type's flow run, stops claiming when the run's body starts, and hands what it did to the run."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import psycopg2
import pytest

from alya import BatchStatus, JobManager
from alya.core import names
from alya.prefect import flows
from alya.prefect.bridge import Bridges
from tests.support.config import make_config
from tests.support.procs import Proc, rows, wait_until


def row_statuses(url: str, batch: str) -> dict[str, int]:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT status::text, count(*) FROM batchrows WHERE batch = %s GROUP BY 1", (batch,))
        return dict(cur.fetchall())


def test_a_bridge_runs_a_batch_and_hands_over_its_report(jm: JobManager) -> None:
    jm.register_batch_processor("brg", "op", Proc())
    b = jm.batch_submit("brg", "op", {}, rows(50))
    bridges = Bridges(jm.engine)
    token = bridges.start("brg", "op")
    assert bridges.serving("brg", "op")
    wait_until(lambda: jm.batch_status(b).status.is_final, timeout=30, what="the batch")
    bridges.join(10)
    reports = bridges.reports("brg", "op")
    assert sum(r["nrows"] for r in reports) == 50 and [s for r in reports for s in r["summarised"]] == [b]
    assert bridges.reports("brg", "op") == []  # handed over once
    bridges.detached("brg", "op", threading.Event())  # a stale run's token changes nothing
    assert bridges.serving("brg", "op")
    bridges.detached("brg", "op", token)
    assert not bridges.serving("brg", "op")
    jm.engine.shutdown()


def test_attaching_stops_the_claims_and_leaves_no_row_held(jm: JobManager, database_url: str) -> None:
    jm.register_batch_processor("brg", "op", Proc())
    b = jm.batch_submit("brg", "op", {}, [(n, {"x": n, "sleep": 0.01}) for n in range(1, 2001)])
    bridges = Bridges(jm.engine)
    bridges.start("brg", "op")
    wait_until(lambda: row_statuses(database_url, b).get("success", 0) >= 20, timeout=30, what="some rows")
    bridges.attached("brg", "op")  # the run's body started: claim no more
    bridges.join(30)
    assert not bridges.busy()
    counts = row_statuses(database_url, b)
    assert counts.get("inprog", 0) == 0 and counts["queued"] > 1000, counts  # its rows all written back
    assert sum(r["nrows"] for r in bridges.reports("brg", "op")) == counts["success"]
    jm.engine.shutdown()


@pytest.mark.parametrize(("threads", "loops"), [(1, 1), (3, 2)])
def test_a_bridge_claims_with_two_loops(database_url: str, redis_url: str, file_store_url: str,
                                        monkeypatch: pytest.MonkeyPatch, threads: int, loops: int) -> None:
    """With one claim loop, a claim waited for the write-back before it: the first half second of a no-op
    batch ran at half the rate of the rest (bench noop). A bridge runs two (never more than
    ALYA_WORKER_THREADS: more only raced for the pool's connections while the run starts) and hands over
    every loop's report."""
    jm = JobManager(database_url=database_url, redis_url=redis_url, object_store_url=file_store_url,
                    config=make_config(worker_threads=threads))
    seen: set[str] = set()
    real = jm.engine.work

    def work(*args: Any, **kwargs: Any) -> Any:
        seen.add(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(jm.engine, "work", work)
    try:
        jm.register_batch_processor("brg", "loops", Proc())
        b = jm.batch_submit("brg", "loops", {}, [(n, {"x": n, "sleep": 0.002}) for n in range(1, 601)])
        bridges = Bridges(jm.engine)
        bridges.start("brg", "loops")
        wait_until(lambda: jm.batch_status(b).status.is_final, timeout=30, what="the batch")
        bridges.attached("brg", "loops")
        bridges.join(10)
        assert len(seen) == loops, seen
        reports = bridges.reports("brg", "loops")
        assert sum(r["nrows"] for r in reports) == 600
        assert [s for r in reports for s in r["summarised"]] == [b]
        assert jm.batch_status(b).nsuccess == 600
    finally:
        jm.engine.shutdown()
        jm.close()


@pytest.mark.usefixtures("prefect_harness")
def test_rows_do_not_wait_for_a_slow_flow_run_and_the_run_still_shows_them(jm: JobManager,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefect takes 3 s to start the type's run (seconds are what a busy Prefect server costs): the batch,
    and another submitted after it, are final long before, and the run, once up, still makes the summary
    artifact and counts their rows."""
    real = flows.run_batch
    started: list[float] = []
    results: list[dict[str, Any]] = []

    def slow_run_batch(*args: Any, **kwargs: Any) -> dict[str, Any]:
        time.sleep(3.0)
        started.append(time.monotonic())
        result = real(*args, **kwargs)
        results.append(result)
        return result

    monkeypatch.setattr(flows, "run_batch", slow_run_batch)
    jm.register_batch_processor("brg", "op", Proc())
    runner = threading.Thread(target=jm.run, daemon=True)
    runner.start()
    try:
        time.sleep(1.0)  # the worker is up and idle (no type has work)
        t0 = time.monotonic()
        b = jm.batch_submit("brg", "op", {}, rows(30))
        wait_until(lambda: jm.batch_status(b).status.is_final, timeout=30, every=0.005, what="the batch")
        took = time.monotonic() - t0
        assert jm.batch_status(b).status is BatchStatus.SUCCESS
        assert took < 2.0, took  # not the 3 s the run took to start
        # A second batch while the run is still starting: the bridge lingers for it (it used to end when
        # idle, and this batch waited for the run)
        t1 = time.monotonic()
        b2 = jm.batch_submit("brg", "op", {}, rows(20))
        wait_until(lambda: jm.batch_status(b2).status.is_final, timeout=30, every=0.005, what="the second batch")
        took2 = time.monotonic() - t1
        assert not started and took2 < 1.0, (took2, started)  # final before the run's body began
        wait_until(lambda: results, timeout=60, what="the flow run")
        assert results[0]["nrows"] == 50 and {b, b2} <= set(results[0]["summarised"])  # the bridge's rows, counted
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        with get_client(sync_client=True) as client:
            found = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[names.summary_artifact_key("brg", "op", b)])))
        assert len(found) == 1 and found[0].flow_run_id is not None
        assert json.loads(found[0].data)[0]["nsuccess"] == 30  # type: ignore[arg-type]
    finally:
        jm.engine.stopping.set()
        runner.join(60)
