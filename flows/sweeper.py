"""The sweeper flow ``alya-sweeper``, deployed on an every-minute schedule (``python -m flows.serve`` or
``prefect.yaml``). Each run is ``alya.recovery.cleanup(..., redispatch=True)``: rows of dead workers go back
to the queue, missed summaries are made, ``mark_done`` is called where it was missed, queued batches with no
live flow run get one; and, with ALYA_DISPATCH=prefect, flow runs stuck in Cancelling are forced Cancelled.
Every step changes only what is still wrong, so runs may overlap or repeat.

The example apps' processors are registered on the sweeper's JobManager so that it can call their
``mark_done``; register yours the same way in your own sweeper.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from alya import JobManager
from alya.recovery import cleanup
from flows import bank, mail, report
from flows.common import example_jobmanager

SWEEPER_FLOW = "alya-sweeper"


def sweep(jm: JobManager) -> dict[str, Any]:
    types = [(r.app, r.op) for r in jm.registry.batch_types()]
    rep = cleanup(jm, types=types, redispatch=True)
    forced = jm.dispatcher.force_stuck_cancelling() if jm.dispatcher is not None else 0
    return {"requeued": rep.requeued, "failed": rep.failed, "summarised": rep.summarised,
            "notified": rep.notified, "dispatched": rep.dispatched, "forced_cancelled": forced}


jm = example_jobmanager()
for _module in (bank, mail, report):
    _module.register(jm)


@flow(name=SWEEPER_FLOW, persist_result=False, log_prints=False, retries=0)
def sweeper_flow() -> dict[str, Any]:
    """Idempotent recovery of the alya database (see ``alya.recovery.cleanup``)."""
    from prefect import get_run_logger

    result = sweep(jm)
    get_run_logger().info("alya sweep: %s", result)
    return result
