"""Each batch type (app, op) is one Prefect flow whose mapped tasks each process one chunk of rows.

Prefect only ever sees chunks: a flow run maps at most ``flow_max_tasks`` chunk tasks (the Prefect
server drops events past ~1,000 task runs per flow run) in waves sized to a bounded thread pool. Tasks take
and return only small values; the database connections stay inside the task.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.flows import Flow
from prefect.task_runners import ThreadPoolTaskRunner

from alya.errors import AlyaError
from alya.logs import get_logger

if TYPE_CHECKING:
    from alya.client import JobManager


RETRY_WAIT_MAX_SEC = 60.0


def flow_name(app: str, op: str) -> str:
    return f"alya-{app}-{op}".replace("_", "-").replace(".", "-")


def make_batch_flow(jm: JobManager, app: str, op: str) -> Flow[..., dict[str, Any]]:
    """The Prefect flow of one batch type, bound to the processors registered on ``jm``."""
    name = flow_name(app, op)
    cfg = jm.config
    engine = jm.engine

    @task(name=f"{name}-chunk", cache_policy=NO_CACHE, persist_result=False, retries=0)
    def process_chunk(only: str | None) -> dict[str, Any]:
        # Claims chunks (one statement each) back to back for up to task_seconds: Prefect's fixed cost
        # per task run is then small next to the work, whatever the chunk size the processor needs.
        deadline = time.monotonic() + cfg.task_seconds
        total = engine.process_chunk(app, op, only).as_dict()
        while total["nrows"] and time.monotonic() < deadline and not engine.stopping.is_set():
            more = engine.process_chunk(app, op, only).as_dict()
            if not more["nrows"]:
                break
            for k in ("nrows", "nsuccess", "nfailed", "nretry"):
                total[k] += more[k]
            total["summarised"].extend(more["summarised"])
        return total

    @flow(
        name=name,
        task_runner=ThreadPoolTaskRunner(max_workers=cfg.worker_threads),  # type: ignore[arg-type]
        persist_result=False,
        validate_parameters=False,
        log_prints=False,
    )
    def batch_flow(batch_id: str | None = None) -> dict[str, Any]:
        """Process queued chunks of batch ``batch_id`` (a dispatched run), or of any batch of this type
        (``jm.run``), until none is left or the run has used its task budget; then, if work is left,
        hand over to a fresh flow run."""
        engine.start()
        progress = _Progress(jm, batch_id)
        total: dict[str, Any] = {"nrows": 0, "nsuccess": 0, "nfailed": 0, "nretry": 0, "tasks": 0,
                                 "summarised": []}
        wave = cfg.worker_threads * 2
        while total["tasks"] < cfg.flow_max_tasks and not engine.stopping.is_set():
            n = min(wave, cfg.flow_max_tasks - total["tasks"])
            reports = [f.result() for f in process_chunk.map([batch_id] * n)]
            total["tasks"] += n
            for r in reports:
                for k in ("nrows", "nsuccess", "nfailed", "nretry"):
                    total[k] += r[k]
                total["summarised"].extend(r["summarised"])
            progress.update(total["nrows"] if batch_id else 0)
            if any(r["nrows"] == 0 for r in reports):
                # Nothing to claim now. A dispatched run waits out a short retry delay of its own batch
                # (rows that faulted); longer ones are left to the sweeper, which dispatches queued
                # batches that have no live run.
                wait = engine.next_claimable_in(batch_id) if batch_id else None
                if wait is not None:  # and an init() that failed is retried after its own delay
                    wait = max(wait, engine.init_retry_in(app))
                if wait is None or wait > RETRY_WAIT_MAX_SEC:
                    break
                engine.stopping.wait(wait + 0.05)
        else:
            if jm.dispatcher is not None and not engine.stopping.is_set():
                jm.dispatcher.continue_batch_type(app, op, batch_id)
        progress.finish(total["summarised"])
        return total

    return batch_flow


class _Progress:
    """A progress artifact kept up to date per wave, and a summary table at the end (Prefect UI)."""

    def __init__(self, jm: JobManager, batch_id: str | None) -> None:
        self.jm = jm
        self.batch_id = batch_id
        self.nrows = 0
        self.artifact_id: Any = None
        if batch_id:
            try:
                self.nrows = jm.batch_status(batch_id).nrows
                from prefect.artifacts import create_progress_artifact

                self.artifact_id = create_progress_artifact(
                    progress=0.0, key=f"alya-progress-{batch_id}", description=f"rows done of batch {batch_id}"
                )
            except Exception as exc:
                get_logger().debug("progress_artifact_failed", error=str(exc))

    def update(self, done: int) -> None:
        if self.nrows:
            self._set(min(100.0, 100.0 * done / self.nrows))

    def _set(self, percent: float) -> None:
        if self.artifact_id is None:
            return
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.artifact_id, percent)
        except Exception as exc:
            get_logger().debug("progress_artifact_failed", error=str(exc))

    def finish(self, summarised: list[str]) -> None:
        ids = list(dict.fromkeys(([self.batch_id] if self.batch_id else []) + summarised))
        if not ids:
            return
        try:
            from prefect.artifacts import create_table_artifact

            table = []
            for bid in ids:
                s = self.jm.batch_status(bid)
                if bid == self.batch_id and s.status.is_final:
                    self._set(100.0)  # other runs may have done part of it
                table.append({"batch": bid, "status": s.status.value, "nrows": s.nrows, "nsuccess": s.nsuccess,
                              "nfailed": s.nfailed, "naborted": s.naborted, "nqueued": s.nqueued,
                              "ninprog": s.ninprog, "outputfiles": ", ".join(s.outputfiles.values())})
            create_table_artifact(table=table, key="alya-summary", description="batches touched by this run")
        except Exception as exc:
            get_logger().debug("summary_artifact_failed", error=str(exc))


def run_worker(jm: JobManager, stop_when_idle: bool = False) -> None:
    """The in-process worker behind ``jm.run``: runs the batch-type flows of the processors registered on
    ``jm`` whenever their work is queued, and the idempotent cleanup every few seconds.

    Flows run on a helper thread, so the main thread keeps alya's SIGTERM handler: Prefect only installs
    its own (which crashes the flow run mid-chunk) when a flow runs on the main thread."""
    engine = jm.engine
    engine.stopping.clear()
    if threading.current_thread() is not threading.main_thread():
        _worker_loop(jm, stop_when_idle)
        return
    restore = _install_sigterm(engine)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            _worker_loop(jm, stop_when_idle)
        except BaseException as exc:  # re-raised on the caller's thread
            errors.append(exc)

    loop = threading.Thread(target=target, name="alya-worker", daemon=True)
    loop.start()
    try:
        while loop.is_alive():
            loop.join(0.2)
    except KeyboardInterrupt:
        engine.stopping.set()
        loop.join()
        raise
    finally:
        restore()
    if errors:
        raise errors[0]


def _worker_loop(jm: JobManager, stop_when_idle: bool) -> None:
    from alya.recovery import cleanup

    engine = jm.engine
    log = get_logger().bind(worker=engine.worker_id)
    flows: dict[tuple[str, str], Flow[..., dict[str, Any]]] = {}
    engine.start()
    log.info("worker_started", types=[f"{r.app}/{r.op}" for r in jm.registry.batch_types()])
    next_cleanup = 0.0
    try:
        while not engine.stopping.is_set():
            types = [(r.app, r.op) for r in jm.registry.batch_types()]
            try:
                if time.monotonic() >= next_cleanup:
                    cleanup(jm, types=types)
                    next_cleanup = time.monotonic() + max(1.0, jm.config.recovery_sec / 4)
                todo = engine.types_with_work(types)
            except AlyaError as exc:  # an outage: log, back off, try again
                log.error("worker_loop_failed", error=str(exc))
                engine.stopping.wait(max(1.0, jm.config.poll_sec))
                continue
            worked = False
            for app, op in todo:
                fl = flows.get((app, op)) or flows.setdefault((app, op), make_batch_flow(jm, app, op))
                try:
                    result = fl(batch_id=None)
                except Exception as exc:  # an outage: log, back off, try again
                    log.error("flow_failed", app=app, op=op, error=f"{type(exc).__name__}: {exc}")
                    engine.stopping.wait(max(1.0, jm.config.poll_sec))
                    continue
                worked = worked or bool(result["nrows"] or result["summarised"])
            if stop_when_idle and not worked and not engine.open_work(types):
                break
            if not worked:
                engine.stopping.wait(jm.config.poll_sec)
    finally:
        engine.shutdown()
        log.info("worker_stopped")


def _install_sigterm(engine: Any) -> Any:
    """SIGTERM: finish the current row, give back the rest of the chunk, exit the loop."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        get_logger().info("sigterm_received", worker=engine.worker_id)
        engine.stopping.set()

    signal.signal(signal.SIGTERM, on_term)
    return lambda: signal.signal(signal.SIGTERM, previous)
