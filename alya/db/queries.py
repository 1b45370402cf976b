"""The database as a repository: ``Queries`` wraps one open transaction and has one typed method per named
query of ``sql/queries.sql``, named exactly as the query, its keyword-only parameters named as the SQL's
``%(param)s`` names, returning alya's values (the records of ``alya.core.records``, ints, flags, ids).

Why methods and not ``tx.run("name", ...)``: a misspelt query name or parameter is then an error that mypy
and the import of this module report, not a ``KeyError`` in production; what a query returns is written
once, here, instead of each caller indexing a tuple; and a statement issued one way only (``notify_work``)
cannot drift. The check at the bottom of this module ties the methods to the SQL (``sql/*.sql``): a query
without a method, or a method without its query, fails the import (and so every test). Conventions: ids
are ``str``; statuses ``BatchStatus``; JSON columns JSON text, serialised by the caller (which often needs
the text: the write-back measures it); array parameters ``list`` (a tuple is sent as a record).
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator
from contextlib import closing, contextmanager
from datetime import datetime
from typing import Any

from alya.core import names
from alya.core.models import BatchOutput, BatchStatus
from alya.core.records import (
    AppLoad,
    BatchKeyed,
    BatchKind,
    BatchRecord,
    BatchRef,
    BatchState,
    ClaimedRow,
    Counts,
    FileRecord,
    OpenBatch,
    PurgeCandidate,
    Purged,
    RecoveredRow,
    RowResult,
    SlowQueryRow,
    SummaryFailures,
    WriteResult,
    batch_output,
)
from alya.db.arrays import literals
from alya.db.control import ControlQueries
from alya.db.counters import CounterQueries
from alya.db.failure_queries import FailureQueries
from alya.db.ingest import COPY_ROWS
from alya.db.partitions import PartitionQueries
from alya.db.submit_queries import SubmitQueries
from alya.db.transport import OWN_STATEMENTS, Readable, Tx, named_sql

STREAM_PREFIX = "stream_"  # stream_<query>: the query read through a server-side cursor

# Public methods that are not one named query each: the other two ways to notify (they run notify_work's
# SQL) and the COPY.
NOT_QUERIES = frozenset({"notify_any_work", "notify_abort", "notify_paused", "copy_rows"})


def _ids(rows: list[tuple[Any, ...]]) -> list[str]:
    return [str(r[0]) for r in rows]


class Queries(FailureQueries, ControlQueries, CounterQueries, PartitionQueries, SubmitQueries):
    """One open transaction, as typed queries (some in mixins), from ``Store.tx()`` or ``Store.run(body)``."""

    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    # ------------------------------------------------------------------ storing a batch
    def insert_batch(self, *, id: str, app: str, op: str, type: str, context: str, inputfile: str | None,
                     status: BatchStatus, priority: int = 0) -> None:
        self._tx.run("insert_batch", id=id, app=app, op=op, type=type, context=context, inputfile=inputfile,
                     status=status.value, priority=priority)

    def insert_batch_keyed(self, *, id: str, app: str, op: str, type: str, context: str, inputfile: str | None,
                           status: BatchStatus, key: str, priority: int = 0) -> bool:
        """False: this app already holds the key (a retry), and nothing was inserted."""
        return self._tx.one("insert_batch_keyed", id=id, app=app, op=op, type=type, context=context,
                            inputfile=inputfile, status=status.value, key=key, priority=priority) is not None

    def batch_by_key(self, *, app: str, key: str) -> BatchKeyed | None:
        row = self._tx.one("batch_by_key", app=app, key=key)
        return None if row is None else BatchKeyed.from_row(row)

    def keyed_call_matches(self, *, id: str, op: str, type: str, context: str, inputfile: str | None,
                           input: str | None) -> bool:
        """Whether a call is the same as the one that stored batch ``id`` (a retry), or another one."""
        row = self._tx.one("keyed_call_matches", id=id, op=op, type=type, context=context, inputfile=inputfile,
                           input=input)
        return bool(row and row[0])

    def copy_rows(self, stream: Readable) -> None:
        """COPY a batch's rows from a stream of COPY text (``alya.db.ingest.CopyStream``)."""
        self._tx.copy_in(COPY_ROWS, stream)

    def set_nrows_status(self, *, id: str, nrows: int, status: BatchStatus) -> int:
        """The batch's new version."""
        row = self._tx.one("set_nrows_status", id=id, nrows=nrows, status=status.value)
        assert row is not None, f"no batch {id}"  # callers hold the batch they just inserted or locked
        return int(row[0])

    def wait_off(self, *, id: str) -> int | None:
        """The batch's new version, or None when it was not in ``wait``."""
        row = self._tx.one("wait_off", id=id)
        return None if row is None else int(row[0])

    # ------------------------------------------------------------------ reading and locking a batch
    def get_batch(self, *, id: str) -> BatchRecord | None:
        row = self._tx.one("get_batch", id=id)
        return None if row is None else BatchRecord.from_row(row)

    def lock_batch(self, *, id: str) -> BatchRecord | None:
        row = self._tx.one("lock_batch", id=id)
        return None if row is None else BatchRecord.from_row(row)

    def lock_open_batch(self, *, id: str) -> BatchRecord | None:
        """The batch, locked, if it is still open (queued, inprog); None once another summariser ended it."""
        row = self._tx.one("lock_open_batch", id=id)
        return None if row is None else BatchRecord.from_row(row)

    def list_batches(self, *, app: str, op: str | None, type: str, age_days: int) -> list[BatchRecord]:
        return [BatchRecord.from_row(r)
                for r in self._tx.all("list_batches", app=app, op=op, type=type, age_days=age_days)]

    def batch_statuses(self, *, ids: list[str]) -> list[BatchState]:
        return [BatchState.from_row(r) for r in self._tx.all("batch_statuses", ids=ids)]

    def row_counts(self, *, id: str) -> Counts:
        return Counts.from_rows(self._tx.all("row_counts", id=id))

    def batch_rows(self, *, id: str) -> list[RowResult]:
        """Every row of the batch, in line order, in memory at once: for small batches."""
        return [RowResult.from_row(r) for r in self._tx.all("batch_rows", id=id)]

    def stream_batch_rows(self, *, id: str, itersize: int = 5000) -> Generator[BatchOutput, None, None]:
        """``batch_rows`` from a server-side cursor, ``itersize`` rows per round trip: memory stays flat
        however large the batch. Consume it fully or ``close()`` it while the transaction is open."""
        with closing(self._tx.stream("batch_rows", itersize, id=id)) as rows:
            for r in rows:
                yield batch_output(r)

    def stream_batch_blobrows(self, *, id: str, itersize: int = 5000) -> Generator[dict[str, str], None, None]:
        """Each row's blob rows (file name -> text), in line order, from a server-side cursor (a batch's
        output files are written from them). Consume it fully or ``close()`` it while the transaction is
        open."""
        with closing(self._tx.stream("batch_blobrows", itersize, id=id)) as rows:
            for (blobrows,) in rows:
                yield blobrows

    def slowquery_row(self, *, id: str) -> SlowQueryRow | None:
        row = self._tx.one("slowquery_row", id=id)
        return None if row is None else SlowQueryRow.from_row(row)

    # ------------------------------------------------------------------ ending a batch
    def abort_rows(self, *, id: str) -> int:
        """Rows aborted now (queued and in progress ones)."""
        return self._tx.run("abort_rows", id=id)

    def finish_batch(self, *, id: str, status: BatchStatus, nsuccess: int, nfailed: int, naborted: int,
                     outputfiles: str, error: str | None) -> int:
        """The batch's new version."""
        row = self._tx.one("finish_batch", id=id, status=status.value, nsuccess=nsuccess, nfailed=nfailed,
                           naborted=naborted, outputfiles=outputfiles, error=error)
        assert row is not None, f"no batch {id}"  # callers hold the batch locked
        return int(row[0])

    def summary_failed(self, *, id: str, error: str) -> SummaryFailures | None:
        """None when the batch is no longer open (someone else ended it meanwhile)."""
        row = self._tx.one("summary_failed", id=id, error=error)
        return None if row is None else SummaryFailures.from_row(row)

    def claim_notify(self, *, id: str) -> bool:
        """True: this transaction claimed the batch's mark_done; False: someone already did."""
        return self._tx.one("claim_notify", id=id) is not None

    def unnotified_batches(self, *, app: str, op: str) -> list[str]:
        return _ids(self._tx.all("unnotified_batches", app=app, op=op))

    def unsummarised_batches(self) -> list[str]:
        return _ids(self._tx.all("unsummarised_batches"))

    # ------------------------------------------------------------------ claims
    def open_batches(self, *, app: str, op: str, type: str, only: str | None) -> list[OpenBatch]:
        return [OpenBatch.from_row(r) for r in self._tx.all("open_batches", app=app, op=op, type=type, only=only)]

    def open_batches_all(self) -> list[BatchRef]:
        return [BatchRef.from_row(r) for r in self._tx.all("open_batches_all")]

    def stalled_batches(self, *, sec: float) -> list[str]:
        return _ids(self._tx.all("stalled_batches", sec=sec))

    def batch_context(self, *, id: str) -> dict[str, Any] | None:
        row = self._tx.one("batch_context", id=id)
        return None if row is None else row[0]  # type: ignore[no-any-return]

    def claim_rows(self, *, batch: str, n: int, worker: str, after: int) -> list[ClaimedRow]:
        return [ClaimedRow.from_row(r)
                for r in self._tx.all("claim_rows", batch=batch, n=n, worker=worker, after=after)]

    def claim_suspect(self, *, batch: str, worker: str) -> list[ClaimedRow]:
        return [ClaimedRow.from_row(r) for r in self._tx.all("claim_suspect", batch=batch, worker=worker)]

    def app_rows_in_progress(self, *, app: str, worker: str, sec: float) -> AppLoad:
        row = self._tx.one("app_rows_in_progress", app=app, worker=worker, sec=sec)
        assert row is not None  # an aggregate: always one row
        return AppLoad.from_row(row)

    def batch_to_inprog(self, *, batch: str) -> tuple[int, int] | None:
        """(the batch's new version, its rows), or None when it was no longer queued (another won it)."""
        row = self._tx.one("batch_to_inprog", batch=batch)
        return None if row is None else (int(row[0]), int(row[1]))

    def claimable_batch_types(self) -> list[BatchKind]:
        return [BatchKind.from_row(r) for r in self._tx.all("claimable_batch_types")]

    def open_work_exists(self, *, types: list[str]) -> bool:
        """``types``: "app/op/kind" strings."""
        row = self._tx.one("open_work_exists", types=types)
        return bool(row and row[0])

    def next_claimable_in(self, *, id: str) -> float | None:
        """Seconds until the batch's first queued row may be claimed (negative: overdue); None: none queued."""
        row = self._tx.one("next_claimable_in", id=id)
        return None if row is None or row[0] is None else float(row[0])

    # ------------------------------------------------------------------ write-backs
    def write_results(self, *, batch: str, worker: str, lines: list[int], attempts: list[int],
                      statuses: list[str], res: list[str | None], messages: list[str | None],
                      blobrows: list[str | None], delays: list[float], finished: list[float]) -> WriteResult:
        """``res``, ``messages``, ``blobrows``: JSON text per row. ``finished`` is not read by this statement
        (only by ``write_results_late``); it is taken so that both are called with the same columns."""
        row = self._tx.one("write_results", batch=batch, worker=worker, **literals(  # arrays: alya.db.arrays
            lines=lines, attempts=attempts, statuses=statuses, res=res, messages=messages, blobrows=blobrows,
            delays=delays, finished=finished))
        assert row is not None  # a SELECT of scalar subqueries: always one row
        return WriteResult.from_row(row)

    def write_results_late(self, *, batch: str, worker: str, lines: list[int], attempts: list[int],
                           statuses: list[str], res: list[str | None], messages: list[str | None],
                           blobrows: list[str | None], delays: list[float],
                           finished: list[float]) -> tuple[int, int | None]:
        """(rows written after the abort, the batch's new version or None when none was)."""
        row = self._tx.one("write_results_late", batch=batch, worker=worker, **literals(
            lines=lines, attempts=attempts, statuses=statuses, res=res, messages=messages, blobrows=blobrows,
            delays=delays, finished=finished))
        assert row is not None
        return int(row[0]), None if row[1] is None else int(row[1])

    def release_rows(self, *, batch: str, lines: list[int], attempts: list[int], worker: str) -> int:
        """Rows given back."""
        return self._tx.run("release_rows", batch=batch, lines=lines, attempts=attempts, worker=worker)

    def has_open_rows(self, *, id: str) -> bool:
        row = self._tx.one("has_open_rows", id=id)
        return bool(row and row[0])

    def queued_after(self, *, id: str, after: int) -> bool:
        return self._tx.one("queued_after", id=id, after=after) is not None

    # ------------------------------------------------------------------ workers and recovery
    def heartbeat(self, *, id: str, host: str, pid: int) -> None:
        self._tx.run("heartbeat", id=id, host=host, pid=pid)

    def server_started(self) -> datetime:
        row = self._tx.one("server_started")
        assert row is not None
        return row[0]  # type: ignore[no-any-return]

    def forget_worker(self, *, id: str) -> None:
        self._tx.run("forget_worker", id=id)

    def recover_rows(self, *, sec: float, max_attempts: int, fail_messages: str) -> list[RecoveredRow]:
        """``fail_messages``: JSON text, the messages of a row failed for killing its workers."""
        return [RecoveredRow.from_row(r) for r in self._tx.all("recover_rows", sec=sec, max_attempts=max_attempts,
                                                                fail_messages=fail_messages)]

    def forget_dead_workers(self, *, sec: float) -> int:
        return self._tx.run("forget_dead_workers", sec=sec)

    def take_leases(self, *, holder: str, duties: list[str], sec: float) -> set[str]:
        """The maintenance duties ``holder`` has for ``sec`` more seconds (renewed, or taken as expired)."""
        return {str(r[0]) for r in self._tx.all("take_leases", holder=holder, duties=duties, sec=sec)}

    def drop_leases(self, *, holder: str) -> int:
        return self._tx.run("drop_leases", holder=holder)

    # ------------------------------------------------------------------ wake-ups (sent at commit)
    # One SQL statement, three callers' meanings; the channel and payloads are alya.core.names'.
    def notify_work(self, app: str, op: str) -> None:
        """Rows of (app, op) became claimable: idle workers of that type wake when this commits."""
        self._notify(names.work_payload(app, op))

    def notify_any_work(self) -> None:
        """Rows of any type may have become claimable (recovery requeued some)."""
        self._notify(names.ANY_WORK_PAYLOAD)

    def notify_abort(self, batch_id: str) -> None:
        """The batch was aborted: workers stop starting its rows at once, not at their next flush."""
        self._notify(names.abort_payload(batch_id))

    def _notify(self, payload: str) -> None:
        self._tx.one("notify_work", channel=names.WORK_CHANNEL, payload=payload)

    # ------------------------------------------------------------------ file intake
    def lock_file(self, *, url: str) -> None:
        """Wait for, then hold until this transaction ends, the lock of the file at ``url``."""
        self._tx.one("lock_file", url=url)

    def try_lock_file(self, *, url: str) -> bool:
        """The file's lock if it is free now; False: another transaction is taking the file."""
        row = self._tx.one("try_lock_file", url=url)
        return bool(row and row[0])

    def get_file(self, *, url: str, size: int, version: str) -> FileRecord | None:
        row = self._tx.one("get_file", url=url, size=size, version=version)
        return None if row is None else FileRecord.from_row(row)

    def files_at(self, *, urls: list[str]) -> list[FileRecord]:
        return [FileRecord.from_row(r) for r in self._tx.all("files_at", urls=urls)]

    def insert_file(self, *, id: str, url: str, size: int, version: str, filetype: str, status: str,
                    batch: str | None, nrows: int, error: str | None, dest: str | None) -> FileRecord:
        row = self._tx.one("insert_file", id=id, url=url, size=size, version=version, filetype=filetype,
                           status=status, batch=batch, nrows=nrows, error=error, dest=dest)
        assert row is not None  # INSERT ... RETURNING
        return FileRecord.from_row(row)

    def file_moved(self, *, id: str, dest: str) -> FileRecord | None:
        row = self._tx.one("file_moved", id=id, dest=dest)
        return None if row is None else FileRecord.from_row(row)

    def list_files(self, *, age_days: int) -> list[FileRecord]:
        return [FileRecord.from_row(r) for r in self._tx.all("list_files", age_days=age_days)]

    # ------------------------------------------------------------------ retention (alya.batch.retention)
    def purgeable_batches(self, *, before: datetime, app: str | None, after_at: datetime, after_id: str,
                          n: int) -> list[PurgeCandidate]:
        return [PurgeCandidate.from_row(r) for r in self._tx.all(
            "purgeable_batches", before=before, app=app, after_at=after_at, after_id=after_id, n=n)]

    def purge_rows(self, *, id: str, before: datetime, after: int, n: int) -> tuple[int, int]:
        """(rows deleted, the last line deleted, or ``after`` when none was)."""
        row = self._tx.one("purge_rows", id=id, before=before, after=after, n=n)
        assert row is not None  # an aggregate: always one row
        return int(row[0]), int(row[1])

    def purge_batches(self, *, ids: list[str], before: datetime) -> Purged:
        row = self._tx.one("purge_batches", ids=ids, before=before)
        assert row is not None
        return Purged.from_row(row)

    def purge_rejected_files(self, *, before: datetime, n: int) -> int:
        return self._tx.run("purge_rejected_files", before=before, n=n)

    # ------------------------------------------------------------------ metrics (alya.batch.monitor)
    def queue_depths(self) -> list[tuple[str, str, str, int, int, float | None]]:
        """(app, op, kind, rows queued, rows in progress, oldest queued row's age in seconds) per open type."""
        return [(r[0], r[1], r[2], int(r[3]), int(r[4]), None if r[5] is None else float(r[5]))
                for r in self._tx.all("queue_depths")]

    def live_workers(self, *, sec: float) -> int:
        row = self._tx.one("live_workers", sec=sec)
        return int(row[0]) if row else 0

    # ------------------------------------------------------------------ transaction
    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested transaction: an exception inside undoes only what was done inside, and the transaction
        goes on (the file intake records a rejected file in the transaction whose batch insert failed).
        Driver errors come out mapped to alya's, as from ``Store.tx``."""
        with self._tx.savepoint():
            yield


def query_methods() -> dict[str, str]:
    """Each public method of ``Queries`` that runs one named query, and that query's name."""
    names = [a for a in dir(Queries) if a[0] != "_" and a not in NOT_QUERIES and callable(getattr(Queries, a))]
    return {a: a[len(STREAM_PREFIX):] if a.startswith(STREAM_PREFIX) else a for a in names}


def unmatched(sql_names: Iterable[str]) -> tuple[list[str], list[str]]:
    """(named queries without a method, methods whose query does not exist). A query read only through a
    server-side cursor may have only its ``stream_`` method; the transport's own statements have none."""
    sql = set(sql_names)
    served = set(query_methods().values())
    missing = sorted(sql - served - OWN_STATEMENTS)
    unknown = sorted(m for m, q in query_methods().items() if q not in sql)
    return missing, unknown


def check_methods(sql_names: Iterable[str] | None = None) -> None:
    """Raise unless the methods of ``Queries`` and the named queries of ``sql/queries.sql`` match."""
    missing, unknown = unmatched(named_sql() if sql_names is None else sql_names)
    if missing or unknown:
        raise RuntimeError(f"alya.db.queries does not match sql/queries.sql: queries without a method {missing}, "
                           f"methods without a query {unknown}")


check_methods()  # at import: a mismatch fails every test, and any process, at once
