"""ALYA_DISPATCH=prefect against the session's Prefect test harness: what the Dispatcher creates (flow runs of
the batch type's deployment, not waited for, not subflows, idempotent, tagged, named after the batch), what
abort does to them, and what happens when Prefect is unreachable or the deployment is missing. Nothing
serves these deployments here, so dispatched runs stay Scheduled; tests/test_prefect_e2e.py runs them."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from alya import BatchInput, BatchStatus, JobManager
from alya.prefect.dispatch import Dispatcher
from tests.conftest import make_config

APP, OP = "disp", "work"


class Noop:
    def do_batch_job(self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]) -> Any:
        from alya import BatchJobResult

        return BatchJobResult(status=BatchStatus.SUCCESS)

    def mark_done(self, initblock: Any, context: dict[str, Any], details: Any) -> None:
        pass


def rows(n: int) -> list[BatchInput]:
    return [BatchInput(i, {"i": i}) for i in range(1, n + 1)]


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/api"


@pytest.fixture
def djm(database_url: str, redis_url: str, file_store_url: str, prefect_harness: None) -> Iterator[JobManager]:
    manager = JobManager(database_url=database_url, redis_url=redis_url, object_store_url=file_store_url,
                         config=make_config(dispatch="prefect", cancel_timeout_sec=1.0))
    manager.register_batch_processor(APP, OP, Noop())
    yield manager
    manager.close()


@pytest.fixture
def deployment_id(djm: JobManager) -> uuid.UUID:
    """The batch type's deployment ``alya-disp-work/alya`` (applied, not served)."""
    return djm.flow(APP, OP).to_deployment(name=djm.config.deployment_name).apply()  # type: ignore[no-any-return]


def runs_of(batch_id: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as client:
        return list(client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"alya-batch:{batch_id}"]))))


def state_of(run_id: Any) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
    return str(run.state.type.value) if run.state else "NONE"


def wait_state(run_id: Any, want: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while (got := state_of(run_id)) != want and time.monotonic() < deadline:
        time.sleep(0.2)
    return got


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
    assert len(runs_of(held)) == 1

    other = djm.batch_submit(APP, OP, {}, rows(2), wait=True)
    assert runs_of(other) == []
    assert djm.wait_off(other) == 2
    (run,) = runs_of(other)
    assert run.idempotency_key == f"alya:{other}:release" and run.parameters == {"batch_id": other}


def test_slow_query_is_dispatched(djm: JobManager, deployment_id: uuid.UUID) -> None:
    req = djm.slowquery_submit(APP, OP, {}, {"q": 1})
    assert len(runs_of(req)) == 1


def test_abort_cancels_scheduled_run_at_once(djm: JobManager, deployment_id: uuid.UUID) -> None:
    bid = djm.batch_submit(APP, OP, {}, rows(5))
    (run,) = runs_of(bid)
    s = djm.batch_abort(bid)
    assert s.status is BatchStatus.ABORTED and s.naborted == 5
    assert state_of(run.id) == "CANCELLED"


def test_abort_moves_running_run_to_cancelling_then_forces_it(djm: JobManager, deployment_id: uuid.UUID) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Pending, Running

    bid = djm.batch_submit(APP, OP, {}, rows(5))
    (run,) = runs_of(bid)
    with get_client(sync_client=True) as client:  # as if a worker had picked it up (and then hung)
        client.set_flow_run_state(run.id, Pending(), force=True)
        client.set_flow_run_state(run.id, Running(), force=True)
    t0 = time.monotonic()
    djm.batch_abort(bid)
    assert state_of(run.id) == "CANCELLING"
    # nobody answers the cancellation: after cancel_timeout_sec (1 s here) it is forced Cancelled
    assert wait_state(run.id, "CANCELLED") == "CANCELLED"
    assert time.monotonic() - t0 >= 1.0


def test_sweeper_forces_old_cancelling_runs(djm: JobManager, deployment_id: uuid.UUID) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling, Pending

    bid = djm.batch_submit(APP, OP, {}, rows(1))
    (run,) = runs_of(bid)
    with get_client(sync_client=True) as client:  # a Pending run that nobody will ever cancel (process worker)
        client.set_flow_run_state(run.id, Pending(), force=True)
        client.set_flow_run_state(run.id, Cancelling(), force=True)
    young = Dispatcher(make_config(dispatch="prefect", cancel_timeout_sec=600), djm.store)
    young.force_stuck_cancelling()
    assert state_of(run.id) == "CANCELLING"  # not stuck for long enough yet
    old = Dispatcher(make_config(dispatch="prefect", cancel_timeout_sec=0), djm.store)
    assert old.force_stuck_cancelling() >= 1
    assert state_of(run.id) == "CANCELLED"


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
    assert run.idempotency_key.startswith(f"alya:{bid}:sweep:")
    again = djm.cleanup(redispatch=True)
    assert bid not in again.dispatched and len(runs_of(bid)) == 1


def test_missing_deployment_is_logged_and_batch_kept(djm: JobManager, prefect_harness: None) -> None:
    djm.register_batch_processor("nodeploy", "x", Noop())
    with capture_logs() as logs:
        bid = djm.batch_submit("nodeploy", "x", {}, rows(1))
    (failed,) = [e for e in logs if e["event"] == "dispatch_failed"]
    assert failed["deployment"] == "alya-nodeploy-x/alya" and "no such deployment" in failed["reason"]
    assert djm.batch_status(bid).status is BatchStatus.QUEUED and runs_of(bid) == []
    # the sweeper looks the missing deployment up once, and says so once, however many batches wait for it
    djm.batch_submit("nodeploy", "x", {}, rows(2))
    with capture_logs() as logs:
        report = djm.cleanup(redispatch=True)
    assert report.dispatched == []
    (missing,) = [e for e in logs if e["event"] == "sweeper_no_deployment"]
    assert missing["deployment"] == "alya-nodeploy-x/alya" and missing["open_batches"] == 2
    assert not [e for e in logs if e["event"] == "dispatch_failed"]


def test_abort_with_prefect_down_still_aborts(djm: JobManager, deployment_id: uuid.UUID) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    bid = djm.batch_submit(APP, OP, {}, rows(2))
    with temporary_settings(updates={PREFECT_API_URL: closed_port_url()}), capture_logs() as logs:
        s = djm.batch_abort(bid)
    assert s.status is BatchStatus.ABORTED and s.naborted == 2
    assert [e["batch"] for e in logs if e["event"] == "cancel_failed"] == [bid]


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
    sweeper = Dispatcher(make_config(dispatch="prefect", recovery_sec=1), djm.store)
    assert sweeper.redispatch_idle() == []  # Running for less than ALYA_RECOVERY_SEC: let it be
    time.sleep(1.2)
    assert sweeper.redispatch_idle() == [lost]
    assert len(runs_of(lost)) == 2 and len(runs_of(busy)) == 1
