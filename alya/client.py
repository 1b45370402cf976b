"""JobManager: the client API of the contract (submit, append, wait-off, status, done, abort, list).

Every call validates first, then writes in one transaction, then touches the cache and Prefect *after*
the commit: a refusal or a crash can never leave a half-stored batch, and Redis only ever mirrors what
PostgreSQL already holds.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from contextlib import closing
from typing import TYPE_CHECKING, Any, Union

import psycopg2
import psycopg2.errorcodes
from sqlalchemy.engine import make_url

from alya import validate
from alya.cache import StatusCache, done_key, summary_key
from alya.errors import BatchNotFound, ConfigError, InvalidInput, InvalidState
from alya.ingest import COPY_ROWS, CopyStream, iter_rows
from alya.logs import get_logger, status_change
from alya.models import (
    BatchDetails,
    BatchDone,
    BatchInput,
    BatchOutput,
    BatchStatus,
    BatchSummary,
    SlowQueryDone,
    messages_from_json,
)
from alya.outputs import ObjectStore
from alya.registry import BatchProcessor, InitBlocks, Initializer, Registry, SlowQueryProcessor
from alya.settings import Backends, JobManagerConfig, default_object_store_url
from alya.store import Store, Tx, json_text, sqlalchemy_url

if TYPE_CHECKING:
    import pandas as pd

    from alya.dispatch import Dispatcher
    from alya.engine import Engine

Rows = Union[Iterable[BatchInput], Iterable[tuple[int, Any]], "pd.DataFrame"]

_BATCH_COLS = ("id", "app", "op", "type", "status", "context", "inputfile", "reqat", "doneat", "outputfiles",
               "nrows", "nsuccess", "nfailed", "naborted", "ver")


def batch_record(row: tuple[Any, ...]) -> dict[str, Any]:
    return dict(zip(_BATCH_COLS, row, strict=True))


def details_of(rec: dict[str, Any]) -> BatchDetails:
    return BatchDetails(
        id=str(rec["id"]), app=rec["app"], op=rec["op"], type=rec["type"], status=BatchStatus(rec["status"]),
        context=rec["context"], inputfile=rec["inputfile"], reqat=rec["reqat"], doneat=rec["doneat"],
        outputfiles=rec["outputfiles"] or {}, nrows=rec["nrows"], nsuccess=rec["nsuccess"],
        nfailed=rec["nfailed"], naborted=rec["naborted"],
    )


class JobManager:
    """The application's handle on alya. Thread-safe; create one per process and share it."""

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
        self.config = config or JobManagerConfig()  # type: ignore[call-arg]  # fields come from ALYA_* too
        if self.config.dispatch not in ("none", "prefect"):
            raise ConfigError(f"unknown ALYA_DISPATCH {self.config.dispatch!r}")
        database_url = database_url or env.database_url
        if not database_url:
            from alya.embedded import embedded_database_url

            self.store = Store(embedded_database_url)  # started on first use, not here
        else:
            self.store = Store(database_url)
        self.cache = StatusCache(redis_url or env.redis_url, self.config.batchstatus_cachedur_sec)
        self.objects = ObjectStore(object_store_url or env.object_store_url or default_object_store_url(),
                                   storage_options)
        self.registry = Registry()
        self.initblocks = InitBlocks(self.registry)
        self._dispatcher: Dispatcher | None = None
        self._engine: Engine | None = None
        get_logger().debug("jobmanager", database=_where(database_url) if database_url else "embedded",
                           dispatch=self.config.dispatch)

    @classmethod
    def from_env(cls) -> JobManager:
        """Everything from ALYA_* variables, with embedded defaults for what is unset."""
        return cls()

    # ------------------------------------------------------------------ registration
    def register_initializer(self, app: str, initializer: Initializer) -> None:
        self.registry.add_initializer(app, initializer)

    def register_batch_processor(self, app: str, op: str, processor: BatchProcessor) -> None:
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
    ) -> str:
        """Store a batch and all its rows in one transaction (rows streamed through COPY)."""
        app, op = validate.app_name(app), validate.op_name(op)
        ctx = validate.json_object(context, "context")
        if inputfile is not None and not isinstance(inputfile, str):
            raise InvalidInput("inputfile must be a string")
        pairs = iter_rows(rows)
        batch_id = str(uuid.uuid4())
        status = BatchStatus.WAIT if wait else BatchStatus.QUEUED
        with self._writing(), self.store.tx() as tx:
            tx.run("insert_batch", id=batch_id, app=app, op=op, type="B", context=json_text(ctx),
                   inputfile=inputfile, status=status.value)
            n = self._copy_rows(tx, batch_id, pairs, self.config.batchrowmax)
            ver = tx.one("set_nrows_status", id=batch_id, nrows=n, status=status.value)[0]  # type: ignore[index]
        status_change(app, op, batch_id, status.value, nrows=n)
        self._cache_summary(batch_id, ver, status, n, nqueued=n)
        if not wait:
            self._dispatch(app, op, batch_id)
        return batch_id

    def batch_append(self, batch_id: str, rows: Rows, wait: bool = False) -> int:
        """Add rows to a batch held in `wait`; `wait=False` then releases it. Returns the total rows."""
        batch_id = validate.batch_id(batch_id)
        pairs = iter_rows(rows)
        with self._writing(), self.store.tx() as tx:
            rec = self._locked(tx, batch_id)
            if rec["type"] != "B" or rec["status"] != BatchStatus.WAIT.value:
                raise InvalidState(f"batch {batch_id} is {rec['status']}: rows are appended only while wait")
            n = self._copy_rows(tx, batch_id, pairs, self.config.batchrowmax - rec["nrows"])
            total = rec["nrows"] + n
            status = BatchStatus.WAIT if wait else BatchStatus.QUEUED
            ver = tx.one("set_nrows_status", id=batch_id, nrows=total, status=status.value)[0]  # type: ignore[index]
        if not wait:
            status_change(rec["app"], rec["op"], batch_id, status.value, old="wait", nrows=total)
        self._cache_summary(batch_id, ver, status, total, nqueued=total)
        if not wait:
            self._dispatch(rec["app"], rec["op"], batch_id)
        return int(total)

    def wait_off(self, batch_id: str) -> int:
        """Release a batch held in `wait` to the workers; already queued is a no-op."""
        batch_id = validate.batch_id(batch_id)
        with self.store.tx() as tx:
            rec = self._locked(tx, batch_id)
            if rec["status"] == BatchStatus.QUEUED.value:
                return int(rec["nrows"])
            if rec["status"] != BatchStatus.WAIT.value:
                raise InvalidState(f"batch {batch_id} is {rec['status']}: only a wait batch can be released")
            ver = tx.one("wait_off", id=batch_id)[0]  # type: ignore[index]
        status_change(rec["app"], rec["op"], batch_id, "queued", old="wait", nrows=rec["nrows"])
        self._cache_summary(batch_id, ver, BatchStatus.QUEUED, rec["nrows"], nqueued=rec["nrows"])
        self._dispatch(rec["app"], rec["op"], batch_id)
        return int(rec["nrows"])

    def batch_status(self, batch_id: str) -> BatchSummary:
        """Counts and status, from Redis when cached, else from PostgreSQL (and then cached)."""
        return _summary_of(self._summary_dict(validate.batch_id(batch_id)))

    def batch_done(self, batch_id: str) -> BatchDone:
        """The status, and once final every row ordered by line."""
        batch_id = validate.batch_id(batch_id)
        s = self._summary_dict(batch_id)
        status = BatchStatus(s["status"])
        rows: list[BatchOutput] | None = None
        if status.is_final:
            rows = self._final_rows(batch_id, s)
        return BatchDone(status=status, rows=rows, outputfiles=s["outputfiles"], nsuccess=s["nsuccess"],
                         nfailed=s["nfailed"], naborted=s["naborted"])

    def batch_abort(self, batch_id: str) -> BatchSummary:
        """Abort: rows not yet final become `aborted`, in one transaction. Refused once success/failed."""
        return self._abort(batch_id, None)

    def _abort(self, batch_id: str, type_: str | None) -> BatchSummary:
        batch_id = validate.batch_id(batch_id)
        with self.store.tx() as tx:
            rec = self._locked(tx, batch_id)
            if type_ is not None and rec["type"] != type_:
                raise InvalidState(f"{batch_id} is a batch, not a slow query")
            status = BatchStatus(rec["status"])
            if status in (BatchStatus.SUCCESS, BatchStatus.FAILED):
                raise InvalidState(f"batch {batch_id} already ended {status.value}")
            if status is BatchStatus.ABORTED:
                return _summary_of(self._summary_from_record(tx, rec))
            n_aborted_now = tx.run("abort_rows", id=batch_id)
            counts = _counts(tx, batch_id)
            ver, _ = tx.one(  # type: ignore[misc]
                "finish_batch", id=batch_id, status="aborted", nsuccess=counts.get("success", 0),
                nfailed=counts.get("failed", 0), naborted=counts.get("aborted", 0), outputfiles="{}",
            )
        status_change(rec["app"], rec["op"], batch_id, "aborted", old=status.value,
                      rows_aborted=n_aborted_now)
        summary = self._put_summary(batch_id, ver, BatchStatus.ABORTED, rec["nrows"], counts, {})
        self._cancel(batch_id)
        return _summary_of(summary)

    def batch_list(self, app: str, op: str | None = None, age_days: int = 7) -> list[BatchDetails]:
        return self._list(app, op, age_days, "B")

    # ------------------------------------------------------------------ slow queries
    def slowquery_submit(self, app: str, op: str, context: dict[str, Any] | str,
                         input: dict[str, Any] | str) -> str:
        """A batch of exactly one row (line 0, type Q)."""
        app, op = validate.app_name(app), validate.op_name(op)
        ctx = validate.json_object(context, "context")
        data = json_text(validate.json_object(input, "input"))
        req_id = str(uuid.uuid4())
        with self._writing(), self.store.tx() as tx:
            tx.run("insert_batch", id=req_id, app=app, op=op, type="Q", context=json_text(ctx),
                   inputfile=None, status="queued")
            tx.run("insert_row", batch=req_id, line=0, input=data)
            ver = tx.one("set_nrows_status", id=req_id, nrows=1, status="queued")[0]  # type: ignore[index]
        status_change(app, op, req_id, "queued", type="Q")
        self._cache_summary(req_id, ver, BatchStatus.QUEUED, 1, nqueued=1)
        self._dispatch(app, op, req_id)
        return req_id

    def slowquery_done(self, req_id: str) -> SlowQueryDone:
        req_id = validate.batch_id(req_id)
        s = self._summary_dict(req_id)
        status = BatchStatus(s["status"])
        if not status.is_final:
            return SlowQueryDone(status=status, result=None, messages=[], outputfiles={})
        with self.store.tx() as tx:
            row = tx.one("slowquery_row", id=req_id)
        if row is None:
            raise InvalidState(f"{req_id} is not a slow query")
        _, res, messages, _ = row
        return SlowQueryDone(status=status, result=res, messages=messages_from_json(messages),
                             outputfiles=s["outputfiles"])

    def slowquery_abort(self, req_id: str) -> None:
        self._abort(req_id, "Q")

    def slowquery_list(self, app: str, op: str | None = None, age_days: int = 7) -> list[BatchDetails]:
        return self._list(app, op, age_days, "Q")

    # ------------------------------------------------------------------ workers
    def run(self, stop_when_idle: bool = False) -> None:
        """Run this JobManager's batch-type flows in-process until stopped (or idle, if asked)."""
        from alya.batchflow import run_worker

        run_worker(self, stop_when_idle=stop_when_idle)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
        self.initblocks.close_all()
        self.cache.close()
        self.store.dispose()

    # ------------------------------------------------------------------ internals
    def _copy_rows(self, tx: Tx, batch_id: str, pairs: Any, max_rows: int) -> int:
        stream = CopyStream(batch_id, pairs, max_rows=max(max_rows, 0))
        try:
            tx.copy_in(COPY_ROWS, stream)
        except psycopg2.Error:
            # A bad row (or the caller's own iterable raising) abandons the COPY; psycopg2 reports that as
            # QueryCanceled. Raise what really happened; the transaction is rolled back on the way out.
            if stream.error is not None:
                raise stream.error from None
            raise
        if stream.count == 0:
            raise InvalidInput("a batch needs at least one row")
        return stream.count

    def _writing(self) -> _TranslateDbErrors:
        return _TranslateDbErrors()

    def _locked(self, tx: Tx, batch_id: str) -> dict[str, Any]:
        row = tx.one("lock_batch", id=batch_id)
        if row is None:
            raise BatchNotFound(f"no batch {batch_id}")
        return batch_record(row)

    def _list(self, app: str, op: str | None, age_days: int, type_: str) -> list[BatchDetails]:
        app = validate.app_name(app)
        op = validate.op_name(op) if op is not None else None
        age_days = validate.age_days(age_days)
        with self.store.tx() as tx:
            rows = tx.all("list_batches", app=app, op=op, type=type_, age_days=age_days)
        return [details_of(batch_record(r)) for r in rows]

    def _summary_dict(self, batch_id: str) -> dict[str, Any]:
        cached = self.cache.get(summary_key(batch_id))
        if cached is not None:
            return cached
        with self.store.tx() as tx:
            row = tx.one("get_batch", id=batch_id)
            if row is None:
                raise BatchNotFound(f"no batch {batch_id}")
            rec = batch_record(row)
            summary = self._summary_from_record(tx, rec)
        self.cache.put(summary_key(batch_id), summary, rec["ver"], BatchStatus(rec["status"]).is_final)
        return {**summary, "ver": rec["ver"]}

    def _summary_from_record(self, tx: Tx, rec: dict[str, Any]) -> dict[str, Any]:
        status = BatchStatus(rec["status"])
        if status.is_final:
            counts = {"success": rec["nsuccess"], "failed": rec["nfailed"], "aborted": rec["naborted"]}
        else:
            counts = _counts(tx, str(rec["id"]))
        return _summary(status, rec["nrows"], counts, rec["outputfiles"] or {})

    def _cache_summary(self, batch_id: str, ver: int, status: BatchStatus, nrows: int, nqueued: int) -> None:
        self._put_summary(batch_id, ver, status, nrows, {"queued": nqueued}, {})

    def _put_summary(self, batch_id: str, ver: int, status: BatchStatus, nrows: int, counts: dict[str, int],
                     outputfiles: dict[str, str]) -> dict[str, Any]:
        summary = _summary(status, nrows, counts, outputfiles)
        self.cache.put(summary_key(batch_id), summary, ver, status.is_final)
        return summary

    def _final_rows(self, batch_id: str, summary: dict[str, Any]) -> list[BatchOutput]:
        small = summary["nrows"] <= self.config.done_cache_rows
        if small:
            cached = self.cache.get(done_key(batch_id))
            if cached is not None:
                return [_output(r) for r in cached["rows"]]
            with self.store.tx() as tx:
                raw = tx.all("batch_rows", id=batch_id)
            self.cache.put(done_key(batch_id), {"rows": raw}, summary.get("ver", 0), final=True)
            return [_output(r) for r in raw]
        # Large: rows go from a server-side cursor straight into the result, never held twice.
        with self.store.tx() as tx, closing(tx.stream("batch_rows", id=batch_id)) as cursor:
            return [_output(r) for r in cursor]

    @property
    def engine(self) -> Engine:
        """The processing side of this JobManager (created on first use: clients never need it)."""
        if self._engine is None:
            from alya.engine import Engine

            self._engine = Engine(self)
        return self._engine

    @property
    def dispatcher(self) -> Dispatcher | None:
        if self.config.dispatch != "prefect":
            return None
        if self._dispatcher is None:
            from alya.dispatch import Dispatcher

            self._dispatcher = Dispatcher(self.config)
        return self._dispatcher

    def _dispatch(self, app: str, op: str, batch_id: str) -> None:
        # After the commit: the call has succeeded, so nothing here may raise. A batch whose flow run
        # could not be created stays queued for the sweeper.
        try:
            if self.dispatcher is not None:
                self.dispatcher.start_batch(app, op, batch_id)
        except Exception as exc:
            get_logger().warning("dispatch_failed", app=app, op=op, batch=batch_id, error=f"{type(exc).__name__}")

    def _cancel(self, batch_id: str) -> None:
        try:
            if self.dispatcher is not None:
                self.dispatcher.cancel_batch(batch_id)
        except Exception as exc:
            get_logger().warning("cancel_failed", batch=batch_id, error=f"{type(exc).__name__}")


class _TranslateDbErrors:
    """Turn the database's refusals of bad rows into InvalidInput (the transaction is already undone)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, psycopg2.errors.UniqueViolation):
            raise InvalidInput("line numbers must be unique within a batch") from exc
        if isinstance(exc, (psycopg2.DataError, psycopg2.IntegrityError)):
            raise InvalidInput(f"rows refused by the database: {str(exc).splitlines()[0]}") from exc


def _where(database_url: str) -> str:
    """host:port/database of a URL, for logs: never the URL itself (it may hold a password)."""
    try:
        u = make_url(sqlalchemy_url(database_url))
    except Exception:
        return "?"
    return f"{u.host or 'localhost'}:{u.port or 5432}/{u.database}"


def _counts(tx: Tx, batch_id: str) -> dict[str, int]:
    return {status: n for status, n in tx.all("row_counts", id=batch_id)}


def _summary(status: BatchStatus, nrows: int, counts: dict[str, int],
             outputfiles: dict[str, str]) -> dict[str, Any]:
    return {
        "status": status.value, "outputfiles": outputfiles, "nrows": nrows,
        "nsuccess": counts.get("success", 0), "nfailed": counts.get("failed", 0),
        "naborted": counts.get("aborted", 0), "nqueued": counts.get("queued", 0),
        "ninprog": counts.get("inprog", 0),
    }


def _summary_of(s: dict[str, Any]) -> BatchSummary:
    return BatchSummary(
        status=BatchStatus(s["status"]), outputfiles=s["outputfiles"], nrows=s["nrows"],
        nsuccess=s["nsuccess"], nfailed=s["nfailed"], naborted=s["naborted"], nqueued=s["nqueued"],
        ninprog=s["ninprog"],
    )


def _output(r: Any) -> BatchOutput:
    line, status, res, messages = r
    return BatchOutput(line=line, status=BatchStatus(status), res=res, messages=messages_from_json(messages))
