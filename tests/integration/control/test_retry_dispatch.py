"""ALYA_DISPATCH=prefect: each retry round of a batch gets a flow run of its own (the first run's
idempotency key would give back the first run, long finished)."""

from __future__ import annotations

import uuid

from alya import BatchStatus, JobManager
from tests.support.dispatch import APP, OP, rows, runs_of
from tests.support.services import store_sql


def test_each_round_is_dispatched(djm: JobManager, deployment_id: uuid.UUID) -> None:
    bid = djm.batch_submit(APP, OP, {}, rows(3))
    (first,) = runs_of(bid)
    # the batch ran and two rows failed (as a worker would have stored it)
    store_sql(djm.store, "UPDATE batchrows SET doneat = now(), "
              "status = CASE WHEN line = 1 THEN 'success' ELSE 'failed' END::batch_status WHERE batch = %s", bid)
    store_sql(djm.store, "UPDATE batches SET status = 'failed', doneat = now(), nsuccess = 1, nfailed = 2, "
              "ver = ver + 1 WHERE id = %s", bid)
    assert djm.batch_retry_failed(bid) == 2
    runs = runs_of(bid)
    assert len(runs) == 2 and {r.idempotency_key for r in runs} == {f"alya:{bid}:release", f"alya:{bid}:retry:2"}
    second = next(r for r in runs if r.id != first.id)
    assert second.parameters == {"batch_id": bid} and second.deployment_id == deployment_id
    assert djm.batch_status(bid).status is BatchStatus.QUEUED
