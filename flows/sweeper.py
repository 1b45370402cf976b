"""The sweeper flow ``alya-sweeper``, deployed on a schedule of every 5 minutes (``python -m flows.serve`` or
``prefect.yaml``). Each run is ``jm.cleanup(redispatch=True)``: rows of dead workers go back to the queue,
missed summaries are made, ``mark_done`` is called where it was missed, queued batches with no live flow
run get one; and, with ALYA_DISPATCH=prefect, flow runs stuck in Cancelling are forced Cancelled. Every
step changes only what is still wrong, so runs may overlap or repeat.

The example apps' processors are registered on the sweeper's JobManager (the examples' shared one) so
that it can call their ``mark_done``; register yours the same way in your own sweeper.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from alya import JobManager
from alya.core.names import SWEEPER_FLOW
from flows import bank, mail, report
from flows.common import example_jobmanager

jm = example_jobmanager()  # the one the example modules registered their processors on


def sweep(jm: JobManager) -> dict[str, Any]:
    rep = jm.cleanup(redispatch=True)
    forced = jm.dispatcher.force_stuck_cancelling() if jm.dispatcher is not None else 0
    return {"requeued": rep.requeued, "failed": rep.failed, "summarised": rep.summarised,
            "notified": rep.notified, "dispatched": rep.dispatched, "forced_cancelled": forced,
            "purged": rep.purged}


@flow(name=SWEEPER_FLOW, persist_result=False, log_prints=False, retries=0)
def sweeper_flow() -> dict[str, Any]:
    """Idempotent recovery of the alya database (see ``alya.engine.maintenance.cleanup``)."""
    from prefect import get_run_logger

    assert {bank.APP, mail.APP, report.APP} <= {r.app for r in jm.registry.batch_types()}
    result = sweep(jm)
    get_run_logger().info("alya sweep: %s", result)
    return result
