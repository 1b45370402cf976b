"""Dispatch through the Prefect client: create flow runs of batch-type deployments when work is queued,
cancel them on abort, and find queued batches that no live flow run serves (for the sweeper). Artifacts and
run logs go through Prefect's own helpers instead (``alya.prefect.flows``, ``alya.prefect.intake``,
``alya.prefect.logging``); the demo reads its flow runs with the client too (``alya.cli.demo_prefect``).

Dispatch is an optimisation over polling, never the source of truth: a failed dispatch leaves the batch
queued in PostgreSQL (and says so in the log), and the sweeper dispatches it on its next run.

A flow run is created with the Prefect client, not ``run_deployment(..., timeout=0, as_subflow=False)``:
that does the same two calls, but through a client with Prefect's default 60 s request timeout and a
deployment look-up per call, where a submit must never hang on a sick Prefect server (``API_TIMEOUT_SEC``)
and the deployment id is cached. The run is never a subflow of the caller, and nothing waits for it. Its
idempotency key (``alya.core.names.dispatch_key``) is deterministic per dispatch event, so a retried call never
makes a second run:

- ``alya:{batch}:release``: the batch became queued (submit, append with wait=False, wait-off; a batch
  becomes queued exactly once); ``alya:{batch}:release:{k}`` for its k-th further run: a batch gets one run
  per ``ALYA_DISPATCH_ROWS_PER_RUN`` rows, at most ``ALYA_DISPATCH_MAX_RUNS`` (:meth:`Dispatcher.runs_for`),
  so that the work pool's machines share a big batch (each run claims its chunks like any worker);
- ``alya:{batch}:continue:{flow_run}``: a run that used its task budget hands over to a fresh one;
- ``alya:{batch}:sweep:{minute}``: the sweeper's re-dispatch of a batch with no live flow run.
"""

from __future__ import annotations

import contextvars
import threading
import time
import uuid
from datetime import UTC
from typing import Any

from alya.batch.status import record_summary
from alya.core import names
from alya.core.errors import describe
from alya.core.logs import get_logger
from alya.core.models import BatchStatus
from alya.core.settings import JobManagerConfig
from alya.db.store import Store
from alya.prefect.artifacts import create_summary
from alya.prefect.states import ABORTED_NAME

ACTIVE_STATES = ["SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING"]
API_TIMEOUT_SEC = 10.0  # one Prefect API call; submit must never hang on a sick Prefect server
PAGE = 200


def _state_type(run: Any) -> str | None:
    return None if run.state is None else str(run.state.type.value)


class Dispatcher:
    """Flow runs of batch types: created when work is queued, cancelled on abort, re-created by the sweeper
    for queued batches that no live run serves."""

    def __init__(self, config: JobManagerConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self._deployments: dict[str, uuid.UUID] = {}
        self._lock = threading.Lock()

    def deployment_name(self, app: str, op: str) -> str:
        return names.deployment_name(app, op, self.config.deployment_name)

    def _client(self) -> Any:
        from prefect.client.orchestration import get_client

        return get_client(httpx_settings={"timeout": API_TIMEOUT_SEC}, sync_client=True)

    def _deployment_id(self, client: Any, name: str, refresh: bool = False) -> uuid.UUID:
        with self._lock:
            dep_id = None if refresh else self._deployments.get(name)
        if dep_id is None:
            dep_id = client.read_deployment_by_name(name).id
            with self._lock:
                self._deployments[name] = dep_id
        return dep_id

    # ------------------------------------------------------------------ dispatch
    def runs_for(self, nrows: int) -> int:
        """Flow runs a batch of ``nrows`` rows gets when released: one per ALYA_DISPATCH_ROWS_PER_RUN rows
        (rounded up), at least one, at most ALYA_DISPATCH_MAX_RUNS."""
        per = self.config.dispatch_rows_per_run
        return max(1, min(self.config.dispatch_max_runs, -(-nrows // per)))

    def release_batch(self, app: str, op: str, batch_id: str, nrows: int) -> list[str]:
        """The batch became queued: its flow runs (:meth:`runs_for`), each with its own idempotency key, so a
        retried release makes none twice. A run that cannot be created is left to the sweeper (which
        dispatches a batch with no live run) and to the runs that were: each serves the whole batch."""
        started = []
        for k in range(self.runs_for(nrows)):
            key = names.dispatch_key(batch_id, "release" if k == 0 else f"release:{k}")
            run = self.start_batch(app, op, batch_id, key=key, part=k)
            if run is None:
                break  # Prefect unreachable or no deployment: the next calls would fail alike
            started.append(run)
        return started

    def start_batch(self, app: str, op: str, batch_id: str, key: str | None = None, part: int = 0) -> str | None:
        """Create a flow run (Scheduled now) of the batch type's deployment and return its id, without
        waiting for it. ``None`` when it could not be created: the batch stays queued for the sweeper."""
        from prefect.exceptions import ObjectNotFound
        from prefect.states import Scheduled

        log = get_logger().bind(app=app, op=op, batch=batch_id)
        name = self.deployment_name(app, op)
        key = key or names.dispatch_key(batch_id, "release")
        try:
            with self._client() as client:
                for attempt in (0, 1):
                    dep_id = self._deployment_id(client, name, refresh=attempt > 0)
                    try:
                        run = client.create_flow_run_from_deployment(
                            dep_id,
                            parameters={"batch_id": batch_id},
                            state=Scheduled(),
                            name=names.run_name(app, op, batch_id, part),
                            tags=names.run_tags(app, op, batch_id),
                            idempotency_key=key,
                        )
                        break
                    except ObjectNotFound:
                        if attempt:  # the deployment was deleted (and maybe re-created): look it up again
                            raise
        except Exception as exc:
            hint = ("no such deployment: serve it (python -m flows.serve) or prefect deploy"
                    if type(exc).__name__ == "ObjectNotFound" else "Prefect API unreachable or failing")
            log.warning("dispatch_failed", deployment=name, error=describe(exc), reason=hint,
                        note="the batch is stored and stays queued; the sweeper will dispatch it")
            return None
        log.info("dispatched", deployment=name, flow_run=str(run.id), flow_run_name=run.name, key=key)
        return str(run.id)

    def continue_batch(self, app: str, op: str, batch_id: str | None) -> None:
        """A flow run of one batch that used its task budget hands the rest of that batch to a fresh run."""
        if not batch_id:
            return
        try:
            from prefect.runtime import flow_run

            current = flow_run.id or uuid.uuid4().hex
        except Exception:
            current = uuid.uuid4().hex
        self.start_batch(app, op, batch_id, key=names.dispatch_key(batch_id, f"continue:{current}"))

    # ------------------------------------------------------------------ flow runs of batches
    def active_runs(self, batch_id: str | None = None) -> list[Any]:
        """Flow runs not yet finished, of one batch, or (None) of every alya batch."""
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
            FlowRunFilterTags,
        )

        tags = [names.batch_tag(batch_id)] if batch_id else [names.TAG]
        flt = FlowRunFilter(tags=FlowRunFilterTags(all_=tags),
                            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=ACTIVE_STATES)))  # type: ignore[arg-type]
        runs: list[Any] = []
        with self._client() as client:
            while True:
                page = list(client.read_flow_runs(flow_run_filter=flt, limit=PAGE, offset=len(runs)))
                runs.extend(page)
                if len(page) < PAGE:
                    return runs

    def cancel_batch(self, batch_id: str) -> int:
        """The Prefect side of an abort (already committed). A run that has not started (Scheduled) ends
        Cancelled "Aborted" at once, with the batch's summary table made through the API with its id. A run
        that has started (Pending, Running) is left to end by itself: it sees the abort at its next write-back
        (or at once through NOTIFY), its running rows settle, and it ends Cancelled "Aborted" with its own
        summary table (``alya.prefect.states``, ``alya.prefect.artifacts``); cancelling it at once would let
        its worker kill it first, with a bare "Cancelled" and no summary. One still live after
        ``cancel_timeout_sec`` (a hung row, a lost machine) is moved to Cancelling, so that its worker
        stops it, and forced Cancelled after as long again (here, or by the sweeper should this process be
        gone by then). Returns how many runs were touched; never raises."""
        from prefect.states import Cancelled

        log = get_logger().bind(batch=batch_id)
        waiting: list[Any] = []
        touched = 0
        try:
            runs = self.active_runs(batch_id)
            with self._client() as client:
                for run in runs:
                    kind = _state_type(run)
                    if kind == "SCHEDULED":
                        client.set_flow_run_state(run.id, Cancelled(name=ABORTED_NAME, message=(
                            "batch aborted before its run started")), force=True)
                        self._summary(client, run.id, batch_id)
                        log.info("flow_run_cancel", flow_run=str(run.id), was=kind, now="CANCELLED")
                    else:
                        waiting.append(run.id)
                        log.info("flow_run_left_to_end", flow_run=str(run.id), was=kind,
                                 note=f"stopped if still live after {self.config.cancel_timeout_sec:g}s")
                    touched += 1
        except Exception as exc:
            log.warning("cancel_failed", error=describe(exc),
                        note="batch aborted anyway: its runs stop by themselves; sweeper stops stuck ones")
        if waiting:  # the thread sees the caller's Prefect settings (a temporary_settings context, say)
            ctx = contextvars.copy_context()
            threading.Thread(target=ctx.run, args=(self._stop_later, waiting), name="alya-force-cancel",
                             daemon=True).start()
        return touched

    def _stop_later(self, run_ids: list[Any]) -> None:
        time.sleep(self.config.cancel_timeout_sec)
        stopping = self.stop_runs(run_ids)
        if stopping:
            time.sleep(self.config.cancel_timeout_sec)
            self.force_stuck_cancelling(stopping)

    def stop_runs(self, run_ids: list[Any]) -> list[Any]:
        """Runs of aborted batches that are still live (Pending, Running, Paused) move to Cancelling, so that
        their worker stops them; returns their ids."""
        from prefect.states import Cancelling

        stopping: list[Any] = []
        try:
            with self._client() as client:
                for run_id in run_ids:
                    run = client.read_flow_run(run_id)
                    if _state_type(run) in ("PENDING", "RUNNING", "PAUSED"):
                        why = f"batch aborted; the run did not end by itself within {self.config.cancel_timeout_sec:g}s"
                        client.set_flow_run_state(run.id, Cancelling(message=why), force=True)
                        get_logger().warning("flow_run_cancelling", flow_run=str(run.id), reason=why)
                        stopping.append(run.id)
        except Exception as exc:
            get_logger().warning("cancel_failed", error=describe(exc))
        return stopping

    def force_stuck_cancelling(self, run_ids: list[Any] | None = None) -> int:
        """Runs left in Cancelling (a process worker with a Pending run never finishes them) become
        Cancelled: the given runs, or (None) every alya run Cancelling for over ``cancel_timeout_sec``, and
        first, (None) runs still live ``cancel_timeout_sec`` after their batch was aborted move to
        Cancelling (the aborting process was gone before it could). A run stopped so never made its batch's
        summary table: it is made here, with the run's id."""
        from prefect.states import Cancelled

        forced = 0
        try:
            if run_ids is None:
                active = self.active_runs()
                self.stop_runs([r.id for r in active if self._aborted_long_ago(r)])
                runs = [r for r in active if _state_type(r) == "CANCELLING"
                        and _age_sec(r.state.timestamp) >= self.config.cancel_timeout_sec]
            with self._client() as client:
                if run_ids is not None:
                    runs = [client.read_flow_run(i) for i in run_ids]
                for run in runs:
                    kind = _state_type(run)
                    if kind == "CANCELLING":
                        why = f"forced by alya after {self.config.cancel_timeout_sec:g}s in Cancelling"
                        client.set_flow_run_state(run.id, Cancelled(message=why), force=True)
                        get_logger().warning("flow_run_forced_cancelled", flow_run=str(run.id))
                        forced += 1
                    if kind in ("CANCELLING", "CANCELLED"):  # stopped by alya, or by its worker
                        for batch in {b for t in run.tags or [] if (b := names.batch_of_tag(t))}:
                            self._summary(client, run.id, batch)
        except Exception as exc:
            get_logger().warning("force_cancel_failed", error=describe(exc))
        return forced

    def _aborted_long_ago(self, run: Any) -> bool:
        """A live run (not Cancelling) of a batch aborted over ``cancel_timeout_sec`` ago."""
        if _state_type(run) not in ("PENDING", "RUNNING", "PAUSED"):
            return False
        batches = [b for t in run.tags or [] if (b := names.batch_of_tag(t))]
        if not batches:
            return False
        rec = self.store.run(lambda q: q.get_batch(id=batches[0]), readonly=True)
        return rec is not None and rec.status is BatchStatus.ABORTED and rec.doneat is not None \
            and _age_sec(rec.doneat) >= self.config.cancel_timeout_sec

    def _summary(self, client: Any, run_id: Any, batch_id: str) -> None:
        """The batch's summary table, linked to the run ``run_id`` that could not make it itself."""
        try:
            def read(q: Any) -> Any:
                rec = q.get_batch(id=batch_id)
                return None if rec is None else (rec.app, rec.op, record_summary(q, rec).value)

            found = self.store.run(read, readonly=True)
            if found is not None:
                create_summary(client, found[0], found[1], batch_id, found[2], run_id)
        except Exception as exc:
            get_logger().warning("summary_artifact_failed", batch=batch_id, error=describe(exc))

    def redispatch_idle(self) -> list[str]:
        """Queued/in-progress batches that no flow run serves get one (at most one per batch and minute):
        those with no live run, and stalled ones, whose rows wait to be claimed while no live worker holds
        any of them although their runs have been Running for over ALYA_RECOVERY_SEC (a run whose machine
        was lost stays Running in Prefect; its rows come back to the queue, and nothing would claim them)."""
        try:
            runs: dict[str, list[Any]] = {}
            for r in self.active_runs():
                for t in r.tags or []:
                    if (b := names.batch_of_tag(t)) is not None:
                        runs.setdefault(b, []).append(r)
        except Exception as exc:
            get_logger().warning("sweeper_prefect_unreachable", error=describe(exc))
            return []
        with self.store.tx() as q:
            open_batches = q.open_batches_all()
            stalled = set(q.stalled_batches(sec=self.config.recovery_sec))
        live_batches = {b for b, rs in runs.items()
                        if not (b in stalled and all(self._running_long(r) for r in rs))}
        for b in stalled - live_batches:
            if b in runs:
                get_logger().warning("batch_stalled_redispatch", batch=b, runs=[str(r.id) for r in runs[b]],
                                     note="its runs show Running but no live worker holds its rows")
        minute = int(time.time() // 60)
        started: list[str] = []
        deployed: set[str] = set()  # each type's deployment is looked up once per sweep, not once per batch
        undeployed: dict[str, int] = {}
        for ref in open_batches:
            batch, app, op = ref.id, ref.app, ref.op
            if str(batch) in live_batches:
                continue
            name = self.deployment_name(app, op)
            if name in undeployed or (name not in deployed and not self._deployed(name)):
                undeployed[name] = undeployed.get(name, 0) + 1
                continue
            deployed.add(name)
            if self.start_batch(app, op, str(batch), key=names.dispatch_key(str(batch), f"sweep:{minute}")):
                started.append(str(batch))
        for name, n in undeployed.items():
            get_logger().warning("sweeper_no_deployment", deployment=name, open_batches=n,
                                 note="serve or deploy it, or run jm.run workers for this batch type")
        return started

    def _running_long(self, run: Any) -> bool:
        started = getattr(run, "start_time", None)
        return _state_type(run) == "RUNNING" and started is not None and \
            _age_sec(started) >= self.config.recovery_sec

    def _deployed(self, name: str) -> bool:
        from prefect.exceptions import ObjectNotFound

        try:
            with self._client() as client:
                self._deployment_id(client, name, refresh=True)
            return True
        except ObjectNotFound:
            return False
        except Exception:
            return True  # let start_batch try, and log what went wrong


def _age_sec(ts: Any) -> float:
    from datetime import datetime

    return (datetime.now(UTC) - ts).total_seconds() if ts else 0.0
