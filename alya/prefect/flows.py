"""Each batch type (app, op) is one Prefect flow; its mapped tasks run the engine's claim loop.

A batch-type flow is a plain module-level ``@flow`` where Prefect needs to import it (a deployment's
entrypoint), declared with :func:`batch_flow` and calling :func:`run_batch`::

    @alya.batch_flow("bank", "txn")
    def bank_txn_flow(batch_id: str | None = None) -> dict:
        return jm.process_batches("bank", "txn", batch_id)

``jm.run`` builds the same flow in-process (:func:`make_batch_flow`) for the types registered on it.

Prefect only ever sees tasks that each claim and process chunks for up to ``task_seconds``: a flow run
maps at most ``flow_max_tasks`` of them (the Prefect server drops events past ~1,000 task runs per flow
run) in waves sized to a bounded thread pool. Tasks take and return only small values; the database
connections stay inside the engine.
"""

from __future__ import annotations

import concurrent.futures
import functools
import inspect
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.flows import Flow
from prefect.task_runners import ThreadPoolTaskRunner

from alya.core import names, validate
from alya.core.errors import AlyaError, describe
from alya.core.logs import get_logger
from alya.core.settings import JobManagerConfig
from alya.engine.engine import Engine
from alya.prefect.artifacts import RunArtifacts, quiet_queries
from alya.prefect.bridge import Bridges
from alya.prefect.dispatch import Dispatcher
from alya.prefect.ledger import Ledger
from alya.prefect.states import STATE_KEY, batch_state, queries_state, to_prefect, worker_state

RETRY_WAIT_MAX_SEC = 60.0
SUMMARISED_KEPT = 200  # a run's result lists the last this many batches it summarised (and counts them all)


def batch_flow(app: str, op: str,
               config: JobManagerConfig | None = None) -> Callable[[Callable[..., Any]], Flow[..., Any]]:
    """The ``@flow`` decorator of batch type (app, op): its name (``alya-{app}-{op}``), a task runner
    bounded to ``ALYA_WORKER_THREADS`` (never Prefect's default), no result persistence, and a final state
    that tells the outcome (``alya.prefect.states``): the counts the body returns (``process_batches``)
    become the flow's result inside a Completed, Failed or Cancelled ("Aborted") state."""
    cfg = config or JobManagerConfig()  # type: ignore[call-arg]  # the fields come from ALYA_* too

    def decorate(fn: Callable[..., Any]) -> Flow[..., Any]:
        @functools.wraps(fn)  # Prefect reads the parameters, name and docstring through __wrapped__
        def body(*args: Any, **kwargs: Any) -> Any:
            return to_prefect(fn(*args, **kwargs))

        return flow(  # type: ignore[no-any-return,call-overload]
            name=names.flow_name(app, op),
            description=inspect.getdoc(fn) or f"alya batch type {app}/{op}: processes its queued rows.",
            version=_version_of(fn),
            task_runner=ThreadPoolTaskRunner(max_workers=cfg.worker_threads),  # type: ignore[arg-type]
            persist_result=False,
            validate_parameters=False,
            log_prints=False,
        )(body)

    return decorate


def _version_of(fn: Callable[..., Any]) -> str | None:
    """Prefect's default version, a hash of the flow's own file (not of this module, which wraps it)."""
    try:
        from prefect.utilities.hashing import file_hash

        path = inspect.getsourcefile(fn)
        return file_hash(path) if path else None
    except (OSError, TypeError):
        return None


@task(name="alya-rows", cache_policy=NO_CACHE, persist_result=False, retries=0)
def process_rows(engine: Engine, app: str, op: str, only: str | None, linger: float,
                 seconds: float | None = None) -> dict[str, Any]:
    """The engine's claim loop for ``seconds`` (default ``task_seconds``; claims of about half a second of
    work each, rows run by the process's row pool): Prefect's fixed cost per task run is then small next to
    the work. With ``linger``, an idle task waits for work to be notified until its time is up."""
    return engine.work(app, op, only, seconds=seconds, linger=linger).as_dict()


def run_batch(engine: Engine, app: str, op: str, batch_id: str | None = None,
              dispatcher: Dispatcher | None = None, linger: float = 0.0,
              bridges: Bridges | None = None) -> dict[str, Any]:
    """The body of a batch-type flow run: process queued rows of batch ``batch_id`` (a dispatched run),
    or of any batch of this type (``jm.run``), until none is left or the run has used its task budget;
    then, if work is left, hand over to a fresh flow run. With ``linger`` (runs serving any batch), an
    idle run waits that long for new work before it ends, so a stream of slow queries is served by one
    warm flow run instead of a new run each. ``bridges`` (``jm.run``): the rows a bridge ran while this run
    was being created are stopped here and counted in it (``alya.prefect.bridge``)."""
    if bridges is not None:
        bridges.attached(app, op)
    if batch_id is not None:  # a run started from the UI with a bad parameter fails with one clear line
        batch_id = validate.batch_id(batch_id)
    engine.start()
    total: dict[str, Any] = {"nrows": 0, "nsuccess": 0, "nfailed": 0, "nretry": 0, "tasks": 0,
                             "summarised": [], "nsummarised": 0}
    artifacts = RunArtifacts(engine.svc.statuses, app, op, batch_id,  # the Prefect UI's view, per batch
                             quiet=quiet_queries(engine.svc.config, engine.svc.registry, app, op))
    try:
        _waves(engine, app, op, batch_id, dispatcher, linger, total, artifacts, bridges)
    finally:  # a failed task too: the artifacts of what was done, and no publishing thread left behind
        if bridges is not None:
            bridges.detached(app, op)  # new work starts a new run while this one reports its end
            _count(total, bridges.reports(app, op), artifacts)
        artifacts.finish(total["summarised"])
    if artifacts.quiet and batch_id is None:  # counted from the chunk reports: no status read per query
        total[STATE_KEY] = queries_state(*artifacts.queries)
    else:
        total[STATE_KEY] = _final_state(engine, batch_id, total, artifacts.ledger)
    return total


def _final_state(engine: Engine, batch_id: str | None, total: dict[str, Any], ledger: Ledger) -> dict[str, Any]:
    """The state the run ends in (``alya.prefect.states``): its batch's outcome for a dispatched run, read
    once its rows have settled (every chunk task has returned); a worker run's batches counted by status,
    from what the run read while it ran (``alya.prefect.ledger``): at most ``END_READS`` statuses are read
    here, of open batches no one read yet (a run without its artifacts' thread)."""
    statuses = engine.svc.statuses
    if batch_id is not None:
        return batch_state(statuses.read(batch_id).value, handed_over=bool(total.get("handed_over")),
                           summarised=batch_id in total["summarised"])
    ledger.settle(lambda batch: statuses.read(batch).value)  # one it cannot read counts as unknown
    return worker_state(ledger.statuses())


def _waves(engine: Engine, app: str, op: str, batch_id: str | None, dispatcher: Dispatcher | None,
           linger: float, total: dict[str, Any], artifacts: RunArtifacts, bridges: Bridges | None) -> None:
    """Chunk tasks until no work is left, the task budget is used or the engine stops; counts go into
    ``total``, the finished tasks' reports to ``artifacts``.

    Rolling, not in waves: ``ALYA_WORKER_THREADS`` tasks run side by side and a new one is submitted as
    soon as one ends, and the run's first task claims for half the time, so that the tasks' claim loops end
    at different moments. A claim loop stops claiming when its time is up and its task returns once its
    claimed rows have run; when every loop of a type ended together, nothing claimed for the type meanwhile
    and the slots drained (``bench mixed``: 0.76-0.93 of the ideal). As many as the work needs: a task whose
    last claim was full (``busy``) is replaced and the run goes back to full width, else not (down to one);
    a run starts at one when the type's last claim was not full. 16 threads kept 16 tasks rolling for a
    trickle of slow queries (313 task runs for 1,500 queries; 94 now), 16 for a lone query after idling."""
    cfg = engine.svc.config
    chunk_task = process_rows.with_options(name=f"{names.flow_name(app, op)}-rows")
    width = cfg.worker_threads
    target = width if engine.producer.was_full(app, op) else 1  # chunk tasks wanted now
    while not engine.stopping.is_set():
        first = True  # (again after an idle spell: the tasks then start together)
        idle = False  # a task found nothing to claim: submit no more, let the others end
        pending: list[Any] = []
        while True:
            while not idle and len(pending) < target and total["tasks"] < cfg.flow_max_tasks \
                    and not engine.stopping.is_set():
                seconds = cfg.task_seconds / 2 if first and width > 1 else cfg.task_seconds
                pending.append(chunk_task.submit(engine, app, op, batch_id, linger, seconds))
                total["tasks"] += 1
                first = False
            if not pending:
                break
            ended, _ = concurrent.futures.wait([f.wrapped_future for f in pending],
                                               return_when=concurrent.futures.FIRST_COMPLETED)
            done = [f for f in pending if f.wrapped_future in ended]
            pending = [f for f in pending if f.wrapped_future not in ended]
            reports = [f.result() for f in done]
            _count(total, reports + (bridges.reports(app, op) if bridges is not None else []), artifacts)
            if any(r["nrows"] == 0 and not r["summarised"] for r in reports):
                idle = True
            for r in reports:
                target = width if r.get("busy") else max(1, target - 1)
        if engine.stopping.is_set():
            return
        if not idle:  # the task budget is used and work is left: a fresh run goes on with it
            if dispatcher is not None and batch_id:
                dispatcher.continue_batch(app, op, batch_id)
                total["handed_over"] = True
            return
        # Nothing to claim now. A dispatched run waits out a short retry delay of its own batch (rows
        # that faulted); longer ones are left to the sweeper, which dispatches queued batches that have no
        # live run.
        if not batch_id:
            if linger:
                # Linger by claiming, not by submitting another task: work arriving now starts at once,
                # here, instead of after Prefect has created a task run.
                r = engine.work(app, op, None, seconds=linger, linger=linger).as_dict()
                _count(total, [r], artifacts)
                if r["nrows"] or r["summarised"]:
                    target = width if r["busy"] else 1
                    continue
            return
        wait = engine.next_claimable_in(batch_id)
        if wait is not None:  # and an init() that failed is retried after its own delay
            wait = max(wait, engine.init_retry_in(app))
        if wait is None or wait > RETRY_WAIT_MAX_SEC:
            return
        engine.stopping.wait(wait + 0.05)


def _count(total: dict[str, Any], reports: list[dict[str, Any]], artifacts: RunArtifacts) -> None:
    """Add chunk reports (the tasks' of a wave, and any bridge's) to the run's totals and artifacts."""
    for r in reports:
        for k in ("nrows", "nsuccess", "nfailed", "nretry"):
            total[k] += r[k]
        total["summarised"].extend(r["summarised"])
        total["nsummarised"] += len(r["summarised"])
    del total["summarised"][:-SUMMARISED_KEPT]  # a long worker run: the last ones, and how many
    artifacts.wave(reports)


def make_batch_flow(engine: Engine, app: str, op: str, dispatcher: Dispatcher | None = None,
                    linger: float = 0.0, bridges: Bridges | None = None) -> Flow[..., Any]:
    """The flow of one batch type, built in-process (``jm.run``, tests). Deployed flows are module-level
    functions decorated with :func:`batch_flow` instead, so that Prefect can import them."""

    def batch_type_flow(batch_id: str | None = None) -> dict[str, Any]:
        return run_batch(engine, app, op, batch_id, dispatcher, linger=0.0 if batch_id else linger,
                         bridges=None if batch_id else bridges)

    batch_type_flow.__doc__ = f"Batch type {app}/{op}: process its queued rows."
    return batch_flow(app, op, engine.svc.config)(batch_type_flow)


def run_worker(engine: Engine, types: Callable[[], list[tuple[str, str]]], stop_when_idle: bool = False,
               dispatcher: Dispatcher | None = None) -> None:
    """The in-process worker behind ``jm.run``: runs the flows of the batch types ``types()`` returns
    whenever their work is queued, and the maintenance duties this worker holds.

    Flows run on a helper thread, so the main thread keeps alya's SIGTERM handler: Prefect only installs
    its own (which crashes the flow run mid-chunk) when a flow runs on the main thread.

    A stop (``engine.stopping``: ``jm.close()``, SIGTERM, Ctrl-C, another thread) is cleared by the loop it
    ended, once shut down, never at the start: a stop in a ``jm.run`` thread's first instants ends it."""
    if threading.current_thread() is not threading.main_thread():
        _worker_loop(engine, types, stop_when_idle, dispatcher)
        return
    restore = _install_sigterm(engine)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            _worker_loop(engine, types, stop_when_idle, dispatcher)
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


class _TypeRuns:
    """The flow runs of one worker process, one thread per batch type: a type with queued work gets its flow
    run at once, whatever the other types' runs are doing (a slow query never waits for a big batch of
    another type to end). Rows of all of them share the process's row pool, which takes them in turn."""

    def __init__(self, engine: Engine, dispatcher: Dispatcher | None, linger: float, log: Any) -> None:
        self.engine = engine
        self.dispatcher = dispatcher
        self.linger = linger
        self.log = log
        self.flows: dict[tuple[str, str], Flow[..., Any]] = {}
        self.threads: list[threading.Thread] = []  # runs of a type may overlap while one reports its end
        self.retry_at: dict[tuple[str, str], float] = {}
        self.bridges = Bridges(engine, linger=linger > 0)  # rows start while a run is being created
        self.ended = threading.Event()  # a run ended: look again at once
        self.worked = False  # some run processed rows or finished a batch since the last look

    def running(self) -> bool:
        return any(t.is_alive() for t in self.threads) or self.bridges.busy()

    def start(self, app: str, op: str) -> None:
        if self.bridges.serving(app, op) or time.monotonic() < self.retry_at.get((app, op), 0.0):
            return
        if (app, op) not in self.flows:
            self.flows[(app, op)] = make_batch_flow(self.engine, app, op, self.dispatcher, linger=self.linger,
                                                    bridges=self.bridges)
        token = self.bridges.start(app, op)
        thread = threading.Thread(target=self._run, args=(app, op, token), name=f"alya-flow-{app}-{op}",
                                  daemon=True)
        self.threads = [t for t in self.threads if t.is_alive()] + [thread]
        thread.start()

    def ended_elsewhere(self, batches: list[str], types: list[tuple[str, str]]) -> None:
        """Batches maintenance ended (missed summaries, deadlines): a run of their type (the live one, or one
        started for them) makes their summary artifacts. Batches of types this worker does not serve get none
        from it (a worker cannot run a type it has no processor for)."""
        svc = self.engine.svc  # slow queries without artifacts of their own: no run to start for them
        served = {t for t in types if not quiet_queries(svc.config, svc.registry, *t)}
        by_type: dict[tuple[str, str], list[str]] = {}
        with svc.store.tx() as tx:
            for batch in batches:
                rec = tx.get_batch(id=batch)
                if rec is not None and (rec.app, rec.op) in served:
                    by_type.setdefault((rec.app, rec.op), []).append(batch)
        for (app, op), ids in by_type.items():
            self.bridges.ended_elsewhere(app, op, ids)
        if by_type:
            self.ended.set()  # the worker loop looks again now: it starts runs for them

    def _run(self, app: str, op: str, token: threading.Event) -> None:
        try:
            result = cast(dict[str, Any], self.flows[(app, op)](batch_id=None))
            if result["nrows"] or result["summarised"]:
                self.worked = True
        except Exception as exc:  # an outage: log, back off this type, try again
            self.log.error("flow_failed", app=app, op=op, error=describe(exc))
            self.retry_at[(app, op)] = time.monotonic() + max(1.0, self.engine.svc.config.poll_sec)
        finally:
            self.bridges.attached(app, op, token)  # a run that never started its body stops its bridge too
            self.bridges.detached(app, op, token)
            self.ended.set()

    def join(self) -> None:
        for t in list(self.threads):
            t.join()
        self.bridges.join()


def _worker_loop(engine: Engine, types_of: Callable[[], list[tuple[str, str]]], stop_when_idle: bool,
                 dispatcher: Dispatcher | None) -> None:
    cfg = engine.svc.config
    log = get_logger().bind(worker=engine.worker_id)
    if engine.stopping.is_set():  # stopped before it started: nothing to start, the stop is spent
        engine.stopping.clear()
        log.info("worker_stopped", note="stopped before it started")
        return
    engine.start()
    log.info("worker_started", types=[f"{a}/{o}" for a, o in types_of()])
    # Recovery, missed summaries and mark_done calls: on a thread of their own, so that a long flow run
    # never delays them, and each done by one worker of the cluster at a time (alya.engine.maintenance).
    runs = _TypeRuns(engine, dispatcher, 0.0 if stop_when_idle else cfg.linger_sec, log)  # no lingering then
    engine.maintenance.start(engine, types_of, on_ended=lambda ended: runs.ended_elsewhere(ended, types_of()))
    try:
        while not engine.stopping.is_set():
            types = types_of()
            since = engine.waker.generation()  # a notification after this look wakes the wait below
            runs.ended.clear()
            try:
                todo = engine.types_with_work(types)
            except AlyaError as exc:  # an outage: log, back off, try again
                log.error("worker_loop_failed", error=str(exc), note="waiting for the database")
                engine.stopping.wait(max(1.0, cfg.poll_sec))
                continue
            for app, op in dict.fromkeys(todo + runs.bridges.undelivered()):
                runs.start(app, op)
            try:
                if stop_when_idle and not todo and not runs.running() and not engine.open_work(types):
                    break
            except AlyaError as exc:  # an outage: a worker asked to stop when idle waits it out too
                log.error("worker_loop_failed", error=str(exc), note="waiting for the database")
                engine.stopping.wait(max(1.0, cfg.poll_sec))
                continue
            _wait(engine, runs, since, cfg.poll_sec)
    finally:
        engine.stopping.set()
        runs.join()  # runs stop claiming, finish their rows and give back the unstarted ones
        engine.shutdown()
        engine.stopping.clear()  # spent: the next jm.run of this JobManager runs (see run_worker)
        log.info("worker_stopped")


def _wait(engine: Engine, runs: _TypeRuns, since: int, poll_sec: float) -> None:
    """Until work is notified, a flow run ends, or ``poll_sec`` passes (the polling fallback)."""
    deadline = time.monotonic() + poll_sec
    while not engine.stopping.is_set() and not runs.ended.is_set():
        left = deadline - time.monotonic()
        if left <= 0 or engine.waker.wait(min(left, 0.05), since=since):
            return


def _install_sigterm(engine: Engine) -> Callable[[], Any]:
    """SIGTERM: finish the current row, give back the rest of the chunk, exit the loop."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        get_logger().info("sigterm_received", worker=engine.worker_id)
        engine.stopping.set()

    signal.signal(signal.SIGTERM, on_term)
    return lambda: signal.signal(signal.SIGTERM, previous)
