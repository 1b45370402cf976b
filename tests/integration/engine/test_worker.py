"""jm.run workers and their flow runs: SIGTERM, stop_when_idle, a batch's flow run (artifacts, task budget,
a failing init). (Aborts while a worker runs: tests/integration/abort.)"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

from alya import BatchStatus, JobManager
from alya.core import names
from tests.support.procs import Proc, drain, manager, read_log, rows, run_claim, spawn_worker, states, wait_until
from tests.support.services import store_sql

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_sigterm_finishes_the_row_releases_the_rest_and_exits_0(jm: JobManager, database_url: str,
                                                                 file_store_url: str, tmp_path: Path) -> None:
    log = str(tmp_path / "rows.log")
    jm.register_batch_processor("wrk", "term", Proc())
    bid = jm.batch_submit("wrk", "term", {"tag": "t"}, rows(120))
    worker = spawn_worker(database_url, file_store_url, "wrk", "term", log, "--sleep", "0.3", "--chunk", "30",
                          out=str(tmp_path / "worker.out"))
    try:
        # a row is running, more of its chunk are waiting
        wait_until(lambda: sum(1 for r in read_log(log) if r[0] == "end") >= 3, timeout=60, every=0.05,
                   what="the worker to have finished a few rows")
        held = {line for line, s in states(jm, bid).items() if s[0] == "inprog"}
        worker.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert worker.wait(30) == 0
        took = time.monotonic() - t0
    finally:
        if worker.poll() is None:
            worker.kill()
    entries = read_log(log)
    started = [int(r[2]) for r in entries if r[0] == "start"]
    ended = [int(r[2]) for r in entries if r[0] == "end"]
    assert sorted(started) == sorted(ended)  # every row it started, it finished
    st = states(jm, bid)
    assert not any(s[0] == "inprog" for s in st.values())  # nothing left held
    for line in ended:
        assert st[line][:2] == ("success", 1)
    released = held - set(ended)
    assert len(released) >= 10  # most of its claimed rows had not started
    assert all(st[line] == ("queued", 0, None) for line in st if line not in set(ended))  # attempts restored
    print(f"\nSIGTERM: exited 0 after {took:.2f}s; {len(ended)} rows finished, {len(released)} released")
    assert took < 20
    assert store_sql(jm.store, "SELECT count(*) FROM workers") == [(0,)]  # it said goodbye
    drain(jm, "wrk", "term")
    s = jm.batch_status(bid)
    assert (s.status, s.nsuccess) == (BatchStatus.SUCCESS, 120)


def test_run_when_idle_finishes_every_row_then_returns(jm: JobManager) -> None:
    """jm.run(stop_when_idle=True) returns once nothing is left to do, not before: every row final, each
    called once, counts and mark_done exact. Run again with nothing to do, it returns and changes nothing."""
    proc = Proc()
    jm.register_batch_processor("wrk", "idle", proc)
    bid = jm.batch_submit("wrk", "idle", {}, rows(150) + [(151, {"x": 151, "mode": "fail"})])
    jm.run(stop_when_idle=True)
    st = states(jm, bid)
    assert sorted(st) == list(range(1, 152))
    assert {st[n][:2] for n in range(1, 151)} == {("success", 1)} and st[151][:2] == ("failed", 1)
    s = jm.batch_status(bid)
    assert (s.status, s.nrows, s.nsuccess, s.nfailed, s.naborted, s.nqueued, s.ninprog) == (
        BatchStatus.FAILED, 151, 150, 1, 0, 0, 0)
    assert len(proc.calls) == 151 and set(proc.calls.values()) == {1}
    assert [(d.id, d.status, d.nsuccess, d.nfailed) for d in proc.done] == [(bid, BatchStatus.FAILED, 150, 1)]
    t0 = time.monotonic()
    jm.run(stop_when_idle=True)  # nothing left: it returns at once and changes nothing
    assert time.monotonic() - t0 < 10
    assert states(jm, bid) == st and sum(proc.calls.values()) == 151 and len(proc.done) == 1


def test_run_waits_for_rows_held_by_another_live_worker(database_url: str, redis_url: str,
                                                        file_store_url: str) -> None:
    """stop_when_idle counts rows in progress elsewhere as work: it returns only once they are done."""
    a = manager(database_url, redis_url, file_store_url)
    b = manager(database_url, redis_url, file_store_url)
    try:
        pa, pb = Proc(), Proc()
        a.register_batch_processor("wrk", "held", pa)
        b.register_batch_processor("wrk", "held", pb)
        bid = a.batch_submit("wrk", "held", {}, rows(10))
        b.engine.start()
        claimed = b.engine.producer.take("wrk", "held", "B", None)
        assert claimed is not None
        returned = threading.Event()
        t = threading.Thread(daemon=True, target=lambda: (a.run(stop_when_idle=True), returned.set()))
        t.start()
        time.sleep(3.0)
        assert not returned.is_set()
        results = run_claim(b, claimed)
        b.engine.completer.write(claimed, results, b.engine.log)
        assert b.engine.all_final(bid) and b.engine.summarise(bid)
        t.join(20)
        assert returned.is_set()
        assert a.batch_status(bid).status is BatchStatus.SUCCESS
        assert len(pb.done) == 1 and pa.done == []
        # while it waited there was nothing to claim: no empty flow runs every poll
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName

        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["alya-wrk-held"])))
        assert len(runs) <= 2, f"{len(runs)} flow runs while waiting"
    finally:
        a.close()
        b.close()


def test_batch_flow_run_artifacts_and_task_budget(database_url: str, redis_url: str, file_store_url: str) -> None:
    """A flow run for one batch (as a deployment would start it): bounded task runs, a progress artifact
    at 100 % and a summary table naming the batch and its output file."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId


    jm = manager(database_url, redis_url, file_store_url, batchchunk_nrows=10, flow_max_tasks=6,
                 task_seconds=0.2)
    try:
        jm.register_batch_processor("wrk", "flow", Proc())
        bid = jm.batch_submit("wrk", "flow", {}, [(n, {"x": n, "blobs": {"f.txt": str(n)}}) for n in range(1, 301)])
        fl = jm.flow("wrk", "flow")
        state = fl(batch_id=bid, return_state=True)
        result = state.result()
        assert result["tasks"] <= 6 and result["nrows"] > 0
        while jm.batch_status(bid).status is not BatchStatus.SUCCESS:  # budget used: a fresh run goes on
            result = fl(batch_id=bid)
            assert result["tasks"] <= 6
        run_id = state.state_details.flow_run_id
        with get_client(sync_client=True) as client:
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            assert 0 < len(tasks) <= 6
            pkey, skey = names.progress_artifact_key("wrk", "flow", bid), names.summary_artifact_key("wrk", "flow", bid)
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[pkey, skey])))
        progress = [a for a in arts if a.key == pkey]
        assert progress and max(float(a.data) for a in progress) == 100.0  # type: ignore[arg-type]
        tables = [a for a in arts if a.key == skey and bid in str(a.data)]  # one key per batch
        assert tables and any("success" in str(a.data) and "f.txt" in str(a.data) for a in tables)
    finally:
        jm.close()


def test_dispatched_flow_run_waits_out_a_failing_init(database_url: str, redis_url: str, file_store_url: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A flow run for one batch whose app's init() fails at first: it waits for the init retry instead of
    spinning through its task budget, and finishes the batch once init() works."""
    import alya.engine.producer
    from tests.support.procs import Init

    monkeypatch.setattr(alya.engine.producer, "INIT_RETRY_SEC", 0.3)
    jm = manager(database_url, redis_url, file_store_url)
    try:
        init = Init(fail_first=2)
        jm.register_initializer("wrk", init)
        jm.register_batch_processor("wrk", "initwait", Proc())
        bid = jm.batch_submit("wrk", "initwait", {}, rows(50))
        result = jm.flow("wrk", "initwait")(batch_id=bid)
        assert jm.batch_status(bid).status is BatchStatus.SUCCESS
        assert init.calls == 3
        assert result["tasks"] <= 20, result
    finally:
        jm.close()


def test_a_stop_right_after_starting_jm_run_ends_it(jm: JobManager, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop requested in the first instants of a jm.run thread, before its worker loop runs (here while
    it would migrate the database: that step is slowed to make the moment certain), ends that run at once
    instead of being forgotten; it is spent by that run, so the next jm.run works."""
    jm.register_batch_processor("wrk", "early", Proc())
    bid = jm.batch_submit("wrk", "early", {}, rows(20))
    monkeypatch.setattr(jm, "_migrate_if_asked", lambda: time.sleep(0.5))
    runner = threading.Thread(target=jm.run, daemon=True)  # not stop_when_idle: only the stop can end it
    runner.start()
    jm.engine.stopping.set()
    t0 = time.monotonic()
    runner.join(20)
    alive = runner.is_alive()
    if alive:  # the old behaviour: the stop was cleared and the worker ran on
        jm.engine.stopping.set()
        runner.join(30)
    assert not alive, "jm.run went on after a stop requested as it started"
    assert time.monotonic() - t0 < 5
    assert not jm.engine.stopping.is_set()  # spent by the run it ended
    jm.run(stop_when_idle=True)
    assert jm.batch_status(bid).status is BatchStatus.SUCCESS


def test_a_trickle_of_slow_queries_keeps_one_chunk_task_rolling(database_url: str, redis_url: str,
                                                                 file_store_url: str) -> None:
    """Chunk tasks scale with the work: slow queries one after another need one claim loop, and a run with
    ALYA_WORKER_THREADS=12 used to keep twelve tasks rolling for them (a task run with its states and events
    every task_seconds / 12). Each query is still answered; the type's runs make a fraction of the task runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId

    from tests.support.procs import QueryProc

    jm = manager(database_url, redis_url, file_store_url, worker_threads=12, task_seconds=0.25, linger_sec=0.5)
    runner = threading.Thread(target=jm.run, daemon=True)
    try:
        jm.register_slowquery_processor("wrk", "trickle", QueryProc())
        runner.start()
        ids = []
        t_end = time.monotonic() + 5.0
        while time.monotonic() < t_end:
            q = jm.slowquery_submit("wrk", "trickle", {}, {"q": len(ids)})
            wait_until(lambda q=q: jm.slowquery_done(q).status.is_final, timeout=10, every=0.002, what="a query")
            ids.append(q)
            time.sleep(0.02)
        assert all(jm.slowquery_done(q).status is BatchStatus.SUCCESS for q in ids)
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_filter=FlowFilter(
                name=FlowFilterName(any_=[names.flow_name("wrk", "trickle")])))
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in runs])))
        # (measured: 67 task runs before, 25 after)
        assert runs and len(tasks) <= 50, (len(ids), len(tasks))
        print(f"\n{len(ids)} queries, {len(tasks)} task runs")
    finally:
        jm.engine.stopping.set()
        runner.join(60)
        jm.close()
