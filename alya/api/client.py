"""JobManager: the client API of the contract (submit, append, wait-off, status, done, abort, list).

Every call validates first, then writes in one transaction, then touches the cache and Prefect *after*
the commit: a refusal or a crash can never leave a half-stored batch, and Redis only ever mirrors what
PostgreSQL already holds.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, Union

from alya.api.control import BatchControl
from alya.batch.failures import retry_failed
from alya.batch.finish import Finisher
from alya.batch.intake import Intake
from alya.batch.monitor import Monitor
from alya.batch.retention import purge
from alya.batch.services import Services
from alya.batch.status import Statuses
from alya.core import validate
from alya.core.confine import Roots
from alya.core.errors import InvalidState
from alya.core.ids import uuid7
from alya.core.logs import get_logger, status_change
from alya.core.metrics import Metrics
from alya.core.models import (
    BatchDetails,
    BatchDone,
    BatchInput,
    BatchOutput,
    BatchStatus,
    BatchSummary,
    FileIntake,
    PurgeReport,
    SlowQueryDone,
)
from alya.core.records import Counts
from alya.core.redact import shown_url, stored_url
from alya.core.registry import BatchProcessor, BulkBatchProcessor, InitBlocks, Initializer, Registry, SlowQueryProcessor
from alya.core.settings import Backends, IntakeSettings, JobManagerConfig, default_object_store_url
from alya.db.batches import append_rows, insert_batch, insert_slowquery, release_batch
from alya.db.ingest import iter_rows
from alya.db.store import Store, json_text
from alya.engine.engine import Engine
from alya.engine.maintenance import CleanupReport, cleanup
from alya.io.cache import StatusCache
from alya.io.files import FileChecker
from alya.io.outputs import ObjectStore
from alya.prefect import events, reaper
from alya.prefect.dispatch import Dispatcher
from alya.prefect.reaper import guard_ephemeral_server

if TYPE_CHECKING:
    import pandas as pd
    from prefect.flows import Flow

Rows = Union[Iterable[BatchInput], Iterable[tuple[int, Any]], "pd.DataFrame"]


class JobManager(BatchControl):
    """The application's handle on alya: the contract's API, and the wiring of the layers below it
    (store, cache, object store, statuses, engine, dispatcher), which it builds and delegates to.
    Thread-safe; create one per process and share it."""

    def __init__(
        self,
        database_url: str | None = None,
        redis_url: str | None = None,
        object_store_url: str | None = None,
        config: JobManagerConfig | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        env = Backends()
        self.config = config or JobManagerConfig()  # type: ignore[call-arg]  # the fields come from ALYA_* too
        database_url = database_url or env.database_url
        if not database_url:
            from alya.db.embedded import embedded_database_url

            store = Store(embedded_database_url, prepare=self.config.prepared_statements)  # started on first use
        else:
            store = Store(database_url, prepare=self.config.prepared_statements)
        cache = StatusCache(redis_url or env.redis_url, self.config.batchstatus_cachedur_sec)
        objects = ObjectStore(object_store_url or env.object_store_url or default_object_store_url(),
                              storage_options)
        registry = Registry()
        self.services = Services(
            config=self.config, store=store, cache=cache, objects=objects,
            statuses=Statuses(store, cache, self.config.done_cache_rows),
            registry=registry, initblocks=InitBlocks(registry),
        )
        self._finisher = Finisher(self.services)  # ends batches (here: aborts)
        self._monitor = Monitor(self.services)  # jm.metrics()
        self.dispatcher = Dispatcher(self.config, store) if self.config.dispatch == "prefect" else None
        events.install_for(self.config)  # ALYA_EVENTS: batch status changes as Prefect events (one sink per process)
        self._engine: Engine | None = None
        self._flows: dict[tuple[str, str], Flow[..., Any]] = {}
        self._migrated = False
        get_logger().debug("jobmanager", database=shown_url(database_url) if database_url else "embedded",
                           dispatch=self.config.dispatch)

    @classmethod
    def from_env(cls) -> JobManager:
        """Everything from ALYA_* variables, with embedded defaults for what is unset."""
        return cls()

    # The backends, for applications and tests that look behind the API (e.g. the store's database URL).
    @property
    def store(self) -> Store:
        return self.services.store

    @property
    def cache(self) -> StatusCache:
        return self.services.cache

    @property
    def objects(self) -> ObjectStore:
        return self.services.objects

    @property
    def registry(self) -> Registry:
        return self.services.registry

    @property
    def initblocks(self) -> InitBlocks:
        return self.services.initblocks

    @property
    def engine(self) -> Engine:
        """The processing side of this JobManager (created on first use: clients never need it)."""
        if self._engine is None:
            self._engine = Engine(self.services)
        return self._engine

    # ------------------------------------------------------------------ registration
    def register_initializer(self, app: str, initializer: Initializer) -> None:
        self.registry.add_initializer(app, initializer)

    def register_batch_processor(self, app: str, op: str, processor: BatchProcessor | BulkBatchProcessor) -> None:
        self.registry.add_processor(app, op, "B", processor)

    def register_slowquery_processor(self, app: str, op: str, processor: SlowQueryProcessor) -> None:
        self.registry.add_processor(app, op, "Q", processor)

    # ------------------------------------------------------------------ batches
    def batch_submit(
        self,
        app: str,
        op: str,
        context: dict[str, Any] | str,
        rows: Rows,
        wait: bool = False,
        inputfile: str | None = None,
        idempotency_key: str | None = None,
        priority: int = 0,
        max_failures: int | float | None = None,
        not_before: datetime | None = None, deadline: datetime | None = None,
    ) -> str:
        """Store a batch and all its rows in one transaction (rows streamed through COPY). With an
        ``idempotency_key`` already used by this app, the first batch's id is returned and nothing is
        stored (the rows are not read); a concurrent call with the same key waits for the first.
        ``priority`` (-1000..1000): among queued work a worker serves, higher starts first; equal
        priorities share the slots in turn, and lower ones keep a reserved share (README, "Scheduling").
        ``max_failures``: rows, or a fraction in (0, 1) of the batch's rows; past it the batch stops, failed.
        ``not_before``, ``deadline`` (aware datetimes): see ``alya.api.control``."""
        app, op = validate.app_name(app), validate.op_name(op)
        ctx = validate.json_object(context, "context", self.config.max_context_bytes)
        if inputfile is not None:
            inputfile = stored_url(validate.text_value(inputfile, "inputfile"))
        key = validate.idempotency_key(idempotency_key)
        prio, limit = validate.priority(priority), validate.max_failures(max_failures)
        not_before, deadline = validate.schedule(not_before, deadline)
        pairs = iter_rows(rows)
        status = BatchStatus.WAIT if wait else BatchStatus.QUEUED
        with self.store.tx() as q:
            new = insert_batch(q, app, op, ctx, pairs, status=status, inputfile=inputfile,
                               max_rows=self.config.batchrowmax, idempotency_key=key, priority=prio,
                               max_input_bytes=self.config.max_input_bytes, failure_limit=limit,
                               not_before=not_before, deadline=deadline)
        if new.replayed:
            get_logger().info("submit_replayed", app=app, op=op, batch=new.id)
            return new.id
        status_change(app, op, new.id, status.value, nrows=new.nrows)
        self._queued(app, op, new.id, new.ver, status, new.nrows)
        return new.id

    def batch_append(self, batch_id: str, rows: Rows, wait: bool = False) -> int:
        """Add rows to a batch held in `wait`; `wait=False` then releases it. Returns the total rows."""
        batch_id = validate.batch_id(batch_id)
        pairs = iter_rows(rows)
        with self.store.tx() as q:
            rec, total, ver = append_rows(q, batch_id, pairs, max_rows=self.config.batchrowmax, wait=wait,
                                          max_input_bytes=self.config.max_input_bytes)
        status = BatchStatus.WAIT if wait else BatchStatus.QUEUED
        if not wait:
            status_change(rec.app, rec.op, batch_id, status.value, old="wait", nrows=total)
        self._queued(rec.app, rec.op, batch_id, ver, status, total, rec.paused)
        return int(total)

    def wait_off(self, batch_id: str) -> int:
        """Release a batch held in `wait` to the workers; already queued is a no-op."""
        batch_id = validate.batch_id(batch_id)
        rec, ver = self.store.run(lambda q: release_batch(q, batch_id))
        if ver is None:
            return rec.nrows
        status_change(rec.app, rec.op, batch_id, "queued", old="wait", nrows=rec.nrows)
        self._queued(rec.app, rec.op, batch_id, ver, BatchStatus.QUEUED, rec.nrows, rec.paused)
        return rec.nrows

    def batch_status(self, batch_id: str) -> BatchSummary:
        """Counts and status, from Redis when cached, else from PostgreSQL (and then cached)."""
        return self.services.statuses.read(validate.batch_id(batch_id)).value

    def batch_done(self, batch_id: str) -> BatchDone:
        """The status, and once final every row ordered by line."""
        batch_id = validate.batch_id(batch_id)
        summary = self.services.statuses.read(batch_id)
        rows: list[BatchOutput] | None = None
        if summary.value.status.is_final:
            rows = self.services.statuses.final_rows(batch_id, summary)
        return summary.value.done(rows)

    def batch_rows(self, batch_id: str) -> Iterator[BatchOutput]:
        """Every row of a final batch ordered by line, read a few thousand at a time from a server-side cursor
        (``batch_done``'s one list is gigabytes for millions of rows). ``InvalidState`` until the batch is
        final. Consume it fully or ``close()`` it: a read transaction is open meanwhile."""
        batch_id = validate.batch_id(batch_id)
        s = self.services.statuses.read(batch_id).value
        if not s.status.is_final:
            raise InvalidState(f"batch {batch_id} is {s.status.value}: its rows can be read once it is final")
        return self.services.statuses.stream_rows(batch_id)

    def batch_abort(self, batch_id: str) -> BatchSummary:
        """Abort: rows not yet final become `aborted`, in one transaction. Refused once success/failed."""
        return self._abort(batch_id, None)

    def batch_retry_failed(self, batch_id: str, include_aborted: bool = False) -> int:
        """Requeue a failed batch's failed (and aborted) rows, reopened: the rows requeued (alya.batch.failures)."""
        done = retry_failed(self.services, batch_id, include_aborted)
        if self.dispatcher is not None:  # a flow run for the new round (never raises)
            self.dispatcher.start_batch(done.rec.app, done.rec.op, done.rec.id, key=done.dispatch_key)
        return done.nrows

    def batch_list(self, app: str, op: str | None = None, age_days: int = 7) -> list[BatchDetails]:
        return self._list(app, op, age_days, "B")

    def batch_purge(self, before: datetime, app: str | None = None, files: bool = False) -> PurgeReport:
        """Delete final batches and slow queries that ended before ``before`` (an aware datetime) with their
        rows, intake records, cache entries (and output ``files``); never open ones (``alya.batch.retention``)."""
        return purge(self.services, before, app, files)

    # ------------------------------------------------------------------ slow queries
    def slowquery_submit(self, app: str, op: str, context: dict[str, Any] | str,
                         input: dict[str, Any] | str, idempotency_key: str | None = None,
                         priority: int = 10) -> str:
        """A batch of exactly one row (line 0, type Q). ``idempotency_key``: as for ``batch_submit``.
        ``priority`` defaults above batches' 0: a slow query starts on the next free slot of a worker
        busy with batches."""
        app, op = validate.app_name(app), validate.op_name(op)
        ctx = validate.json_object(context, "context", self.config.max_context_bytes)
        data = json_text(validate.json_object(input, "input", self.config.max_input_bytes))
        key = validate.idempotency_key(idempotency_key)
        prio = validate.priority(priority)
        req_id = uuid7()  # time-ordered (partitions); chosen outside the transaction: Store.run may rerun it
        new = self.store.run(lambda q: insert_slowquery(q, req_id, app, op, ctx, data, idempotency_key=key,
                                                        priority=prio))
        if new.replayed:
            get_logger().info("submit_replayed", app=app, op=op, batch=new.id, type="Q")
            return new.id
        status_change(app, op, req_id, "queued", type="Q", nrows=1)
        self._queued(app, op, req_id, new.ver, BatchStatus.QUEUED, 1)
        return req_id

    def slowquery_done(self, req_id: str) -> SlowQueryDone:
        return self.services.statuses.slowquery_done(validate.batch_id(req_id))

    def slowquery_abort(self, req_id: str) -> None:
        self._abort(req_id, "Q")

    def slowquery_list(self, app: str, op: str | None = None, age_days: int = 7) -> list[BatchDetails]:
        return self._list(app, op, age_days, "Q")

    # ------------------------------------------------------------------ workers
    def run(self, stop_when_idle: bool = False) -> None:
        """Run this JobManager's batch-type flows in-process until stopped (or idle, if asked).

        Without PREFECT_API_URL, Prefect runs a temporary server for this process; a watchdog process ends
        it if this process is killed (``alya.prefect.reaper``). Long-running workers belong on a Prefect server."""
        if guard_ephemeral_server() and not reaper.notice_shown:
            get_logger().warning("prefect_ephemeral_api", advice="PREFECT_API_URL is unset: this worker runs "
                                 "its own temporary Prefect server (ended by a watchdog if the worker is killed); "
                                 "point long-running workers at a Prefect server")
        from alya.prefect.flows import run_worker  # Prefect is imported only by processes that run flows

        self._migrate_if_asked()
        run_worker(self.engine, self._types, stop_when_idle=stop_when_idle, dispatcher=self.dispatcher)

    def process_batches(self, app: str, op: str, batch_id: str | None = None) -> dict[str, Any]:
        """The body of a batch-type flow (see ``alya.batch_flow``): process queued rows of batch
        ``batch_id``, or of every batch of (app, op) when None, with the processors registered here."""
        from alya.prefect.flows import run_batch

        self._migrate_if_asked()
        return run_batch(self.engine, validate.app_name(app), validate.op_name(op), batch_id, self.dispatcher,
                         linger=0.0 if batch_id else self.config.linger_sec)

    def flow(self, app: str, op: str) -> Flow[..., Any]:
        """The Prefect flow of batch type (app, op), built in-process for the processors registered here."""
        from alya.prefect.flows import make_batch_flow

        key = (validate.app_name(app), validate.op_name(op))
        if key not in self._flows:
            self._flows[key] = make_batch_flow(self.engine, key[0], key[1], self.dispatcher)
        return self._flows[key]

    def cleanup(self, redispatch: bool = False) -> CleanupReport:
        """One idempotent recovery pass (see ``alya.engine.maintenance.cleanup``); with ``redispatch`` and
        ALYA_DISPATCH=prefect, queued batches that no live flow run serves get one (the sweeper's job)."""
        report = cleanup(self.engine, types=self._types())
        if redispatch and self.dispatcher is not None:
            report.dispatched = self.dispatcher.redispatch_idle()
        return report

    def metrics(self) -> Metrics:
        """Queued and in-progress rows and the oldest queued row's age per type, live workers, and this
        process's rows finished and failed per type and claim / write-back latency (``alya.batch.monitor``)."""
        return self._monitor.snapshot()

    def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
        self.initblocks.close_all()
        self.cache.close()
        self.store.dispose()

    # ------------------------------------------------------------------ file intake (alya.batch.intake)
    @functools.cached_property
    def intake(self) -> Intake:
        """The file intake of this JobManager (its checkers); the methods below delegate to it."""
        c = self.config
        roots = IntakeSettings().intake_roots  # type: ignore[call-arg]  # ALYA_INTAKE_ROOTS, when set, bounds calls
        return Intake(self.store, c.batchrowmax, lambda b: self._queued(b.app, b.op, b.id, b.ver, b.status, b.nrows),
                      storage_options=self.services.objects.options_for,
                      roots=Roots(roots) if roots is not None else None,
                      read_limits={"max_line_bytes": c.max_line_bytes, "max_bytes": c.max_file_bytes},
                      max_context_bytes=c.max_context_bytes, max_input_bytes=c.max_input_bytes)

    def register_file_checker(self, filetype: str, checker: FileChecker) -> None:
        self.intake.register_checker(filetype, checker)

    def file_submit(self, url_or_path: str, filetype: str, context: dict[str, Any] | str | None = None) -> FileIntake:
        """Check one file and submit its batch; the file stays where it is (see ``Intake.file_submit``)."""
        return self.intake.file_submit(url_or_path, filetype, context)

    def intake_scan(self, folder_url: str, patterns: dict[str, str] | str, min_age_sec: float = 10) -> list[FileIntake]:
        """One pass over a folder: matching files become batches exactly once (see ``Intake.scan``)."""
        return self.intake.scan(folder_url, patterns, min_age_sec)

    def file_list(self, age_days: int = 7) -> list[FileIntake]:
        return self.intake.file_list(age_days)

    # ------------------------------------------------------------------ internals
    def _migrate_if_asked(self) -> None:
        """ALYA_AUTO_MIGRATE: a worker brings the schema to head before its first claim (once per process;
        safe from many processes at once: migrations serialise on an advisory lock)."""
        if self.config.auto_migrate and not self._migrated:
            from alya.db.migrate import migrate_database

            migrate_database(self.store.database_url)
            self._migrated = True

    def _types(self) -> list[tuple[str, str]]:
        return [(r.app, r.op) for r in self.registry.batch_types()]

    def _queued(self, app: str, op: str, batch_id: str, ver: int, status: BatchStatus, nrows: int, paused: bool = False
                ) -> None:
        """After a commit that stored or released rows: cache the summary, and if the rows are now
        queued, dispatch a flow run. Nothing here may raise: the call has already succeeded."""
        self.services.statuses.put_new(batch_id, ver, status, nrows, Counts(queued=nrows), paused=paused)
        if status is BatchStatus.QUEUED and self.dispatcher is not None:
            try:
                self.dispatcher.release_batch(app, op, batch_id, nrows)
            except Exception as exc:  # a batch whose flow run could not be created stays queued for the sweeper
                get_logger().warning("dispatch_failed", app=app, op=op, batch=batch_id,
                                     error=f"{type(exc).__name__}")

    def _list(self, app: str, op: str | None, age_days: int, type_: str) -> list[BatchDetails]:
        app = validate.app_name(app)
        op = validate.op_name(op) if op is not None else None
        age_days = validate.age_days(age_days)
        recs = self.store.run(lambda q: q.list_batches(app=app, op=op, type=type_, age_days=age_days), readonly=True)
        return [r.details() for r in recs]


