"""An abort with ALYA_DISPATCH=prefect, on the session's Prefect test harness (nothing serves the runs):
a Scheduled flow run is cancelled at once, a Running one is left to end by itself, then moved to Cancelling
and forced Cancelled after ALYA_CANCEL_TIMEOUT_SEC each, the sweeper does the same when the aborting process
is gone, and an abort with Prefect down still
aborts. (A served run cancelled by its runner: test_abort_e2e.py.)"""

from __future__ import annotations

import time
import uuid

from structlog.testing import capture_logs

from alya import BatchStatus, JobManager
from alya.core import names
from alya.prefect.dispatch import Dispatcher
from tests.support.config import make_config
from tests.support.dispatch import APP, OP, closed_port_url, rows, runs_of, state_of, wait_state


def test_abort_cancels_scheduled_run_at_once(djm: JobManager, deployment_id: uuid.UUID) -> None:
    bid = djm.batch_submit(APP, OP, {}, rows(5))
    (run,) = runs_of(bid)
    s = djm.batch_abort(bid)
    assert s.status is BatchStatus.ABORTED and s.naborted == 5
    assert state_of(run.id) == "CANCELLED"


def test_a_running_run_is_left_to_end_then_stopped_then_forced(djm: JobManager, deployment_id: uuid.UUID) -> None:
    """A run that has started is left to see the abort and end by itself; one still Running after
    ALYA_CANCEL_TIMEOUT_SEC (1 s here: hung, or its machine lost) moves to Cancelling so that its worker
    stops it, and nobody answering, is forced Cancelled after as long again, with the batch's summary
    table made for it through the API."""
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.states import Pending, Running

    bid = djm.batch_submit(APP, OP, {}, rows(5))
    (run,) = runs_of(bid)
    with get_client(sync_client=True) as client:  # as if a worker had picked it up (and then hung)
        client.set_flow_run_state(run.id, Pending(), force=True)
        client.set_flow_run_state(run.id, Running(), force=True)
    t0 = time.monotonic()
    djm.batch_abort(bid)
    assert state_of(run.id) == "RUNNING"  # its own to end
    assert wait_state(run.id, "CANCELLING") == "CANCELLING"
    assert time.monotonic() - t0 >= 1.0
    assert wait_state(run.id, "CANCELLED") == "CANCELLED"
    assert time.monotonic() - t0 >= 2.0
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[names.summary_artifact_key(APP, OP, bid)])))
    assert [a.flow_run_id for a in arts] == [run.id]
    assert json.loads(arts[0].data)[0]["naborted"] == 5  # type: ignore[arg-type]


def test_sweeper_stops_a_run_left_running_after_its_batch_was_aborted(djm: JobManager,
                                                                       deployment_id: uuid.UUID) -> None:
    """The aborting process was gone before its timer ran (``alya abort``): the sweeper moves a run still
    Running long after its batch was aborted to Cancelling."""
    from prefect.client.orchestration import get_client
    from prefect.states import Pending, Running

    bid = djm.batch_submit(APP, OP, {}, rows(1))
    (run,) = runs_of(bid)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run.id, Pending(), force=True)
        client.set_flow_run_state(run.id, Running(), force=True)
    gone = Dispatcher(make_config(dispatch="prefect", cancel_timeout_sec=600), djm.store)
    djm.dispatcher = None  # the aborting process leaves no timer behind
    djm.batch_abort(bid)
    gone.force_stuck_cancelling()
    assert state_of(run.id) == "RUNNING"  # aborted too recently: its own to end
    sweeper = Dispatcher(make_config(dispatch="prefect", cancel_timeout_sec=0), djm.store)
    sweeper.force_stuck_cancelling()
    assert state_of(run.id) in ("CANCELLING", "CANCELLED")


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


def test_abort_with_prefect_down_still_aborts(djm: JobManager, deployment_id: uuid.UUID) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    bid = djm.batch_submit(APP, OP, {}, rows(2))
    with temporary_settings(updates={PREFECT_API_URL: closed_port_url()}), capture_logs() as logs:
        s = djm.batch_abort(bid)
    assert s.status is BatchStatus.ABORTED and s.naborted == 2
    assert [e["batch"] for e in logs if e["event"] == "cancel_failed"] == [bid]
