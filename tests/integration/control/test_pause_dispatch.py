"""Pause and not_before with ALYA_DISPATCH=prefect, on the session's Prefect test harness (nothing serves the
runs): the sweeper dispatches no run for a paused batch, nor for one whose not_before has not come; a resume
dispatches one (once)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from alya import JobManager
from tests.support.dispatch import APP, OP, rows, runs_of


def _end(run_id: uuid.UUID) -> None:
    """As if the run had ended (it found nothing to claim)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Completed

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Completed(), force=True)


def test_resume_dispatches_a_run_and_the_sweeper_leaves_paused_and_later_batches_alone(
        djm: JobManager, deployment_id: uuid.UUID) -> None:
    bid = djm.batch_submit(APP, OP, {}, rows(5))
    (run,) = runs_of(bid)
    djm.batch_pause(bid)
    _end(run.id)
    assert djm.cleanup(redispatch=True).dispatched == []  # paused: no run for it
    djm.batch_resume(bid)
    assert len(runs_of(bid)) == 2
    djm.batch_resume(bid)  # not paused: nothing happens
    assert len(runs_of(bid)) == 2

    later = djm.batch_submit(APP, OP, {}, rows(3), not_before=datetime.now(UTC) + timedelta(hours=1))
    for r in runs_of(later):
        _end(r.id)
    dispatched = djm.cleanup(redispatch=True).dispatched
    assert later not in dispatched
