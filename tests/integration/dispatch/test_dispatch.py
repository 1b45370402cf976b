"""ALYA_DISPATCH=prefect against the session's Prefect test harness: what the Dispatcher creates (flow runs of
the batch type's deployment, not waited for, not subflows, idempotent, tagged, named after the batch), and
what happens when Prefect is unreachable, the deployment is missing or a run is lost. Nothing serves these
deployments here, so dispatched runs stay Scheduled; test_prefect_e2e.py runs them. (What abort does to
the runs: tests/integration/abort/test_abort_dispatch.py.)"""

from __future__ import annotations

import time
import uuid
from typing import Any

from structlog.testing import capture_logs

from alya import BatchInput, BatchStatus, JobManager
from alya.prefect.dispatch import Dispatcher
from tests.support.config import make_config
from tests.support.dispatch import APP, OP, Noop, closed_port_url, rows, runs_of, state_of


def check_run(run: Any, bid: str, deployment_id: uuid.UUID) -> None:
    """A flow run dispatched for the batch (or slow query) ``bid`` of disp/work: a run of the type's
    deployment for this batch alone, named and tagged after it, not a subflow, and Scheduled (nothing
    serves it here). Its idempotency key says why it was made; the caller checks it."""
    assert run.deployment_id == deployment_id
    assert run.parameters == {"batch_id": bid}
    assert run.name == f"{APP}-{OP}-{bid}"
    assert {"alya", f"alya-app:{APP}", f"alya-op:{OP}", f"alya-batch:{bid}"} <= set(run.tags)
    assert run.parent_task_run_id is None
    assert run.state is not None and run.state.type.value == "SCHEDULED"


def test_dispatch_none_has_no_dispatcher(jm: JobManager) -> None:
    assert jm.config.dispatch == "none" and jm.dispatcher is None


def test_submit_creates_one_flow_run_and_does_not_wait(djm: JobManager, deployment_id: uuid.UUID) -> None:
    t0 = time.monotonic()
    bid = djm.batch_submit(APP, OP, {"u": 1}, rows(3))
    elapsed = time.monotonic() - t0
    (run,) = runs_of(bid)
    assert run.deployment_id == deployment_id
    assert run.parameters == {"batch_id": bid}
    assert run.name == f"{APP}-{OP}-{bid}"
    assert {"alya", f"alya-app:{APP}", f"alya-op:{OP}", f"alya-batch:{bid}"} <= set(run.tags)
    assert run.idempotency_key == f"alya:{bid}:release"
    assert run.parent_task_run_id is None  # not a subflow of anything
    assert run.state.type.value == "SCHEDULED"
    assert elapsed < 5, f"submit took {elapsed:.1f}s: it must not wait for the flow run"
    assert djm.batch_status(bid).status is BatchStatus.QUEUED
    # the same dispatch again (a retry) gives the same run: the idempotency key is deterministic
    assert djm.dispatcher is not None
    assert djm.dispatcher.start_batch(APP, OP, bid) == str(run.id)
    assert len(runs_of(bid)) == 1


def test_wait_holds_dispatch_until_append_or_wait_off(djm: JobManager, deployment_id: uuid.UUID) -> None:
    held = djm.batch_submit(APP, OP, {}, rows(2), wait=True)
    djm.batch_append(held, [BatchInput(3, {})], wait=True)
    assert runs_of(held) == []
    assert djm.batch_append(held, [BatchInput(4, {})], wait=False) == 4
    (run,) = runs_of(held)
    check_run(run, held, deployment_id)
    assert run.idempotency_key == f"alya:{held}:release"
    assert djm.batch_status(held).status is BatchStatus.QUEUED and djm.batch_status(held).nrows == 4

    other = djm.batch_submit(APP, OP, {}, rows(2), wait=True)
    assert runs_of(other) == []
    assert djm.wait_off(other) == 2
    (run,) = runs_of(other)
    check_run(run, other, deployment_id)
    assert run.idempotency_key == f"alya:{other}:release"


def test_slow_query_is_dispatched(djm: JobManager, deployment_id: uuid.UUID) -> None:
    req = djm.slowquery_submit(APP, OP, {}, {"q": 1})
    (run,) = runs_of(req)
    check_run(run, req, deployment_id)  # the batch type's deployment serves its slow queries too
    assert run.idempotency_key == f"alya:{req}:release"
    assert djm.slowquery_done(req).status is BatchStatus.QUEUED  # dispatched, not waited for


def test_unreachable_prefect_stores_the_batch_and_the_sweeper_dispatches_it(
        djm: JobManager, deployment_id: uuid.UUID) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: closed_port_url()}), capture_logs() as logs:
        t0 = time.monotonic()
        bid = djm.batch_submit(APP, OP, {}, rows(3))
        elapsed = time.monotonic() - t0
    (failed,) = [e for e in logs if e["event"] == "dispatch_failed"]
    assert failed["log_level"] == "warning" and failed["batch"] == bid and "sweeper" in failed["note"]
    assert elapsed < 10, f"submit took {elapsed:.1f}s with Prefect down"
    assert djm.batch_status(bid).status is BatchStatus.QUEUED and djm.batch_status(bid).nrows == 3
    assert runs_of(bid) == []
    # the sweeper's cleanup finds the queued batch without a live flow run and dispatches it, once
    report = djm.cleanup(redispatch=True)
    assert bid in report.dispatched
    (run,) = runs_of(bid)
    check_run(run, bid, deployment_id)
    assert run.idempotency_key.startswith(f"alya:{bid}:sweep:")
    again = djm.cleanup(redispatch=True)
    assert bid not in again.dispatched and len(runs_of(bid)) == 1


def test_missing_deployment_is_logged_and_batch_kept(djm: JobManager, prefect_harness: None) -> None:
    djm.register_batch_processor("nodeploy", "x", Noop())
    with capture_logs() as logs:
        bid = djm.batch_submit("nodeploy", "x", {}, rows(1))
    (failed,) = [e for e in logs if e["event"] == "dispatch_failed"]
    assert failed["deployment"] == "alya-nodeploy-x/nodeploy-x" and "no such deployment" in failed["reason"]
    assert djm.batch_status(bid).status is BatchStatus.QUEUED and runs_of(bid) == []
    # the sweeper looks the missing deployment up once, and says so once, however many batches wait for it
    djm.batch_submit("nodeploy", "x", {}, rows(2))
    with capture_logs() as logs:
        report = djm.cleanup(redispatch=True)
    assert report.dispatched == []
    (missing,) = [e for e in logs if e["event"] == "sweeper_no_deployment"]
    assert missing["deployment"] == "alya-nodeploy-x/nodeploy-x" and missing["open_batches"] == 2
    assert not [e for e in logs if e["event"] == "dispatch_failed"]


def test_sweeper_redispatches_a_batch_whose_running_run_is_lost(djm: JobManager, deployment_id: uuid.UUID) -> None:
    """A dispatched run whose machine was lost stays Running in Prefect; once its rows are back in the
    queue (recovery) and no live worker holds any, the sweeper gives the batch a fresh run; a batch whose
    rows a live worker holds is left alone."""
    from prefect.client.orchestration import get_client
    from prefect.states import Pending, Running

    lost = djm.batch_submit(APP, OP, {}, rows(3))
    busy = djm.batch_submit(APP, OP, {}, rows(3))
    with get_client(sync_client=True) as client:
        for bid in (lost, busy):
            (run,) = runs_of(bid)
            client.set_flow_run_state(run.id, Pending(), force=True)
            client.set_flow_run_state(run.id, Running(), force=True)
    djm.engine.start()
    held = djm.engine.producer.take(APP, OP, "B", busy)  # a live worker holds busy's rows
    assert held is not None
    sweeper = Dispatcher(make_config(dispatch="prefect", recovery_sec=3), djm.store)  # 3 s: room for a loaded CI
    assert sweeper.redispatch_idle() == []  # Running for less than ALYA_RECOVERY_SEC: let it be
    time.sleep(3.2)
    assert sweeper.redispatch_idle() == [lost]
    old, fresh = sorted(runs_of(lost), key=lambda r: r.created)
    assert state_of(old.id) == "RUNNING" and old.idempotency_key == f"alya:{lost}:release"  # left as it is
    check_run(fresh, lost, deployment_id)
    assert fresh.idempotency_key.startswith(f"alya:{lost}:sweep:")
    (kept,) = runs_of(busy)
    assert state_of(kept.id) == "RUNNING" and kept.idempotency_key == f"alya:{busy}:release"


def test_a_big_batch_gets_several_runs_and_an_abort_cancels_them_all(
        database_url: str, redis_url: str, file_store_url: str, djm: JobManager, deployment_id: uuid.UUID) -> None:
    """ALYA_DISPATCH_ROWS_PER_RUN / ALYA_DISPATCH_MAX_RUNS: one run per that many rows, capped; each with its
    own idempotency key (a retried release makes none twice), all serving the whole batch; an abort
    cancels every one of them."""
    jm = JobManager(database_url=database_url, redis_url=redis_url, object_store_url=file_store_url,
                    config=make_config(dispatch="prefect", dispatch_rows_per_run=10, dispatch_max_runs=3))
    try:
        assert jm.dispatcher is not None
        assert [jm.dispatcher.runs_for(n) for n in (0, 1, 10, 11, 25, 1000)] == [1, 1, 1, 2, 3, 3]
        small = jm.batch_submit(APP, OP, {}, rows(10))
        assert len(runs_of(small)) == 1
        big = jm.batch_submit(APP, OP, {}, rows(25))
        runs = runs_of(big)
        assert len(runs) == 3
        for run in runs:
            assert run.deployment_id == deployment_id and run.parameters == {"batch_id": big}
            assert f"alya-batch:{big}" in run.tags and run.state.type.value == "SCHEDULED"
        assert {r.idempotency_key for r in runs} == {f"alya:{big}:release", f"alya:{big}:release:1",
                                                     f"alya:{big}:release:2"}
        assert {r.name for r in runs} == {f"{APP}-{OP}-{big}", f"{APP}-{OP}-{big}-2", f"{APP}-{OP}-{big}-3"}
        assert sorted(jm.dispatcher.release_batch(APP, OP, big, 25)) == sorted(str(r.id) for r in runs)
        assert len(runs_of(big)) == 3  # the retry made none
        jm.batch_abort(big)
        states = {r.id: r.state for r in runs_of(big)}
        assert len(states) == 3 and all(s.type.value == "CANCELLED" and s.name == "Aborted" for s in states.values())
        assert runs_of(small)[0].state.type.value == "SCHEDULED"  # another batch's run untouched
    finally:
        jm.close()
