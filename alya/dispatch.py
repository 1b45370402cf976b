"""The only module that uses the Prefect client: create flow runs of batch-type deployments when work is
queued, cancel them on abort, and find queued batches that no live flow run serves (for the sweeper).

Dispatch is an optimisation over polling, never the source of truth: a failed dispatch leaves the batch
queued in PostgreSQL, and the sweeper dispatches it on its next run.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from alya.batchflow import flow_name
from alya.logs import get_logger
from alya.settings import JobManagerConfig

if TYPE_CHECKING:
    from alya.client import JobManager

ACTIVE_STATES = ["SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING"]


def batch_tag(batch_id: str) -> str:
    return f"alya-batch:{batch_id}"


class Dispatcher:
    def __init__(self, config: JobManagerConfig) -> None:
        self.config = config
        self._deployments: dict[str, uuid.UUID] = {}

    def deployment_name(self, app: str, op: str) -> str:
        name = flow_name(app, op)
        return f"{name}/{self.config.deployment_name}"

    def _client(self) -> Any:
        from prefect.client.orchestration import get_client

        return get_client(sync_client=True)

    def start_batch(self, app: str, op: str, batch_id: str, key: str | None = None) -> str | None:
        """Create a flow run (Scheduled for now) of the batch type's deployment; returns its id."""
        from prefect.states import Scheduled

        log = get_logger().bind(app=app, op=op, batch=batch_id)
        name = self.deployment_name(app, op)
        try:
            with self._client() as client:
                dep_id = self._deployments.get(name)
                if dep_id is None:
                    dep_id = self._deployments[name] = client.read_deployment_by_name(name).id
                run = client.create_flow_run_from_deployment(
                    dep_id,
                    parameters={"batch_id": batch_id},
                    state=Scheduled(),
                    name=f"{app}-{op}-{batch_id}",
                    tags=["alya", f"alya-app:{app}", f"alya-op:{op}", batch_tag(batch_id)],
                    idempotency_key=key or f"alya:{batch_id}:{uuid.uuid4().hex}",
                )
        except Exception as exc:
            log.warning("dispatch_failed", deployment=name, error=f"{type(exc).__name__}: {exc}"[:300],
                        note="the batch stays queued; the sweeper will dispatch it")
            return None
        log.info("dispatched", deployment=name, flow_run=str(run.id))
        return str(run.id)

    def continue_batch_type(self, app: str, op: str, batch_id: str | None) -> None:
        """A flow run that used its task budget hands the rest of the work to a fresh run."""
        if batch_id:
            self.start_batch(app, op, batch_id)

    def active_runs(self, batch_id: str | None = None) -> list[Any]:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags

        tags = [batch_tag(batch_id)] if batch_id else ["alya"]
        with self._client() as client:
            return list(client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    tags=FlowRunFilterTags(all_=tags),
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=ACTIVE_STATES)),
                ),
                limit=200,
            ))

    def cancel_batch(self, batch_id: str) -> int:
        """Move the batch's live flow runs to Cancelling (Scheduled ones straight to Cancelled); runs still
        Cancelling after ``cancel_timeout_sec`` are forced Cancelled. Workers also stop on their own: they
        check the batch status in the database, so cancellation is a courtesy, not the mechanism."""
        from prefect.states import Cancelled, Cancelling

        log = get_logger().bind(batch=batch_id)
        try:
            runs = self.active_runs(batch_id)
            with self._client() as client:
                for run in runs:
                    scheduled = run.state is not None and run.state.type.value == "SCHEDULED"
                    client.set_flow_run_state(run.id, Cancelled() if scheduled else Cancelling(), force=True)
                    log.info("flow_run_cancelling", flow_run=str(run.id), scheduled=scheduled)
        except Exception as exc:
            log.warning("cancel_failed", error=f"{type(exc).__name__}: {exc}"[:300])
            return 0
        pending = [r.id for r in runs if not (r.state is not None and r.state.type.value == "SCHEDULED")]
        if pending and self.config.cancel_timeout_sec >= 0:
            threading.Thread(target=self._force_cancelled, args=(pending,), daemon=True).start()
        return len(runs)

    def _force_cancelled(self, run_ids: list[Any]) -> None:
        time.sleep(self.config.cancel_timeout_sec)
        self.force_stuck_cancelling(run_ids)

    def force_stuck_cancelling(self, run_ids: list[Any] | None = None) -> int:
        """Cancelling runs that nobody finished (a process worker with a Pending run) become Cancelled."""
        from prefect.states import Cancelled

        forced = 0
        try:
            with self._client() as client:
                if run_ids is None:
                    runs = [r for r in self.active_runs() if r.state and r.state.type.value == "CANCELLING"
                            and _age_sec(r.state.timestamp) > self.config.cancel_timeout_sec]
                else:
                    runs = [client.read_flow_run(i) for i in run_ids]
                for run in runs:
                    if run.state is not None and run.state.type.value == "CANCELLING":
                        client.set_flow_run_state(run.id, Cancelled(message="forced by alya"), force=True)
                        forced += 1
        except Exception as exc:
            get_logger().warning("force_cancel_failed", error=f"{type(exc).__name__}: {exc}"[:300])
        return forced

    def redispatch_idle(self, jm: JobManager) -> list[str]:
        """Queued/in-progress batches whose type has no live flow run get one (idempotent per minute)."""
        try:
            live = {(r.tags and next((t for t in r.tags if t.startswith("alya-batch:")), None)) for r in self.active_runs()}
        except Exception as exc:
            get_logger().warning("sweeper_prefect_unreachable", error=f"{type(exc).__name__}: {exc}"[:300])
            return []
        live_batches = {t.split(":", 1)[1] for t in live if t}
        with jm.store.tx() as tx:
            open_batches = tx.all("open_batches_all")
        minute = int(time.time() // 60)
        started = []
        for batch, app, op in open_batches:
            if str(batch) in live_batches:
                continue
            if self.start_batch(app, op, str(batch), key=f"alya:{batch}:sweep:{minute}"):
                started.append(str(batch))
        return started


def _age_sec(ts: Any) -> float:
    from datetime import datetime, timezone

    return (datetime.now(timezone.utc) - ts).total_seconds() if ts else 0.0
